"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

Why one helper: every file that must survive a crash (keystores, addresses, epoch files,
model indexes, benchmarks, saved speeds) needs the same four steps, and a missed fsync only
shows after a power cut. The steps: write a temporary file in the same folder, fsync it,
rename it over the target, fsync the folder so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["FileExists", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


class FileExists(FileExistsError):
    """`atomic_write_bytes(..., replace=False)` found the target already there."""


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in `directory` durable (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(
    path: Path | str, data: bytes, *, mode: int = 0o644, replace: bool = True
) -> None:
    """Write `data` to `path` atomically and durably, with permission bits `mode`.

    With ``replace=False`` an existing `path` is never overwritten (`FileExists`); the
    check and the create are one atomic step (a hard link) where the file system allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError:
                raise FileExists(f"{path} already exists") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExists(f"{path} already exists") from None
                os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path | str, text: str, *, mode: int = 0o644) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
