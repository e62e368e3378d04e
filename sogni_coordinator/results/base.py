"""The result store: where a receipted image waits for its client, by (request, index, offer).

Why one interface: a single coordinator keeps its images in a folder (`folder.py`, the
default, fast: grouped writes, one `syncfs`), but several coordinators of one network must
all read what any of them stored, with no shared mount (`postgres.py`: rows in the
network's PostgreSQL). Callers (`dispatch.py`, `cluster.py`, `delivery.Cursor`) see only
this class: `put` before the receipt commits, `get` to send, `remove` on the client's
acknowledgement, `sweep` for images nobody collected within the retention.

What every store shares lives here: `put` groups the images asked for while a write is
under way into one worker-thread call (a thread hop per image costs the event loop more
than the image), and the latest images put stay in memory (`memory_bytes`) so a stream
sends an image it was just given without a thread hop and a read.

The dispatcher does not `put` a receipted image: it hands `staged(key, image)` to the
receipt's queued write (`db.Database.call_staged`), and the database writer's staging
thread calls `write_group` with every image waiting, while the previous group commits;
their receipts join the next group only once the images are durable (a folder: one
`syncfs`), and a receipt whose image failed is never written (its caller gets the
`OSError`). So a job waits on one queued write, not an image write and then a receipt.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from sogni_coordinator.log_ids import short
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobImage
from sogni_protocol.messages import encode as encode_message

log = get_logger(__name__)

__all__ = ["ResultKey", "ResultStore", "StagedImage", "StoreError"]

DEFAULT_MEMORY = 64 * 1024 * 1024
SWEEP_EVERY = 300.0
"""Seconds between retention sweeps at most (less when the retention is short)."""


@dataclass(frozen=True, slots=True)
class ResultKey:
    """One receipted image: its request, its index in the request, and the offer it was
    rendered under (a straggler's two copies of one job differ only by the offer)."""

    request_id: bytes
    index: int
    offer_hash: bytes

    def __iter__(self) -> Iterator[Any]:
        return iter((self.request_id, self.index, self.offer_hash))

    @property
    def name(self) -> str:
        """For logs: no request id in full (its prefix as every log line gives it,
        `log_ids.short`), nothing of the image."""
        return f"{short(self.request_id)}/{self.index:04d}-{self.offer_hash.hex()[:8]}"


class StoreError(OSError):
    """An image could not be stored or read (an `OSError`, as a full disk is)."""


@dataclass(frozen=True, slots=True)
class StagedImage:
    """An image to write with its receipt's group (`ResultStore.write_group`): the encoded
    frame (encoded on the event loop, as `put` does) and the frame itself for memory."""

    key: ResultKey
    data: bytes
    image: JobImage


@dataclass(eq=False)
class _Batch:
    items: list[tuple[ResultKey, bytes]] = field(default_factory=list)
    errors: dict[ResultKey, OSError] | None = None
    """Set when the write returned: the images that failed."""
    done: trio.Event = field(default_factory=trio.Event)


class ResultStore(ABC):
    """Images by `ResultKey`. `put`, `get` and `discard` are for the event loop; `remove`,
    `prune` and `sweep` block (call them from a worker thread)."""

    shared: bool = False
    """Every coordinator of the network reads what this one stores (no shared mount)."""

    def __init__(self, *, memory_bytes: int = DEFAULT_MEMORY, retention: float | None = None):
        self.memory_bytes = memory_bytes
        self.retention = retention
        """Seconds an image is kept when its client never acknowledges it (`run` sweeps);
        None: until acknowledged."""
        self._memory: dict[ResultKey, tuple[JobImage, float]] = {}
        self._held = 0
        self._lock = threading.Lock()  # `remove` and `sweep` run in worker threads
        self._open = _Batch()
        """Images waiting for the next write."""
        self._writing: _Batch | None = None

    @staticmethod
    def key(request_id: bytes, index: int, offer_hash: bytes) -> ResultKey:
        return ResultKey(request_id, index, offer_hash)

    # --- what each store implements (blocking; worker threads) ---------------------------
    @abstractmethod
    def _write_many(self, items: list[tuple[ResultKey, bytes]]) -> dict[ResultKey, OSError]:
        """Store every (key, encoded frame) durably; the ones that failed, with their error."""

    @abstractmethod
    def _read(self, key: ResultKey) -> bytes | None:
        """The encoded frame, or None if there is none; raises `OSError` if unreadable."""

    @abstractmethod
    def _delete(self, keys: list[ResultKey]) -> None:
        """Delete these images (missing ones are fine)."""

    @abstractmethod
    def _delete_older(self, max_age: float) -> int:
        """Delete images stored more than `max_age` seconds ago; how many."""

    def _in_memory_valid(self, key: ResultKey) -> bool:
        """May a memory copy be sent? (The folder checks its file still exists.)"""
        return True

    def prune(self, keep: set[ResultKey]) -> int:
        """At start, one coordinator alone on its store: delete images not in `keep`."""
        return 0

    def close(self) -> None:  # noqa: B027  (a folder has nothing to close)
        """Let go of connections (blocking)."""

    # --- the event loop's side -----------------------------------------------------------
    async def put(self, key: ResultKey, image: JobImage) -> None:
        """Durably, off the event loop (an image frame may be 32 MiB); images asked for while
        a write is under way go together in the next call. Raises `OSError` if this one
        could not be stored."""
        data = encode_message(image)
        batch = self._open
        batch.items.append((key, data))
        while not batch.done.is_set():
            writing = self._writing
            if writing is None:  # nobody is writing: this task writes everything queued
                current, self._open = self._open, _Batch()
                self._writing = current
                try:
                    current.errors = await trio.to_thread.run_sync(self._write_many, current.items)
                finally:
                    self._writing = None
                    current.done.set()
            else:
                await writing.done.wait()
        if batch.errors is None:
            raise StoreError("the image write did not finish")
        if (error := batch.errors.get(key)) is not None:
            raise error
        with self._lock:
            self._remember(key, image)

    def staged(self, key: ResultKey, image: JobImage) -> tuple[ResultStore, StagedImage]:
        """`image` ready for `db.Database.call_staged`: written by `write_group` in the
        database writer's staging thread, before the write it goes with is queued."""
        return self, StagedImage(key, encode_message(image), image)

    def joins(self, database: str) -> bool:
        """May these images' rows be written inside the transaction of `database` (the
        receipts' own commit, `db.Database.call_staged`) instead of by `write_group`
        beforehand? Only a store whose rows live in that very database."""
        return False

    def write_rows(self, conn: Any, items: list[StagedImage]) -> None:
        """Write `items` on `conn`, inside its open transaction (blocking; when `joins`)."""
        raise NotImplementedError

    def kept(self, items: list[StagedImage]) -> None:
        """`items` committed (`write_rows`): kept in memory as `write_group` keeps them."""
        with self._lock:
            for item in items:
                self._remember(item.key, item.image)

    def write_group(self, items: list[StagedImage]) -> list[BaseException | None]:
        """Store a group of staged images durably at once (blocking: the database writer's
        staging thread); per item, None or the error that kept it from being stored."""
        errors = self._write_many([(item.key, item.data) for item in items])
        with self._lock:
            for item in items:
                if item.key not in errors:
                    self._remember(item.key, item.image)
        return [errors.get(item.key) for item in items]

    async def get(self, key: ResultKey) -> JobImage | None:
        """The image stored under `key`, or None if it is missing or unreadable; raises
        `StoreError` when the store cannot be asked now (a database away: try later)."""
        from sogni_protocol.errors import InvalidMessage
        from sogni_protocol.messages import decode

        kept = self._memory.get(key)
        if kept is not None and self._in_memory_valid(key):
            return kept[0]
        try:
            data = await trio.to_thread.run_sync(self._read, key)
            frame = decode(data) if data is not None else None
        except StoreError:
            raise
        except (OSError, InvalidMessage):
            return None
        return frame if isinstance(frame, JobImage) else None

    async def discard(self, keys: Iterable[ResultKey]) -> None:
        """`remove` from the event loop (a store with a server deletes in a worker thread)."""
        self.remove(keys)

    def remove(self, keys: Iterable[ResultKey]) -> None:
        """Delete images (blocking: a worker thread), e.g. once their client has them."""
        wanted = list(keys)
        with self._lock:
            for key in wanted:
                self._forget(key)
        if wanted:
            self._delete(wanted)

    def sweep(self, max_age: float) -> int:
        """Delete what was stored more than `max_age` seconds ago (blocking); how many."""
        cutoff = time.monotonic() - max_age
        with self._lock:
            for key in [k for k, (_, t) in self._memory.items() if t < cutoff]:
                self._forget(key)
        return self._delete_older(max_age)

    async def run(self) -> None:
        """The retention sweep, for the coordinator's nursery: every `SWEEP_EVERY` seconds
        (a quarter of the retention if shorter), in a worker thread. Returns at once when
        nothing expires; a failed sweep is logged and tried at the next one."""
        try:
            if self.retention is None:
                await trio.sleep_forever()
            retention = self.retention
            every = min(SWEEP_EVERY, max(retention / 4, 0.05))
            while True:
                try:
                    swept = await trio.to_thread.run_sync(self.sweep, retention)
                except OSError as exc:
                    log.warning("result_sweep_failed", error=str(exc).splitlines()[0][:200])
                else:
                    if swept:
                        log.info("results_expired", images=swept, retention=retention)
                await trio.sleep(every)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    def _remember(self, key: ResultKey, image: JobImage) -> None:
        """Keep a just-stored image in memory if it fits; the caller holds the lock."""
        self._forget(key)
        if self._held + len(image.image) <= self.memory_bytes:
            self._memory[key] = (image, time.monotonic())
            self._held += len(image.image)

    def _forget(self, key: ResultKey) -> None:
        """Drop `key` from memory; the caller holds the lock."""
        kept = self._memory.pop(key, None)
        if kept is not None:
            self._held -= len(kept[0].image)
