"""What a coordinator of a cluster takes over from one that stopped, or from its own run
before a restart (real PostgreSQL, real libp2p on 127.0.0.1, rogue nodes signing real
receipts):

- a receipt held by a check whose coordinator died is checked by the next lessee of its
  job (before: the job was buried as ended and its request never ended);
- a job this coordinator renders, leased again by it after its own lease lapsed, stays
  leased (before: buried while its node rendered it);
- a request whose owner restarts within the orphan window, its jobs ended but its
  reservation open, is settled by the restarted owner (before: held for good).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.queue.postgres import PostgresQueue
from sogni_coordinator.service import run_coordinator
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    JobImage,
    RequestDone,
    RequestRefused,
    ResultAck,
)

from ..e2e.conftest import receive_skipping, tiny_request
from ..e2e.rogue_kit import wire
from .conftest import MODEL, Rogue, start_cluster, submit
from .conftest import pg_rows as _rows
from .test_cluster_gaps import _held_result, _kept_alive, _until_rows


def _funded_payer(pg_url: str) -> Any:
    """A new payer account credited 1 Spark in the network's ledger."""
    payer = Account.create()
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(payer.address, 1)
    finally:
        ledger.close()
    return payer


QUICK_RECHECK = VerificationConfig(
    rate=1.0, challenge_timeout=30.0, verify_timeout=30.0, restart_recheck_timeout=1.0
)
"""Every receipt checked; a check taken over waits 1 s for a verifier (none comes)."""


async def test_a_receipt_held_by_a_coordinator_that_died_is_checked_by_the_next_lessee(
    tmp_path: Path, pg_url: str
) -> None:
    """B holds the node's receipt for a check and dies before the node answers. B's lease
    lapses; A leases the job, finds its receipt held, and runs the check itself once the
    node connects to it: A challenges the node, the answer passes (no verifier: skipped,
    released as a pass), the queue row is done and A, the owner, delivers the image."""
    async with (
        start_cluster(
            tmp_path,
            pg_url,
            ["a", "b"],
            lease_seconds=2.0,
            models=[MODEL],
            verification=QUICK_RECHECK,
        ) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        channel, _ = await submit(client, a, tiny_request(1, seed=31))
        async with trio.open_nursery() as beats:
            await _kept_alive(node, b, beats)
            assert node.channel is not None
            offer = await node.offer()
            committed = await _held_result(node, b, offer, seed=5)
            await receive_skipping(node.channel, (Challenge,), 20)  # held at B: not answered
            beats.cancel_scope.cancel()
        await b.kill()
        async with trio.open_nursery() as beats:
            await _kept_alive(node, a, beats)  # the same peer, with credit: A leases the job
            assert node.channel is not None
            challenge = await receive_skipping(node.channel, (Challenge,), 30)
            assert challenge.job_id == offer.offer.job_id
            answer = ChallengeAnswer(
                job_id=challenge.job_id, openings=[wire(committed, k) for k in challenge.steps]
            )
            await node.channel.send(answer, limit=RESULT_FRAME_LIMIT)
            image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
            assert image.job_id == offer.offer.job_id
            done = await receive_skipping(channel, (RequestDone,), 20)
            assert done.delivered == 1
            beats.cancel_scope.cancel()
    assert _rows(pg_url, "SELECT state FROM queue_jobs") == [("done",)]
    assert _rows(pg_url, "SELECT state FROM checks") == [("skipped",)]
    assert _rows(pg_url, "SELECT count(*) FROM failed_receipts") == [(0,)]


async def test_a_job_leased_again_by_its_own_renderer_stays_leased(
    tmp_path: Path, pg_url: str
) -> None:
    """B's lease on a job its node renders lapses (as in an outage) and B's own lease loop
    leases it again: B keeps it (renewed under the new lease) and the node's result
    completes it. Before, B buried the job it was rendering ("already taken here")."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=30.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
        open_host(key_path=None, listen=()) as other,
        trio.open_nursery() as beats,
    ):
        a, b = m["a"], m["b"]
        node, second = Rogue(host, Account.create()), Rogue(other, Account.create())
        await _kept_alive(node, b, beats)
        channel, _ = await submit(client, a, tiny_request(1, seed=32))
        offer = await node.offer()
        job_state = "SELECT state, attempts FROM queue_jobs"
        await _until_rows(pg_url, job_state, [("leased", 1)], 5)
        with psycopg.connect(
            pg_url, autocommit=True
        ) as conn:  # the lease lapses: B missed its renewals
            conn.execute("UPDATE queue_jobs SET lease_expires = 0")
        await _kept_alive(second, b, beats)  # credit at B: its lease loop leases it again
        await _until_rows(pg_url, job_state, [("leased", 2)], 10)
        leases = b.running.dispatcher.cluster.leases  # the new lease, once `_take` has it
        with trio.fail_after(10):
            while (lease := leases.get(offer.offer.job_id)) is None or lease.attempt != 2:
                await trio.sleep(0.05)
        await node.deliver(offer, b.net.domain)
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
        beats.cancel_scope.cancel()
    assert _rows(pg_url, job_state) == [("done", 2)]


async def test_an_owner_restarted_in_the_orphan_window_settles_its_ended_requests(
    tmp_path: Path, pg_url: str
) -> None:
    """A owns a paid request whose job B's node renders. A dies, B receipts the job, A
    comes back within the orphan window (so B never adopts the request): A's restore bills
    the image from the reservation and closes it. Before, A only restored requests with
    live jobs, and the reservation stayed open (the payer's funds held) for good."""
    payer = _funded_payer(pg_url)
    reservation = "SELECT state FROM ledger_reservations"
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=30.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
        trio.open_nursery() as nursery,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        await _kept_alive(node, b, nursery)
        paid = authorize(tiny_request(1, seed=33), bytes(payer.key), a.net.domain)
        await submit(client, a, paid)
        offer = await node.offer()
        await a.kill()
        await node.deliver(offer, b.net.domain)  # receipted at B; its owner is down
        assert _rows(pg_url, reservation) == [("open",)]
        await nursery.start(run_coordinator, a.config, a.signer)  # A again, same key
        await _until_rows(pg_url, reservation, [("closed",)], 10)
        nursery.cancel_scope.cancel()
    billed = _rows(pg_url, "SELECT lower(payer) FROM ledger_jobs")
    assert billed == [(payer.address.lower(),)]  # the image billed once, the rest refunded


async def test_a_render_receipted_elsewhere_after_a_lapsed_lease_costs_its_node_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    """B's node renders a job whose lease lapses; A leases it again and A's node's result
    is receipted first. B's node's result, as good, is refused as already receipted: no
    strike for its wallet, and B drops the job (before: a strike, and the job re-queued
    at B). A delivers the one image."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=60.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host_b,
        open_host(key_path=None, listen=()) as host_a,
        trio.open_nursery() as beats,
    ):
        a, b = m["a"], m["b"]
        at_b, at_a = Rogue(host_b, Account.create()), Rogue(host_a, Account.create())
        await _kept_alive(at_b, b, beats)
        channel, _ = await submit(client, a, tiny_request(1, seed=34))
        late = await at_b.offer()
        with psycopg.connect(pg_url, autocommit=True) as conn:  # B's lease lapses
            conn.execute("UPDATE queue_jobs SET lease_expires = 0")
        await _kept_alive(at_a, a, beats)
        first = await at_a.offer()
        assert first.offer.job_id == late.offer.job_id
        await at_a.deliver(first, a.net.domain)
        assert at_b.channel is not None
        await at_b.channel.send(at_b.result(late, b.net.domain))
        ack = await receive_skipping(at_b.channel, (ResultAck,), 20)
        assert not ack.accepted and ack.reason == "job already receipted"
        dispatcher = b.running.dispatcher
        assert dispatcher.reputation.get(at_b.acct.address).strikes == []
        assert late.offer.job_id not in dispatcher.jobs
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == first.offer.job_id
        beats.cancel_scope.cancel()


async def test_a_request_the_shared_queue_refuses_is_refused_and_refunded(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared queue fails to take a paid request's jobs (the database went away between
    the store's commit and the enqueue): the client is refused ("unavailable", one line
    saying nothing was charged), the stored jobs end failed (no coordinator adopts them),
    the reservation is refunded whole; the next request is accepted. Before, the client's
    stream ended with an internal error and the request stayed stored, its funds held."""
    payer = _funded_payer(pg_url)
    enqueue = PostgresQueue.enqueue
    failures: list[int] = []

    async def fail_once(self: PostgresQueue, jobs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await enqueue(self, jobs)

    monkeypatch.setattr(PostgresQueue, "enqueue", fail_once)
    async with (
        start_cluster(tmp_path, pg_url, ["a"], models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
    ):
        a = m["a"]
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(authorize(tiny_request(1, seed=35), bytes(payer.key), a.net.domain))
        refused = await channel.receive(timeout=10)
        assert isinstance(refused, RequestRefused) and refused.code == "unavailable"
        assert "nothing was charged" in refused.reason
        assert _rows(pg_url, "SELECT state FROM jobs") == [("failed",)]
        assert _rows(pg_url, "SELECT count(*) FROM cluster_requests") == [(0,)]  # nobody's
        await _until_rows(pg_url, "SELECT state FROM ledger_reservations", [("closed",)], 10)
        assert _rows(pg_url, "SELECT count(*) FROM ledger_jobs") == [(0,)]
        await submit(client, a, authorize(tiny_request(1, seed=36), bytes(payer.key), a.net.domain))
    balance = _rows(pg_url, "SELECT count(*) FROM ledger_reservations WHERE state = 'open'")
    assert balance == [(1,)]  # the second request's, reserved


async def test_a_reservation_whose_coordinator_died_before_registering_it_is_refunded(
    tmp_path: Path, pg_url: str
) -> None:
    """A coordinator reserved a payer's funds and died before the request's
    `cluster_requests` row (milliseconds apart; no client heard it was accepted): no
    coordinator ever looked at it, and the funds stayed reserved for good. Now one claims it
    after `UNREGISTERED_GRACE` and refunds it whole."""
    from sogni_protocol.pricing import quote

    payer = _funded_payer(pg_url)
    ledger = Ledger(pg_url)
    try:
        before = ledger.balance(payer.address)
        ledger.reserve(b"\x5a" * 32, payer.address, quote(tiny_request(1, seed=37)), "spark")
        assert ledger.balance(payer.address) != before
    finally:
        ledger.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # reserved long ago
        conn.execute("UPDATE ledger_reservations SET created_at = created_at - 3600")
    async with start_cluster(tmp_path, pg_url, ["a"], models=[MODEL]):
        await _until_rows(pg_url, "SELECT state FROM ledger_reservations", [("closed",)], 20)
    ledger = Ledger(pg_url)
    try:
        assert ledger.balance(payer.address) == before  # refunded whole
    finally:
        ledger.close()
    assert _rows(pg_url, "SELECT count(*) FROM ledger_jobs") == [(0,)]
