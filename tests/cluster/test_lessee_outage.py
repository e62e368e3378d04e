"""The network's PostgreSQL goes away for 30 s while a request owned by A is rendered by
B's node: both coordinators keep running, and once it is back nothing accepted is lost (the
request completes, each image is billed once)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio

from sogni_app.api import authorize
from sogni_coordinator.ledger import ASSETS, Ledger, reserved_account
from sogni_coordinator.storage.postgres import PgConnection
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import JobImage, Ready, RequestDone, ResultAck
from sogni_protocol.pricing import quote

from ..e2e.conftest import receive_skipping, tiny_request
from ..e2e.rogue_kit import heartbeats
from .conftest import paying_account, pg_rows, submit, two_and_a_node

OUTAGE = 30.0
A_LATE = 4.0
"""Seconds after the database is back before A beats again (B beats at once)."""


def _admin(url: str) -> tuple[str, str]:
    """A URL to the server's `postgres` database, and the test database's name."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    return urlunsplit(parts._replace(path="/postgres", query="")), name


def cut(url: str, down: bool) -> None:
    """Refuse (`down`) or allow new connections to the test's database; on refusal every
    open one is ended, as a server that went away would."""
    admin, name = _admin(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if down else "true"}')
        if down:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


async def test_the_block_watcher_outlives_a_round_the_database_failed() -> None:
    """What ended both coordinators 2 s into the outage below: the reports poll raised the
    store's `sqlite3.OperationalError` out of `block_watch.watch`, in the coordinator's
    nursery. It should log, keep the blocks it has and poll again."""
    from types import SimpleNamespace

    from sogni_coordinator.block_watch import watch

    calls = 0

    def refresh() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("connection failed: the server is away")

    reports = SimpleNamespace(refresh=refresh, blocked_payers=set(), blocked_nodes=set())
    dispatcher = SimpleNamespace(blocked_payers=None, router=SimpleNamespace(), nodes={})
    with trio.move_on_after(0.5):
        await watch(reports, dispatcher, interval=0.05)  # type: ignore[arg-type]
    assert calls > 1


async def test_thirty_seconds_without_the_database_lose_nothing_accepted(
    tmp_path: Path, pg_url: str
) -> None:
    """Paid request of 2 images at A, B's node renders the first; the database refuses
    every connection for 30 s (longer than the lease and the live window). Then: both
    coordinators run, A still owns the request (B, back first, did not take A's stale
    heartbeat for its death), B kept its lapsed lease (nobody swept it: its node was not
    stopped), the result is stored (the store's connection reconnects), both images reach
    A's client and the payer is charged for two images once (the reports watcher outlives
    the failed polls: the test above)."""
    payer = paying_account(pg_url)
    req = tiny_request(2, seed=41)
    per_image = quote(req).per_image.spark_micro
    try:
        async with (
            two_and_a_node(tmp_path, pg_url, 5.0) as (a, b, client, node),
            trio.open_nursery() as beats,
        ):
            assert node.channel is not None
            beats.start_soon(heartbeats, node.channel)
            channel, accepted = await submit(
                client, a, authorize(req, bytes(payer.key), a.net.domain)
            )
            offer = await node.offer()
            # A is the slower to come back: its first heartbeat after the outage is late
            a_cluster = a.running.dispatcher.cluster
            a_back = trio.Event()
            beat = a_cluster._adopt_orphans

            async def late_beat() -> None:
                await a_back.wait()
                await beat()

            a_cluster._adopt_orphans = late_beat
            await trio.to_thread.run_sync(cut, pg_url, True)
            await trio.sleep(OUTAGE)
            await trio.to_thread.run_sync(cut, pg_url, False)
            await trio.sleep(A_LATE)
            a_back.set()
            assert not a.stopped.is_set() and not b.stopped.is_set()
            # B was cut off as long: A's stale heartbeat is not taken for its death
            rid = accepted.request_id
            owner = pg_rows(pg_url, "SELECT owner FROM cluster_requests")
            assert owner == [(a_cluster.me,)], owner
            # B's lease lapsed in the outage but nobody swept it: kept, its node not stopped
            b_cluster = b.running.dispatcher.cluster
            job_id = offer.offer.job_id
            assert job_id in b_cluster.leases and job_id in b.running.dispatcher.jobs
            leased = pg_rows(
                pg_url, "SELECT lease_owner, attempts FROM queue_jobs WHERE job_id = %s", job_id
            )
            assert leased == [(b_cluster.me, 1)], leased
            await node.channel.send(node.result(offer, a.net.domain))
            ack = await receive_skipping(node.channel, (ResultAck,), 30)
            assert ack.accepted, ack.reason
            await node.channel.send(Ready(slots=1))  # its slot is free again
            second = await node.offer(30)
            await node.deliver(second, a.net.domain)
            images = set()
            with trio.fail_after(30):
                while True:
                    msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=30)
                    if isinstance(msg, JobImage):
                        images.add(msg.job_id)
                    if isinstance(msg, RequestDone):
                        break
            assert msg.delivered == 2 and images == set(accepted.job_ids)
            ledger = Ledger(pg_url)
            with trio.fail_after(20):
                while sum(ledger.balance(reserved_account(rid)).values()) != 0:
                    await trio.sleep(0.1)
            assert not a.stopped.is_set() and not b.stopped.is_set()
            beats.cancel_scope.cancel()
        assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - 2 * per_image
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)
        assert pg_rows(pg_url, "SELECT count(*) FROM receipts") == [(2,)]
    finally:
        ledger.close()


def test_a_store_connection_whose_reconnect_failed_reconnects_once_the_server_is_back(
    pg_url: str,
) -> None:
    """A statement while the database refuses connections fails (its reconnect too), and
    the next one after the database is back runs on a new connection: before, the failed
    reconnect left a closed connection that read as "in a transaction", so every later
    statement failed with "the connection is closed" until the coordinator restarted (no
    receipt stored, no job state written, however long the database had been back)."""
    conn = PgConnection(pg_url, lock_timeout_s=5)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        cut(pg_url, True)
        try:
            for _ in range(2):
                with pytest.raises(sqlite3.OperationalError):
                    conn.execute("SELECT COUNT(*) FROM t")
        finally:
            cut(pg_url, False)
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
    finally:
        conn.close()
