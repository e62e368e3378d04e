"""One daemon process per data folder: an exclusive `flock` on a lock file in it.

Why: two daemons on one folder would each use its SQLite files, keys and kept results as if
alone (a node's journal, a coordinator's database). The kernel lets go of the lock when the
process ends, SIGKILL included: there is no stale lock to clean up. Where `fcntl` is missing
(Windows) nothing is locked and `held` cannot tell.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms the daemons run on
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderBusy", "held", "hold"]


_TRIES = 5
"""Tries of the exclusive lock, 50 ms apart: `held`'s shared lock lasts an instant."""


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


@contextmanager
def hold(folder: Path, lock_name: str, busy: FolderBusy) -> Iterator[None]:
    """Hold `folder/lock_name` for the block; raises `busy` when another process has it.
    Closing the descriptor releases the lock."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            for attempt in range(_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt + 1 == _TRIES:
                        raise busy from None
                    time.sleep(0.05)  # `held` looks for an instant (a status): not a daemon
        yield
    finally:
        os.close(fd)


def held(folder: Path, lock_name: str) -> bool | None:
    """Whether a process holds `folder/lock_name` now (False: no lock file, or free); None
    where it cannot be told (no `fcntl`, the file unreadable). Creates nothing."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder / lock_name, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False
