"""Receipts committed in groups, off the event loop.

A receipt must be durable (fsync) before its node hears "accepted". One fsync per receipt on
the trio thread would cap the coordinator at a few hundred receipts per second and stall
every stream meanwhile; instead each receipt joins the database file's write queue
(`db.Database.call`), whose writer commits everything queued (receipts, ledger settlements,
reputation updates) in one transaction in a worker thread, and then every waiter gets its
answer. `run` is that writer; the dispatcher runs it in its nursery. The receipt's image
rides along (`image`: `ResultStore.staged`): the writer's second worker thread stores the
waiting images durably at once (a folder: `syncfs`) while the previous group commits, and
only then queues their receipts for the next group, so the image is on disk before the
receipt that points at it commits, and the job waits on one queued write, not two.
"""

from __future__ import annotations

from sogni_coordinator.db import Stage
from sogni_coordinator.job_state import JobState
from sogni_coordinator.store import Store
from sogni_protocol.crashpoints import crashpoint
from sogni_protocol.messages import JobOffer, Receipt


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def commit(
        self,
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        state: JobState = JobState.DONE,
        offer: tuple[JobOffer, bytes] | None = None,
        image: Stage | None = None,
    ) -> bool:
        """Durably store a receipt (with the signed offer it answers) and its job's new state
        (one savepoint in the group's transaction), after its `image` is durable; False if
        the job already had a receipt or ended. Raises what the write raised (`db.DatabaseBusy`
        when another process held the file too long; the image's `OSError`, and then the
        receipt was not written)."""
        crashpoint("coordinator_before_receipt_commit")
        stored = await self.store.call_staged(
            image, self.store.store_receipt, receipt, signature, request_id, state, offer
        )
        crashpoint("coordinator_after_receipt_commit")
        return stored

    async def run(self) -> None:
        """The writer of the store's database file (shared with the ledger and reputation)."""
        await self.store.run_writer()
