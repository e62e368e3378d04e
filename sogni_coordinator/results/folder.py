"""Images as files: `<root>/<request id>/<index>-<offer hash prefix>.jobimage` (mode 0600).

The default store (one coordinator, or several sharing a mounted folder). Each file is the
`JobImage` frame the client will get, written in place under its own name (new: no receipt
names it yet) and made durable with one `syncfs` for a whole group (separate fsyncs, one
after another, each wait for their own journal commit); a name that exists already is
replaced atomically (temporary name, rename). The file is the truth: a memory copy is sent
only while its file exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from sogni_coordinator.results.base import DEFAULT_MEMORY, ResultKey, ResultStore
from sogni_protocol.atomic import fsync_dir

__all__ = ["SUFFIX", "FolderResults"]

SUFFIX = ".jobimage"


class FolderResults(ResultStore):
    """A folder of `.jobimage` files (see the module docstring)."""

    def __init__(
        self, root: Path, memory_bytes: int = DEFAULT_MEMORY, *, retention: float | None = None
    ) -> None:
        super().__init__(memory_bytes=memory_bytes, retention=retention)
        self.root = root

    @property
    def _root(self) -> str:
        return os.fspath(self.root)

    def folder(self, request_id: bytes) -> Path:
        return self.root / request_id.hex()

    def path(self, request_id: bytes, index: int, offer_hash: bytes) -> Path:
        return self.folder(request_id) / f"{index:04d}-{offer_hash.hex()[:16]}{SUFFIX}"

    def path_of(self, key: ResultKey) -> Path:
        return self.path(*key)

    def _in_memory_valid(self, key: ResultKey) -> bool:
        # deleted (acknowledged elsewhere, lost): not sent. Once per image sent, on the event
        # loop: the path as one string (no `Path` joins), one stat.
        name = f"{key.index:04d}-{key.offer_hash.hex()[:16]}{SUFFIX}"
        return os.path.exists(f"{self._root}/{key.request_id.hex()}/{name}")

    def _write_many(self, items: list[tuple[ResultKey, bytes]]) -> dict[ResultKey, OSError]:
        by_path = {self.path_of(key): key for key, _ in items}
        failed = _write_files([(self.path_of(key), data) for key, data in items])
        return {by_path[path]: exc for path, exc in failed.items()}

    def _read(self, key: ResultKey) -> bytes | None:
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            return None

    def _delete(self, keys: list[ResultKey]) -> None:
        self._unlink(self.path_of(k) for k in keys)

    @staticmethod
    def _unlink(paths: Iterable[Path]) -> None:
        """Delete files, and their folders once empty."""
        folders = set()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            p
            for folder in self.root.iterdir()
            if folder.is_dir()
            for p in folder.iterdir()
            if p.suffix == SUFFIX or (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]

    def _delete_older(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        old = []
        for p in self._files():
            if p.suffix != SUFFIX:  # a write under way (maybe another coordinator's)
                continue
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    old.append(p)
        self._unlink(old)
        return len(old)

    def prune(self, keep: set[ResultKey]) -> int:
        """At start: delete image files the store does not list as pending (acked before a
        crash, or written for a receipt that never committed) and interrupted writes.
        Other files (images saved by older releases) are left alone. Returns the count."""
        paths = {self.path_of(k) for k in keep}
        stale = [p for p in self._files() if p not in paths]
        with self._lock:
            for key in [k for k in self._memory if self.path_of(k) not in paths]:
                self._forget(key)
        self._unlink(stale)
        return len(stale)


def _write_files(items: list[tuple[Path, bytes]]) -> dict[Path, OSError]:
    """Each new file written in place (no receipt names it until its group is durable, and
    `prune` clears one whose receipt never committed), all made durable at once with their
    folder entries (one `syncfs` of the results file system where Linux has it; else each
    file's fsync and its folder's). A name that exists already (the same result sent again)
    is replaced atomically instead: written to a temporary name, synced with the rest, then
    renamed, and the renames made durable (one more `syncfs` when they span several folders,
    else the folder's fsync). Runs in a worker thread (the database writer's,
    `ResultStore.write_group`); the files that failed, with their error."""
    errors: dict[Path, OSError] = {}
    fresh: list[Path] = []
    replacing: list[tuple[Path, str]] = []
    one_sync = _SYNCFS is not None and len(items) > 1
    made: set[Path] = set()
    for path, data in items:
        name, tmp = str(path), None
        fd = None
        try:
            fd = _create(name, path.parent, made)
            if fd is None:  # the name exists: replace it whole, never rewrite it in place
                tmp = name = _temporary(path)
                fd = _create(tmp, path.parent, made)
                if fd is None:
                    raise FileExistsError(17, "temporary name taken", tmp)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if not one_sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if tmp is None:
                fresh.append(path)
            else:
                replacing.append((path, tmp))
        except OSError as exc:
            errors[path] = exc
            if fd is not None:  # created by this write: nothing may find it half-written
                with contextlib.suppress(OSError):
                    os.unlink(name)
    if one_sync and (fresh or replacing):
        try:
            _syncfs((fresh[0] if fresh else replacing[0][0]).parent)
        except OSError as exc:  # not known durable: none may be pointed at
            for path in fresh:
                errors[path] = exc
                with contextlib.suppress(OSError):
                    path.unlink()
            for path, tmp in replacing:
                errors[path] = exc
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return errors
    folders: set[Path] = set() if one_sync else {path.parent for path in fresh}
    renamed: list[Path] = []
    for path, tmp in replacing:
        try:
            os.replace(tmp, path)
            folders.add(path.parent)
            renamed.append(path)
        except OSError as exc:
            errors[path] = exc
    if one_sync and len(folders) > 1:
        try:
            _syncfs(renamed[0].parent)
        except OSError as exc:  # the replaced names: not known durable
            for path in renamed:
                errors[path] = exc
    else:
        for folder in folders:
            fsync_dir(folder)
    return errors


_names = itertools.count()


_CREATE_ATTEMPTS = 5
"""Times a write makes its folder again after a concurrent delete removed it."""


def _create(name: str, folder: Path, made: set[Path]) -> int | None:
    """Open the new file `name` in `folder` (None if a file of that name exists), making the
    folder first if this write has not. Deleting a request's last delivered image removes
    its folder (`_unlink`, in another thread), so the folder can vanish between the `mkdir`
    and the `open`, or inside `mkdir` itself (it then reports the folder existing but not a
    directory): make it again. Once the new file is in it, the folder is not empty and
    stays."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
        except FileExistsError:
            made.discard(folder)
            if attempt == _CREATE_ATTEMPTS - 1 or (folder.exists() and not folder.is_dir()):
                raise
            continue
        try:
            return os.open(name, flags, 0o600)
        except FileExistsError:
            return None
        except FileNotFoundError:
            made.discard(folder)
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _temporary(path: Path) -> str:
    """A fresh temporary name beside `path` (`.<name>.<unique>.tmp`: `_files` and `prune`
    know it as an interrupted write): the process id, a counter and random bits, so
    coordinators sharing a mounted folder never pick the same one."""
    unique = f"{os.getpid()}-{next(_names)}-{os.urandom(4).hex()}"
    return str(path.parent / f".{path.name}.{unique}.tmp")


def _find_syncfs() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return fn


_SYNCFS = _find_syncfs()


def _syncfs(folder: Path) -> None:
    """Flush the file system holding `folder` to disk; raises `OSError` on a write error."""
    assert _SYNCFS is not None
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
