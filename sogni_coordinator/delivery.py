"""Each image reaches its client exactly once, across lost streams and coordinator restarts.

An image is written to the results folder (as the `JobImage` frame the client will get,
mode 0600) before its receipt is committed, so whatever the store counts as deliverable is
on disk. A `Mailbox` is what one request owes its client: the images not yet acknowledged
(their paths; `ResultFiles` also keeps the latest images it wrote in memory, 64 MiB at
most, so a slow or absent client costs disk, not unbounded memory), failures,
the latest progress per job, and the final `RequestDone` once every job has ended. A client
stream reads it through a `Cursor`, which yields each of those once per attachment; the
client's `ImageAck` marks an image delivered in the store and its file is deleted. A new
attachment (a resume) supersedes the old one and starts again from what is unacknowledged,
so an image lost in flight is sent again and the client drops a copy it already has.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sogni_coordinator.store import DeliveryRecord
from sogni_protocol.atomic import fsync_dir
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobFailed, JobImage, JobProgress, Message, RequestDone, decode
from sogni_protocol.messages import encode as encode_message

log = get_logger(__name__)

__all__ = ["Cursor", "Mailbox", "ResultFiles", "short"]

_SUFFIX = ".jobimage"
LOST_IMAGE = "the coordinator lost this image's file; its receipt is stored"


def short(request_id: bytes) -> str:
    """A request id for logs: a prefix, never the whole id."""
    return request_id.hex()[:12]


class ResultFiles:
    """`<root>/<request id>/<index>-<offer hash prefix>.jobimage`: one file per receipted
    image (the offer hash tells a straggler's two copies apart)."""

    def __init__(self, root: Path, memory_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.memory_bytes = memory_bytes
        """At most this many image bytes are also kept in memory, so that a stream sends an
        image it was just given without a thread hop and a file read per image (the file is
        still written and fsync'd first: it is what a restart or another coordinator reads)."""
        self._memory: dict[Path, JobImage] = {}
        self._held = 0
        self._lock = threading.Lock()  # `remove` runs in worker threads
        self._open = _Batch()
        """Files waiting for the next write."""
        self._writing: _Batch | None = None

    def folder(self, request_id: bytes) -> Path:
        return self.root / request_id.hex()

    def path(self, request_id: bytes, index: int, offer_hash: bytes) -> Path:
        return self.folder(request_id) / f"{index:04d}-{offer_hash.hex()[:16]}{_SUFFIX}"

    async def write(self, path: Path, image: JobImage) -> None:
        """Durably, off the event loop (an image frame may be 32 MiB). Files asked for while
        a write is under way are written together in one worker-thread call (one folder
        fsync per request, not per file): a thread hop per image costs the loop more than
        the image itself. Raises `OSError` if this file could not be written."""
        data = encode_message(image)
        batch = self._open
        batch.items.append((path, data))
        while not batch.done.is_set():
            writing = self._writing
            if writing is None:  # nobody is writing: this task writes everything queued
                current, self._open = self._open, _Batch()
                self._writing = current
                try:
                    current.errors = await trio.to_thread.run_sync(_write_files, current.items)
                finally:
                    self._writing = None
                    current.done.set()
            else:
                await writing.done.wait()
        if batch.errors is None:
            raise OSError("the image write did not finish")
        if (error := batch.errors.get(path)) is not None:
            raise error
        with self._lock:
            self._forget(path)
            if self._held + len(image.image) <= self.memory_bytes:
                self._memory[path] = image
                self._held += len(image.image)

    def _forget(self, path: Path) -> None:
        """Drop `path` from memory; the caller holds the lock."""
        image = self._memory.pop(path, None)
        if image is not None:
            self._held -= len(image.image)

    async def read(self, path: Path) -> JobImage | None:
        """The frame stored at `path`, or None if it is missing or not a `JobImage`."""
        image = self._memory.get(path)
        if image is not None and path.exists():  # the file is the truth: it may be gone
            return image
        try:
            data = await trio.to_thread.run_sync(path.read_bytes)
            frame = decode(data)
        except (OSError, InvalidMessage):
            return None
        return frame if isinstance(frame, JobImage) else None

    def remove(self, paths: Iterable[Path]) -> None:
        """Delete files (blocking: call from a worker thread), and their folders once empty."""
        folders = set()
        for path in paths:
            with self._lock:
                self._forget(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()

    def prune(self, keep: set[Path]) -> int:
        """At start: delete image files the store does not list as pending (acked before a
        crash, or written for a receipt that never committed) and interrupted writes.
        Other files (images saved by older releases) are left alone. Returns the count."""
        if not self.root.is_dir():
            return 0
        stale = [
            p
            for folder in self.root.iterdir()
            if folder.is_dir()
            for p in folder.iterdir()
            if (p.suffix == _SUFFIX and p not in keep)
            or (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        self.remove(stale)
        return len(stale)


@dataclass(eq=False)
class _Batch:
    items: list[tuple[Path, bytes]] = field(default_factory=list)
    errors: dict[Path, OSError] | None = None
    """Set when the write returned: the files that failed."""
    done: trio.Event = field(default_factory=trio.Event)


def _write_files(items: list[tuple[Path, bytes]]) -> dict[Path, OSError]:
    """Each file written to a temporary name, all made durable at once (one `syncfs` of the
    results file system where Linux has it: separate fsyncs, one after another, each wait
    for their own journal commit), renamed (mode 0600), then each folder fsync'd once (a
    worker thread); the files that failed, with their error."""
    errors: dict[Path, OSError] = {}
    written: list[tuple[Path, str]] = []
    one_sync = _SYNCFS is not None and len(items) > 1
    for path, data in items:
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if not one_sync:
                    f.flush()
                    os.fsync(f.fileno())
            written.append((path, tmp))
        except OSError as exc:
            errors[path] = exc
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    if one_sync and written:
        try:
            _syncfs(written[0][0].parent)
        except OSError as exc:
            for path, tmp in written:
                errors[path] = exc
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return errors
    folders: set[Path] = set()
    for path, tmp in written:
        try:
            os.replace(tmp, path)
            folders.add(path.parent)
        except OSError as exc:
            errors[path] = exc
    for folder in folders:
        fsync_dir(folder)
    return errors


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


@dataclass(eq=False)
class Mailbox:
    """What one request owes its client, and which attachment (stream) reads it now."""

    request_id: bytes
    job_ids: list[bytes]
    pending: dict[bytes, Path] = field(default_factory=dict)
    """Receipted, on disk, not acknowledged: job id -> file, in the order to send them."""
    failed: dict[bytes, JobFailed] = field(default_factory=dict)
    acked: set[bytes] = field(default_factory=set)
    progress: dict[bytes, JobProgress] = field(default_factory=dict)
    """The latest progress per job not yet sent: coalesced, so bounded by the job count."""
    done: RequestDone | None = None
    """Set once every job has ended."""
    generation: int = 0
    attached: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def from_record(cls, record: DeliveryRecord, files: ResultFiles) -> Mailbox:
        """A mailbox rebuilt from the store (after a restart, or for a collect later)."""
        box = cls(record.request_id, list(record.job_ids), acked=set(record.acked))
        for job_id, index, offer_hash in record.pending:
            box.pending[job_id] = files.path(record.request_id, index, offer_hash)
        for job_id, index in record.failed:
            box.failed[job_id] = JobFailed(
                job_id=job_id, index=index, reason="the coordinator gave up on this image"
            )
        if record.live == 0:
            box.done = RequestDone(
                request_id=record.request_id,
                delivered=record.delivered,
                failed=len(record.failed),
                cancelled=record.cancelled,
            )
        return box

    def notify(self) -> None:
        """Wake the attached cursor."""
        event, self.changed = self.changed, trio.Event()
        event.set()

    def attach(self, files: ResultFiles) -> Cursor:
        """A new stream reads this mailbox; the previous one, if any, is superseded."""
        self.generation += 1
        self.attached = True
        self.notify()
        return Cursor(self, self.generation, files)

    def detach(self, cursor: Cursor) -> None:
        if cursor.generation == self.generation:
            self.attached = False
            self.progress.clear()

    @property
    def idle(self) -> bool:
        """Over and nobody attached: it need not stay in memory (the store rebuilds it)."""
        return self.done is not None and not self.attached


class Cursor:
    """One attachment's view of a mailbox: yields progress, images (from memory if this
    process wrote them lately, else read from disk one at a time), failures and finally
    `RequestDone`, each once; stops when superseded."""

    def __init__(self, box: Mailbox, generation: int, files: ResultFiles) -> None:
        self.box = box
        self.generation = generation
        self.files = files
        self.sent: set[bytes] = set()
        self.finished = False
        """`RequestDone` was handed out."""

    @property
    def superseded(self) -> bool:
        return self.box.generation != self.generation

    async def next(self) -> Message | None:
        """The next message ready now, or None if there is none (or the cursor ended)."""
        box = self.box
        while not (self.finished or self.superseded):
            while box.progress:
                progress = box.progress.pop(next(iter(box.progress)))
                if progress.job_id not in box.pending and progress.job_id not in self.sent:
                    return progress
            job_id = next((j for j in box.pending if j not in self.sent), None)
            if job_id is not None:
                path = box.pending[job_id]
                image = await self.files.read(path)
                if job_id not in box.pending:  # acknowledged meanwhile (an earlier stream)
                    continue
                self.sent.add(job_id)
                if image is None or image.job_id != job_id:
                    log.error("result_file_missing", request=short(box.request_id), file=path.name)
                    return JobFailed(job_id=job_id, index=_index(path), reason=LOST_IMAGE)
                return image
            failed = next((j for j in box.failed if j not in self.sent), None)
            if failed is not None:
                self.sent.add(failed)
                return box.failed[failed]
            if box.done is not None:
                self.finished = True
                return box.done
            return None
        return None

    def __aiter__(self) -> Cursor:
        return self

    async def __anext__(self) -> Message:
        while True:
            changed = self.box.changed
            msg = await self.next()
            if msg is not None:
                return msg
            if self.finished or self.superseded:
                raise StopAsyncIteration
            await changed.wait()


def _index(path: Path) -> int:
    try:
        return int(os.path.basename(path).split("-", 1)[0])
    except ValueError:
        return 0
