"""The one crash-safe write helper: content, mode, no-overwrite, and what a failed write leaves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sogni_protocol import atomic
from sogni_protocol.atomic import FileExists, atomic_write_bytes, atomic_write_text, fsync_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_content_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(path, b"\x00\x01payload")
    assert path.read_bytes() == b"\x00\x01payload"
    atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert os.listdir(path.parent) == ["file.bin"]  # no temp file left behind


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode_is_respected_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old_umask = os.umask(0o077 if mode == 0o644 else 0o000)
    try:
        atomic_write_bytes(tmp_path / "new", b"x", mode=mode)
        (tmp_path / "old").write_bytes(b"y")
        (tmp_path / "old").chmod(0o666)
        atomic_write_text(tmp_path / "old", "z", mode=mode)  # replacing sets the mode too
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "new") == mode
    assert _mode(tmp_path / "old") == mode


def test_default_mode_is_0644(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "f", "x")
    assert _mode(tmp_path / "f") == 0o644


def test_replace_false_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    atomic_write_bytes(path, b"first", mode=0o600, replace=False)
    with pytest.raises(FileExists):
        atomic_write_bytes(path, b"second", mode=0o600, replace=False)
    assert path.read_bytes() == b"first"
    assert issubclass(FileExists, FileExistsError)
    assert os.listdir(tmp_path) == ["key"]


def test_replace_false_without_hard_links_still_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File systems without link() fall back to exists-then-rename."""

    def no_link(*_args: object) -> None:
        raise OSError("links not supported")

    monkeypatch.setattr(atomic.os, "link", no_link)
    path = tmp_path / "key"
    atomic_write_bytes(path, b"first", replace=False)
    assert path.read_bytes() == b"first"
    with pytest.raises(FileExists):
        atomic_write_bytes(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key"]


def test_failed_rename_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    atomic_write_text(path, '{"old": true}\n', mode=0o600)

    def broken_replace(*_args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, '{"new": true}\n')
    assert path.read_text() == '{"old": true}\n'
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["index.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while the data is still being written (here: fsync fails) touches nothing."""
    path = tmp_path / "bench.json"
    atomic_write_text(path, "old")

    def broken_fsync(_fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_text(path, "new" * 1000)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["bench.json"]


def test_fsync_dir_tolerates_a_missing_folder(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # no error: best effort where unsupported
