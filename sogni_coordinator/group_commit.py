"""Receipts committed in groups, off the event loop.

A receipt must be durable (fsync) before its node hears "accepted". One fsync per receipt on
the trio thread would cap the coordinator at a few hundred receipts per second and stall
every stream meanwhile; instead each waiting result joins the next group, the group is
committed in one transaction in a worker thread, and then every waiter gets its answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from sogni_coordinator.job_state import JobState
from sogni_coordinator.store import Store
from sogni_protocol.messages import Receipt


@dataclass(eq=False)
class _Waiter:
    item: tuple[Receipt, bytes, bytes, JobState]
    done: trio.Event = field(default_factory=trio.Event)
    stored: bool = False
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[_Waiter] = []
        self._wake = trio.Event()

    async def commit(
        self,
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        state: JobState = JobState.DONE,
    ) -> bool:
        """Durably store a receipt and its job's new state (one transaction); False if the
        job already had a receipt or ended."""
        waiter = _Waiter((receipt, signature, request_id, state))
        self._pending.append(waiter)
        self._wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.stored

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            group, self._pending = self._pending, []
            if not group:
                continue
            try:
                stored = await trio.to_thread.run_sync(
                    self.store.store_receipts, [w.item for w in group]
                )
            except Exception as exc:  # e.g. disk full: every waiter hears it, none is acked
                for waiter in group:
                    waiter.error = exc
                    waiter.done.set()
                continue
            for waiter, ok in zip(group, stored, strict=True):
                waiter.stored = ok
                waiter.done.set()
