"""The shared queue's parts the coordinators use (PostgreSQL): leasing only the models a
coordinator's nodes serve, and burying jobs that must not run again."""

from __future__ import annotations

import psycopg
import pytest
import trio

from sogni_coordinator.queue import NewJob, QueueError, QueueState
from sogni_coordinator.queue.postgres import PostgresQueue


async def test_a_coordinator_leases_only_what_its_nodes_serve(pg_url: str) -> None:
    queue = await PostgresQueue.open(pg_url)
    try:
        await queue.enqueue(
            [
                NewJob(b"j1", b"r1", b"model-a"),
                NewJob(b"j2", b"r1", b"model-b"),
                NewJob(b"j3", b"r2", b"model-a"),
            ]
        )
        assert await queue.lease("c1", 10, 30, payloads=[]) == []
        leased = await queue.lease("c1", 10, 30, payloads=[b"model-b"])
        assert [x.job_id for x in leased] == [b"j2"]
        leased = await queue.lease("c2", 10, 30, payloads=[b"model-a", b"model-c"])
        assert [x.job_id for x in leased] == [b"j1", b"j3"]
        assert (await queue.counts())[QueueState.QUEUED] == 0
    finally:
        await queue.aclose()


async def test_buried_jobs_are_never_leased_again(pg_url: str) -> None:
    queue = await PostgresQueue.open(pg_url)
    try:
        await queue.enqueue([NewJob(b"j1", b"r1", b"m"), NewJob(b"j2", b"r1", b"m")])
        await queue.enqueue([NewJob(b"j3", b"r2", b"m")])
        (lease,) = await queue.lease("c1", 1, 30)
        assert lease.job_id == b"j1"
        # a cancelled request: its queued jobs end, the leased one runs on
        assert await queue.bury(request_id=b"r1") == [b"j2"]
        # a job given up on, leased or not
        assert sorted(await queue.bury([b"j1", b"j3"])) == [b"j1", b"j3"]
        assert await queue.bury([b"j1"]) == []  # once
        assert await queue.lease("c2", 10, 0) == []
        for job in (b"j1", b"j2", b"j3"):
            assert (await queue.status(job)).state is QueueState.DEAD
    finally:
        await queue.aclose()


async def test_a_queue_whose_connections_the_server_dropped_opens_them_again(
    pg_url: str,
) -> None:
    """A lost connection (server restart, failover, idle kill) costs one failed call and one
    early wake-up, not the coordinator: the next calls run on new connections."""
    queue = await PostgresQueue.open(pg_url)
    other = await PostgresQueue.open(pg_url)
    try:
        pids = [queue._conn.info.backend_pid, queue._listen.info.backend_pid]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await trio.sleep(0.2)
        with pytest.raises(QueueError, match="connection lost"):
            await queue.enqueue([NewJob(b"j1", b"r1", b"m")])
        await queue.enqueue([NewJob(b"j1", b"r1", b"m")])  # a new connection
        assert await queue.wait_for_work(2.0)  # the lost LISTEN wakes once, reconnects
        while await queue.wait_for_work(0.3):  # drain any stale wake-up
            pass
        await other.enqueue([NewJob(b"j2", b"r1", b"m")])  # NOTIFY on the new LISTEN
        assert await queue.wait_for_work(5.0)
        assert [x.job_id for x in await queue.lease("c1", 10, 30)] == [b"j1", b"j2"]
    finally:
        await queue.aclose()
        await other.aclose()
