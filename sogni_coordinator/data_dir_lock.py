"""One coordinator process per data folder, and no restore beneath a running one.

Why: two coordinators on one folder would each use its SQLite file, keys and result files as
if alone; and `restore --force` under a running coordinator replaced its database beneath it
(deleting the live WAL) while the daemon went on serving the old data. A running coordinator
holds an exclusive `flock` on `<data_dir>/coordinator.lock` for its lifetime (the kernel lets
go when the process ends, SIGKILL included: no stale lock to clean up); `restore` takes the
same lock for its copy. Where `fcntl` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms the daemons run on
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "DataDirBusy", "DataDirLock", "hold"]

LOCK_NAME = "coordinator.lock"


class DataDirBusy(RuntimeError):
    """A coordinator already runs on this data folder (or a restore is copying into it)."""


class DataDirLock:
    """The held lock of one data folder; `release` lets go (idempotent)."""

    def __init__(self, data_dir: Path, doing: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise DataDirBusy(
                f"a coordinator is running on {data_dir}: stop it before {doing}"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases its flock
            self._fd = None


@contextmanager
def hold(data_dir: Path, doing: str) -> Iterator[None]:
    """Hold `data_dir`'s lock for the block; `DataDirBusy` when another holder has it."""
    lock = DataDirLock(data_dir, doing)
    try:
        yield
    finally:
        lock.release()
