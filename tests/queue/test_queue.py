"""The shared job queue, the same tests on both engines (SQLite file, real PostgreSQL)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
import trio.testing

from sogni_coordinator.db import SchemaTooNew
from sogni_coordinator.queue import (
    AlreadyCompleted,
    DuplicateJob,
    JobNotLive,
    LeaseLost,
    NewJob,
    QueueError,
    QueueState,
    UnknownJob,
)

Engine = Any  # tests/queue/conftest.py's Engine (conftests are not importable here)


def jid(i: int) -> bytes:
    return i.to_bytes(4, "big") + b"job"


def jobs(*ids: int, max_attempts: int = 3) -> list[NewJob]:
    return [NewJob(jid(i), b"req", f"params {i}".encode(), max_attempts) for i in ids]


async def test_lease_takes_oldest_first_and_complete_records_the_receipt(engine: Engine) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1, 2, 3))
    first = await q.lease("coord-a", 2, 60)
    assert [lease.job_id for lease in first] == [jid(1), jid(2)]
    assert [lease.attempt for lease in first] == [1, 1]
    assert first[0].payload == b"params 1" and first[0].owner == "coord-a"
    assert first[0].expires_at > time.time() + 50
    rest = await q.lease("coord-a", 5, 60)
    assert [lease.job_id for lease in rest] == [jid(3)]
    assert await q.lease("coord-a", 5, 60) == []  # leased jobs are not taken again

    await q.complete(jid(1), b"receipt-1", "coord-a")
    status = await q.status(jid(1))
    assert status.state is QueueState.DONE and status.receipt_id == b"receipt-1"
    assert status.owner is None
    counts = await q.counts()
    assert counts[QueueState.DONE] == 1 and counts[QueueState.LEASED] == 2
    assert counts[QueueState.QUEUED] == 0


async def test_enqueue_is_all_or_none_and_refuses_a_known_id(engine: Engine) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1, 2))
    with pytest.raises(DuplicateJob, match=jid(1).hex()[:12]):
        await q.enqueue(jobs(3, 1))
    with pytest.raises(UnknownJob):
        await q.status(jid(3))  # the batch was refused whole
    with pytest.raises(QueueError, match="max_attempts"):
        await q.enqueue(jobs(4, max_attempts=0))


async def test_expired_lease_goes_to_another_coordinator_and_the_old_one_is_locked_out(
    engine: Engine,
) -> None:
    a, b = await engine.open(), await engine.open()
    await a.enqueue(jobs(1))
    [old] = await a.lease("coord-a", 1, 0)  # expires at once: coord-a "died"
    [new] = await b.lease("coord-b", 1, 60)
    assert new.job_id == jid(1) and new.attempt == 2 and new.owner == "coord-b"
    with pytest.raises(LeaseLost):
        await a.renew(old, 60)
    with pytest.raises(LeaseLost):
        await a.release(old)  # cannot hand back coord-b's lease
    status = await b.status(jid(1))
    assert (status.state, status.owner, status.attempts) == (QueueState.LEASED, "coord-b", 2)
    # a node with coord-a's finished result delivers it to coord-b: one receipt wins
    await b.complete(jid(1), b"receipt-late", "coord-b")
    with pytest.raises(AlreadyCompleted):
        await b.complete(jid(1), b"receipt-other", "coord-b")
    with pytest.raises(LeaseLost):
        await b.renew(new, 60)


async def test_attempts_are_counted_and_exhausted_jobs_go_to_the_dead_letter(
    engine: Engine,
) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1, max_attempts=2))
    await q.lease("coord-a", 1, 0)
    expired = await q.expire()
    assert expired.requeued == (jid(1),) and expired.dead == ()
    [second] = await q.lease("coord-a", 1, 0)
    assert second.attempt == 2
    expired = await q.expire()
    assert expired.requeued == () and expired.dead == (jid(1),)
    assert await q.lease("coord-a", 1, 60) == []
    status = await q.status(jid(1))
    assert (status.state, status.attempts, status.max_attempts) == (QueueState.DEAD, 2, 2)
    with pytest.raises(JobNotLive):
        await q.complete(jid(1), b"receipt", "coord-a")
    assert (await q.status(jid(1))).receipt_id is None  # the refused receipt left no row


async def test_release_requeues_until_attempts_run_out(engine: Engine) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1, max_attempts=2))
    [lease] = await q.lease("coord-a", 1, 60)
    assert await q.release(lease) is QueueState.QUEUED
    with pytest.raises(LeaseLost):
        await q.release(lease)  # released once
    [lease] = await q.lease("coord-a", 1, 60)
    assert await q.release(lease) is QueueState.DEAD


async def test_renew_extends_a_live_lease_only(engine: Engine) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1))
    [lease] = await q.lease("coord-a", 1, 30)
    renewed = await q.renew(lease, 600)
    assert renewed.expires_at > lease.expires_at + 500
    assert (await q.expire()).requeued == ()
    stolen = type(lease)(
        lease.job_id, lease.request_id, lease.payload, "coord-b", lease.attempt, lease.expires_at
    )
    with pytest.raises(LeaseLost):
        await q.renew(stolen, 600)  # another owner's name does not renew it
    lapsing = await q.renew(renewed, 0)
    assert lapsing.attempt == 1
    with pytest.raises(LeaseLost):
        await q.renew(lapsing, 600)  # expired (ttl 0) before anyone swept it


async def test_second_receipt_is_refused_by_the_database_constraint(engine: Engine) -> None:
    q = await engine.open()
    await q.enqueue(jobs(1, 2))
    await q.complete(jid(1), b"receipt-1", "coord-a")
    with pytest.raises(AlreadyCompleted):
        await q.complete(jid(1), b"receipt-1b", "coord-b")
    with pytest.raises(QueueError, match="another job"):
        await q.complete(jid(2), b"receipt-1", "coord-a")  # one receipt, one job
    # bypassing the code: the table itself refuses a second receipt for the job
    with pytest.raises(engine.integrity_error):
        engine.execute(
            "INSERT INTO queue_receipts (job_id, receipt_id, coordinator_id, completed_at)"
            " VALUES (?, ?, ?, ?)",
            (jid(1), b"forged", "coord-x", 0.0),
        )
    with pytest.raises(UnknownJob):
        await q.complete(jid(9), b"receipt-9", "coord-a")
    assert (await q.status(jid(1))).receipt_id == b"receipt-1"


async def test_bad_lease_arguments_are_refused(engine: Engine) -> None:
    q = await engine.open()
    with pytest.raises(QueueError, match="n must be"):
        await q.lease("coord-a", 0, 60)
    with pytest.raises(QueueError, match="coordinator id"):
        await q.lease("", 1, 60)
    with pytest.raises(QueueError, match="ttl"):
        await q.lease("coord-a", 1, -1)


async def test_concurrent_coordinators_never_hold_one_job_at_once(engine: Engine) -> None:
    handles = [await engine.open() for _ in range(3)]
    total = 90
    await handles[0].enqueue(jobs(*range(total)))
    taken: dict[bytes, list[str]] = {}

    async def coordinator(i: int) -> None:
        owner = f"coord-{i}"
        q = handles[i]
        while leases := await q.lease(owner, 4, 600):
            for lease in leases:
                taken.setdefault(lease.job_id, []).append(owner)
                await q.complete(lease.job_id, b"r" + lease.job_id, owner)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(coordinator, i)
    assert sorted(taken) == sorted(jid(i) for i in range(total))
    assert all(len(owners) == 1 for owners in taken.values())
    assert (await handles[1].counts())[QueueState.DONE] == total
    if engine.name == "postgres":  # separate connections really did share the work
        assert len({owners[0] for owners in taken.values()}) >= 2


async def test_concurrent_receipts_for_one_job_one_wins(engine: Engine) -> None:
    a, b = await engine.open(), await engine.open()
    await a.enqueue(jobs(*range(20)))
    outcomes: list[str] = []

    async def complete(q: Any, owner: str, i: int) -> None:
        try:
            await q.complete(jid(i), f"{owner}-{i}".encode(), owner)
            outcomes.append("won")
        except AlreadyCompleted:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(complete, a, "coord-a", i)
            nursery.start_soon(complete, b, "coord-b", i)
    assert outcomes.count("won") == 20 and outcomes.count("refused") == 20


async def test_enqueue_wakes_a_waiting_coordinator(engine: Engine) -> None:
    a, b = await engine.open(), await engine.open()
    assert await b.lease("coord-b", 1, 60) == []
    assert await b.wait_for_work(0.1) is False  # nothing queued: times out
    woken: list[bool] = []

    async def waiter() -> None:
        woken.append(await b.wait_for_work(20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        started = time.monotonic()
        await a.enqueue(jobs(1))
    assert woken == [True] and time.monotonic() - started < 10
    assert [lease.job_id for lease in await b.lease("coord-b", 1, 60)] == [jid(1)]


async def test_a_wake_up_between_an_empty_lease_and_the_wait_is_not_lost(
    engine: Engine,
) -> None:
    a, b = await engine.open(), await engine.open()
    assert await b.lease("coord-b", 1, 60) == []
    await a.enqueue(jobs(1))  # before b starts waiting
    with trio.fail_after(5):
        assert await b.wait_for_work(60) is True


async def test_released_job_wakes_the_others(engine: Engine) -> None:
    a, b = await engine.open(), await engine.open()
    await a.enqueue(jobs(1))
    [lease] = await a.lease("coord-a", 1, 60)
    assert await b.lease("coord-b", 1, 60) == []
    await a.release(lease)
    with trio.fail_after(5):
        assert await b.wait_for_work(60) is True
    assert [x.attempt for x in await b.lease("coord-b", 1, 60)] == [2]


async def test_migrations_apply_once_and_a_newer_schema_is_refused(engine: Engine) -> None:
    a = await engine.open()
    await a.enqueue(jobs(1))
    b = await engine.open()  # opening again keeps the rows
    assert (await b.status(jid(1))).state is QueueState.QUEUED
    engine.execute("UPDATE schema_versions SET version = 99 WHERE component = 'job_queue'")
    for handle in engine.handles:
        await handle.aclose()
    with pytest.raises(SchemaTooNew, match="99"):
        await engine.open()


async def test_higher_priority_is_leased_first_then_first_in(engine: Engine) -> None:
    """The payer's stake tier orders the shared queue: every coordinator leases a higher
    tier's jobs first, and within a tier the oldest first."""
    q = await engine.open()
    await q.enqueue([NewJob(jid(1), b"r1", b"p"), NewJob(jid(2), b"r1", b"p")])
    await q.enqueue([NewJob(jid(3), b"r2", b"p", priority=2)])
    await q.enqueue([NewJob(jid(4), b"r3", b"p", priority=1)])
    leased = await q.lease("coord-a", 3, 60)
    assert [(x.job_id, x.priority) for x in leased] == [(jid(3), 2), (jid(4), 1), (jid(1), 0)]
    assert [x.job_id for x in await q.lease("coord-b", 5, 60)] == [jid(2)]
