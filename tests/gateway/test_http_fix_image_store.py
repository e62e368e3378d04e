"""The gateway's image folder: a saved image survives a power cut, and a crash's temporary
files do not pile up. Before the fix the file was fsynced but not its folder after the
rename (the rename itself could be lost: an app told `resultUrl` got 404), and `<id>.tmp`
files a crash left behind stayed for ever."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sogni_coordinator.gateway.results import STALE_TMP, ImageStore

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
IMG = "0F0F0F0F-0000-4000-8000-000000000000"
OTHER = "0F0F0F0F-0000-4000-8000-000000000001"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
async def test_save_fsyncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageStore(tmp_path / "img", retention=60)
    store.load()
    target = tmp_path / "img" / f"{IMG}.png"
    synced: list[tuple[str, bool]] = []  # (what was fsynced, was the image in place by then)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stored = await store.save(IMG, PNG)
    assert stored.path == target and target.read_bytes() == PNG
    assert (str(tmp_path / "img"), True) in synced  # the folder, after the rename
    assert not [p for p in (tmp_path / "img").iterdir() if p.name.endswith(".tmp")]


def test_load_deletes_stale_temporary_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    (folder / f"{IMG}.png").write_bytes(PNG)
    old = time.time() - STALE_TMP - 60
    legacy = folder / f"{IMG}.tmp"  # what earlier versions wrote
    leftover = folder / f".{OTHER}.png.k2j4h1.tmp"  # what `atomic_write_bytes` writes
    fresh = folder / f".{OTHER}.jpg.x8y9z0.tmp"  # another coordinator saving right now
    unrelated = folder / "notes.tmp"  # not ours: never touched
    for path in (legacy, leftover, fresh, unrelated):
        path.write_bytes(b"half an image")
    for path in (legacy, leftover, unrelated):
        os.utime(path, (old, old))

    store = ImageStore(folder, retention=60)
    assert store.load() == 1 and store.get(IMG) is not None
    assert not legacy.exists() and not leftover.exists()
    assert fresh.exists() and unrelated.exists()
