"""Each image reaches its client exactly once, across lost streams and coordinator restarts.

An image is put in the result store (`sogni_coordinator.results`: a folder by default, or
the network's PostgreSQL) as the `JobImage` frame the client will get, before its receipt
is committed, so whatever the store counts as deliverable is stored. A `Mailbox` is what
one request owes its client: the images not yet acknowledged (their `ResultKey`s; the store
also keeps the latest images it stored in memory, 64 MiB at most, so a slow or absent
client costs storage, not unbounded memory), failures, the latest progress per job, and
the final `RequestDone` once every job has ended. A client stream reads it through a
`Cursor`, which yields each of those once per attachment; the client's `ImageAck` marks an
image delivered in the store and its stored image is deleted. A new
attachment (a resume) supersedes the old one and starts again from what is unacknowledged,
so an image lost in flight is sent again and the client drops a copy it already has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import trio

from sogni_coordinator.log_ids import SHORT_HEX, short
from sogni_coordinator.results import FolderResults, ResultKey, ResultStore, StoreError
from sogni_coordinator.store import DeliveryRecord
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobFailed, JobProgress, Message, RequestDone

log = get_logger(__name__)

__all__ = ["SHORT_HEX", "Cursor", "Mailbox", "ResultFiles", "short"]

ResultFiles = FolderResults
"""The folder store's former name."""
READ_RETRY = 1.0
"""Seconds before an image the store could not be asked for is asked for again."""
LOST_IMAGE = "the coordinator lost this image's file; its receipt is stored"


@dataclass(eq=False)
class Mailbox:
    """What one request owes its client, and which attachment (stream) reads it now."""

    request_id: bytes
    job_ids: list[bytes]
    _pending: dict[bytes, ResultKey] = field(default_factory=dict, repr=False)
    """Receipted, stored, not acknowledged: job id -> its image, in the order to send them.
    Written only by `add_image` and `acknowledge` (a cursor's `arrivals` must see every
    image added); read through `pending`."""
    _failed: dict[bytes, JobFailed] = field(default_factory=dict, repr=False)
    """Written only by `add_failure` (likewise `failures`); read through `failed`."""
    acked: set[bytes] = field(default_factory=set)
    acking: set[bytes] = field(default_factory=set)
    """Acknowledged by the client, the record and file removal still in a worker thread: not
    sent again, and counted as acked by a resume (the file may already be gone)."""
    progress: dict[bytes, JobProgress] = field(default_factory=dict)
    """The latest progress per job not yet sent: coalesced, so bounded by the job count."""
    done: RequestDone | None = None
    """Set once every job has ended."""
    generation: int = 0
    attached: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    arrivals: list[bytes] = field(default_factory=list)
    """Job ids in the order their images arrived (`add_image`), and `failures` of failed
    jobs (`add_failure`): append-only, so a cursor walks each once from its position
    instead of rescanning `pending` and `failed` for every message (O(1) amortised)."""
    failures: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Images and failures given to the constructor arrive in their dicts' order."""
        if not self.arrivals:
            self.arrivals.extend(self._pending)
        if not self.failures:
            self.failures.extend(self._failed)
        self._pending_view = MappingProxyType(self._pending)
        self._failed_view = MappingProxyType(self._failed)

    @property
    def pending(self) -> Mapping[bytes, ResultKey]:
        """Images owed and not acknowledged (read-only: `add_image`, `acknowledge`)."""
        return self._pending_view

    @property
    def failed(self) -> Mapping[bytes, JobFailed]:
        """Failures owed (read-only: `add_failure`)."""
        return self._failed_view

    @classmethod
    def from_record(cls, record: DeliveryRecord, files: ResultStore) -> Mailbox:
        """A mailbox rebuilt from the store (after a restart, or for a collect later)."""
        box = cls(record.request_id, list(record.job_ids), acked=set(record.acked))
        for job_id, index, offer_hash in record.pending:
            box.add_image(job_id, files.key(record.request_id, index, offer_hash))
        for job_id, index in record.failed:
            box.add_failure(
                JobFailed(
                    job_id=job_id, index=index, reason="the coordinator gave up on this image"
                )
            )
        if record.live == 0:
            box.done = RequestDone(
                request_id=record.request_id,
                delivered=record.delivered,
                failed=len(record.failed),
                cancelled=record.cancelled,
            )
        return box

    def add_image(self, job_id: bytes, key: ResultKey) -> None:
        """A receipted, stored image is owed to the client (the caller notifies)."""
        self._pending[job_id] = key
        self.arrivals.append(job_id)

    def add_failure(self, failed: JobFailed) -> None:
        """A job ended without an image: the client is told once (the caller notifies)."""
        self._failed[failed.job_id] = failed
        self.failures.append(failed.job_id)

    def acknowledge(self, job_id: bytes) -> None:
        """The client's acknowledgement of an image is durable: no longer owed."""
        self._pending.pop(job_id, None)
        self.acked.add(job_id)

    def notify(self) -> None:
        """Wake the attached cursor."""
        event, self.changed = self.changed, trio.Event()
        event.set()

    def attach(self, files: ResultStore) -> Cursor:
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
    process stored them lately, else read from the store one at a time), failures and finally
    `RequestDone`, each once; stops when superseded.

    It walks the mailbox's `arrivals` and `failures` once each from a position, so a message
    costs O(1) amortised however many images the client leaves unacknowledged. An image passed while
    its acknowledgement was being written (`acking`) is set aside and looked at again, as
    that write may fail and the image is then still owed."""

    def __init__(self, box: Mailbox, generation: int, files: ResultStore) -> None:
        self.box = box
        self.generation = generation
        self.files = files
        self.sent: set[bytes] = set()
        self.position = 0
        """How far into `box.arrivals` this cursor has looked."""
        self.failure_position = 0
        """How far into `box.failures`."""
        self.deferred: dict[bytes, None] = {}
        """Images passed while `acking`: looked at again until acknowledged or sent."""
        self.finished = False
        """`RequestDone` was handed out."""

    @property
    def superseded(self) -> bool:
        return self.box.generation != self.generation

    def _next_image(self) -> bytes | None:
        """The next image to send, in arrival order (set-aside ones first); None if none."""
        box = self.box
        for job_id in list(self.deferred):
            if job_id not in box._pending or job_id in self.sent:
                del self.deferred[job_id]  # acknowledged, or sent meanwhile
            elif job_id not in box.acking:
                return job_id
        arrivals = box.arrivals
        while self.position < len(arrivals):
            job_id = arrivals[self.position]
            if job_id in box._pending and job_id not in self.sent:
                if job_id not in box.acking:
                    return job_id  # the position moves past it once it is sent
                self.deferred[job_id] = None
            self.position += 1
        return None

    def _next_failure(self) -> bytes | None:
        """The next failure not yet sent, in arrival order; None if none."""
        box = self.box
        failures = box.failures
        while self.failure_position < len(failures):
            job_id = failures[self.failure_position]
            self.failure_position += 1
            if job_id not in self.sent:
                return job_id
        return None

    async def next(self) -> Message | None:
        """The next message ready now, or None if there is none (or the cursor ended)."""
        box = self.box
        while not (self.finished or self.superseded):
            while box.progress:
                progress = box.progress.pop(next(iter(box.progress)))
                if progress.job_id not in box._pending and progress.job_id not in self.sent:
                    return progress
            job_id = self._next_image()
            if job_id is not None:
                key = box._pending[job_id]
                try:
                    image = await self.files.get(key)
                except StoreError as exc:  # the database is away: not lost, sent later
                    log.warning(
                        "result_read_failed", request=short(box.request_id), error=str(exc)[:200]
                    )
                    await trio.sleep(READ_RETRY)
                    continue
                if job_id not in box._pending:
                    continue  # acknowledged meanwhile (an earlier stream)
                if job_id in box.acking:
                    self.deferred[job_id] = None
                    continue
                self.sent.add(job_id)
                if image is None or image.job_id != job_id:
                    log.error("result_file_missing", request=short(box.request_id), file=key.name)
                    return JobFailed(job_id=job_id, index=key.index, reason=LOST_IMAGE)
                return image
            failed = self._next_failure()
            if failed is not None:
                self.sent.add(failed)
                return box._failed[failed]
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
