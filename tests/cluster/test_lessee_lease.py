"""A lessee cut off from the database longer than its lease (an outage, a stall) while its
node renders: the lease nobody swept meanwhile is kept when it renews (the render goes on,
nothing runs twice); one that was swept or taken over is lost, as before."""

from __future__ import annotations

import pytest
import trio

from sogni_coordinator.queue import LeaseLost, NewJob, QueueState
from sogni_coordinator.queue.postgres import PostgresQueue


async def test_a_lapsed_lease_nobody_swept_is_kept_and_a_swept_one_is_lost(pg_url: str) -> None:
    a, b = await PostgresQueue.open(pg_url), await PostgresQueue.open(pg_url)
    try:
        await a.enqueue([NewJob(b"j1", b"r1", b"m"), NewJob(b"j2", b"r1", b"m")])
        [one] = await a.lease("coord-a", 1, 0.2)
        await trio.sleep(0.4)  # lapsed; no coordinator leased since, so none swept it
        with pytest.raises(LeaseLost):
            await a.renew(one, 60)  # a live lease only, as before
        kept = await a.renew(one, 60, lapsed=True)
        assert (kept.job_id, kept.attempt) == (b"j1", 1) and kept.expires_at > one.expires_at
        [two] = await b.lease("coord-b", 5, 0)  # j2; j1's lease stands again: not swept
        assert two.job_id == b"j2"
        status = await b.status(b"j1")
        assert (status.state, status.owner, status.attempts) == (QueueState.LEASED, "coord-a", 1)
        # j2's lease lapsed at once and a sweep returned it to the queue: lost for good
        assert (await b.expire()).requeued == (b"j2",)
        with pytest.raises(LeaseLost):
            await b.renew(two, 60, lapsed=True)
        [again] = await a.lease("coord-a", 5, 60)
        assert (again.job_id, again.attempt) == (b"j2", 2)
        with pytest.raises(LeaseLost):
            await b.renew(two, 60, lapsed=True)  # the next holder's lease is not renewed
    finally:
        await a.aclose()
        await b.aclose()
