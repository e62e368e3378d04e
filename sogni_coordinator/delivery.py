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

from dataclasses import dataclass, field

import trio

from sogni_coordinator.results import FolderResults, ResultKey, ResultStore, StoreError
from sogni_coordinator.store import DeliveryRecord
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobFailed, JobProgress, Message, RequestDone

log = get_logger(__name__)

__all__ = ["Cursor", "Mailbox", "ResultFiles", "short"]

ResultFiles = FolderResults
"""The folder store's former name."""
READ_RETRY = 1.0
"""Seconds before an image the store could not be asked for is asked for again."""
LOST_IMAGE = "the coordinator lost this image's file; its receipt is stored"


def short(request_id: bytes) -> str:
    """A request id for logs: a prefix, never the whole id."""
    return request_id.hex()[:12]


@dataclass(eq=False)
class Mailbox:
    """What one request owes its client, and which attachment (stream) reads it now."""

    request_id: bytes
    job_ids: list[bytes]
    pending: dict[bytes, ResultKey] = field(default_factory=dict)
    """Receipted, stored, not acknowledged: job id -> its image, in the order to send them."""
    failed: dict[bytes, JobFailed] = field(default_factory=dict)
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

    @classmethod
    def from_record(cls, record: DeliveryRecord, files: ResultStore) -> Mailbox:
        """A mailbox rebuilt from the store (after a restart, or for a collect later)."""
        box = cls(record.request_id, list(record.job_ids), acked=set(record.acked))
        for job_id, index, offer_hash in record.pending:
            box.pending[job_id] = files.key(record.request_id, index, offer_hash)
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
    `RequestDone`, each once; stops when superseded."""

    def __init__(self, box: Mailbox, generation: int, files: ResultStore) -> None:
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
            job_id = next(
                (j for j in box.pending if j not in self.sent and j not in box.acking), None
            )
            if job_id is not None:
                key = box.pending[job_id]
                try:
                    image = await self.files.get(key)
                except StoreError as exc:  # the database is away: not lost, sent later
                    log.warning(
                        "result_read_failed", request=short(box.request_id), error=str(exc)[:200]
                    )
                    await trio.sleep(READ_RETRY)
                    continue
                if job_id not in box.pending or job_id in box.acking:
                    continue  # acknowledged meanwhile (an earlier stream)
                self.sent.add(job_id)
                if image is None or image.job_id != job_id:
                    log.error("result_file_missing", request=short(box.request_id), file=key.name)
                    return JobFailed(job_id=job_id, index=key.index, reason=LOST_IMAGE)
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
