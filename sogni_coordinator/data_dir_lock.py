"""One coordinator process per data folder, and no restore beneath a running one.

Why: two coordinators on one folder would each use its SQLite file, keys and result files as
if alone; and `restore --force` under a running coordinator replaced its database beneath it
(deleting the live WAL) while the daemon went on serving the old data. A running coordinator
holds an exclusive `flock` on `<data_dir>/coordinator.lock` for its lifetime (the kernel lets
go when the process ends, SIGKILL included: no stale lock to clean up); `restore` takes the
same lock for its copy. Where `fcntl` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sogni_protocol import folder_lock

__all__ = ["LOCK_NAME", "DataDirBusy", "hold"]

LOCK_NAME = "coordinator.lock"


class DataDirBusy(folder_lock.FolderBusy):
    """A coordinator already runs on this data folder (or a restore is copying into it)."""


@contextmanager
def hold(data_dir: Path, doing: str) -> Iterator[None]:
    """Hold `data_dir`'s lock for the block; `DataDirBusy`, naming `doing`, when another
    holder has it."""
    busy = DataDirBusy(f"a coordinator is running on {data_dir}: stop it before {doing}")
    with folder_lock.hold(data_dir, LOCK_NAME, busy):
        yield
