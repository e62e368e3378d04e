"""Two coordinators of one network on one real PostgreSQL (real libp2p on 127.0.0.1, rogue
nodes that sign real receipts), for what session 7 left open:

- a cancel whose NOTIFY the lessee missed still stops the lessee's node (read back from the
  shared `cluster_cancels` table by the lease loop);
- a held (verification-sampled) receipt completes its shared queue row when its check
  passes, and a failed check gives the job back to the queue, not at lease expiry;
- a request for a model that only another coordinator's node serves is accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_net import Host, open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    JobImage,
    Offer,
    Ready,
    RequestDone,
    RequestRefused,
)

from ..e2e.conftest import receive_skipping, tiny_request
from ..e2e.rogue_kit import EVERY, heartbeats, made_up_trajectory, submit_result, wire
from .conftest import (
    MODEL,
    Member,
    Rogue,
    cancel_while_rendered,
    png,
    start_cluster,
    submit,
)
from .conftest import pg_rows as _rows


async def _until_rows(url: str, sql: str, want: list[tuple[Any, ...]], seconds: float) -> None:
    """Poll `sql` until it returns `want` (fails after `seconds` with what it returned)."""
    got: list[tuple[Any, ...]] = []
    with trio.move_on_after(seconds):
        while (got := await trio.to_thread.run_sync(_rows, url, sql)) != want:
            await trio.sleep(0.1)
    assert got == want


async def _kept_alive(node: Rogue, member: Member, nursery: trio.Nursery, credit: int = 1) -> None:
    """Connect `node` to `member` and keep its stream alive (heartbeats) until the test ends."""
    await node.connect(member, credit=credit)
    assert node.channel is not None
    nursery.start_soon(heartbeats, node.channel)


@asynccontextmanager
async def _node_at_b(
    tmp: Path, pg_url: str, **cfg: Any
) -> AsyncIterator[tuple[Member, Member, Host, Rogue]]:
    """Coordinators A and B (30 s leases, `cfg`), a client's host, and a node connected to B
    (one slot) kept alive until the block ends."""
    async with (
        start_cluster(tmp, pg_url, ["a", "b"], lease_seconds=30.0, **cfg) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
        trio.open_nursery() as nursery,
    ):
        node = Rogue(host, Account.create())
        await _kept_alive(node, m["b"], nursery)
        yield m["a"], m["b"], client, node
        nursery.cancel_scope.cancel()


async def test_a_cancel_whose_notify_was_missed_still_stops_the_lessee(
    tmp_path: Path, pg_url: str
) -> None:
    """B's LISTEN connection stops listening (as one that reconnected just too late): A's
    client cancels, B never hears the NOTIFY, yet B's lease loop reads the cancel from the
    shared table and stops its node, and A ends the request counted cancelled."""
    async with _node_at_b(tmp_path, pg_url, models=[MODEL]) as (a, b, client, node):
        channel, accepted = await submit(client, a, tiny_request(1, seed=21))
        offer = await node.offer()  # B leased A's job and offered it
        cluster = b.running.dispatcher.cluster
        # the notification is dropped: B's listener waits on, hearing nothing from now on
        await trio.to_thread.run_sync(cluster._listen.execute, b"UNLISTEN *")
        await cancel_while_rendered(channel, accepted, node, offer)
    assert _rows(pg_url, "SELECT request_id FROM cluster_cancels") == [(accepted.request_id,)]
    assert _rows(pg_url, "SELECT state FROM jobs") == [("cancelled",)]
    assert _rows(pg_url, "SELECT state FROM queue_jobs") == [("dead",)]  # not left leased


async def _held_result(node: Rogue, member: Member, offer: Offer, seed: int) -> Any:
    """Send a full result committing to a made-up (correctly committed) trajectory, which a
    coordinator checking every receipt holds; the trajectory, to answer its challenge."""
    assert node.channel is not None
    committed = made_up_trajectory(offer.offer.steps, seed)
    image = png(offer.offer.width, offer.offer.height)
    await submit_result(member.net, node.channel, node.acct, offer, image, committed)
    return committed


async def test_a_held_receipt_completes_its_queue_row_when_its_check_ends(
    tmp_path: Path, pg_url: str
) -> None:
    """B checks every receipt. The job B's node renders first is held, its check fails (the
    node refuses the challenge): the job goes back to the shared queue at once (attempt 2),
    not when B's 30 s lease lapses. Rendered again and checked (the challenge answered, no
    verifier: skipped, released as a pass), its queue row is done with B's receipt at once,
    and A delivers the image."""
    checked = {"models": [MODEL], "verification": EVERY}  # B checks every receipt
    async with _node_at_b(tmp_path, pg_url, **checked) as (a, b, client, node):
        assert node.channel is not None
        channel, _ = await submit(client, a, tiny_request(1, seed=22))
        job_state = "SELECT state, attempts, lease_owner IS NULL FROM queue_jobs"

        offer = await node.offer()
        await _held_result(node, b, offer, seed=1)
        challenge = await receive_skipping(node.channel, (Challenge,), 20)
        await _until_rows(pg_url, job_state, [("leased", 1, False)], 5)  # held: still leased
        await node.channel.send(ChallengeRefused(job_id=challenge.job_id, reason="gone"))
        await _until_rows(pg_url, job_state, [("queued", 1, True)], 10)  # given back now
        assert _rows(pg_url, "SELECT count(*) FROM failed_receipts") == [(1,)]

        await node.channel.send(Ready(slots=1))
        offer = await node.offer()  # leased again by B: attempt 2
        committed = await _held_result(node, b, offer, seed=2)
        challenge = await receive_skipping(node.channel, (Challenge,), 20)
        answer = ChallengeAnswer(
            job_id=challenge.job_id, openings=[wire(committed, k) for k in challenge.steps]
        )
        await node.channel.send(answer, limit=RESULT_FRAME_LIMIT)
        await _until_rows(pg_url, job_state, [("done", 2, True)], 10)  # not in 30 s
        assert _rows(pg_url, "SELECT coordinator_id FROM queue_receipts") == [
            (b.running.dispatcher.cluster.me,)
        ]
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
        done = await receive_skipping(channel, (RequestDone,), 20)
        assert done.delivered == 1


async def test_a_model_only_another_coordinators_node_serves_is_accepted(
    tmp_path: Path, pg_url: str
) -> None:
    """Neither coordinator lists models; the only node serves MODEL at B. A learns it from
    the shared `cluster_models`, accepts a request for it, B's node renders it and A
    delivers; a model no node of the network serves is still refused."""
    async with _node_at_b(tmp_path, pg_url) as (a, b, client, node):
        with trio.fail_after(10):
            while MODEL not in a.running.dispatcher.cluster.network_models:
                await trio.sleep(0.05)
        refused = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await refused.send(tiny_request(1, model_id="nobody-serves-this"))
        refusal = await refused.receive(timeout=10)
        assert isinstance(refusal, RequestRefused) and refusal.code == "unknown_model"
        channel, _ = await submit(client, a, tiny_request(1, seed=23))
        offer = await node.offer()
        await node.deliver(offer, a.net.domain)
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
        done = await receive_skipping(channel, (RequestDone,), 20)
        assert done.delivered == 1
    assert _rows(pg_url, "SELECT coordinator_id FROM queue_receipts") == [
        (b.running.dispatcher.cluster.me,)
    ]


async def test_a_wallet_whose_receipt_failed_a_check_at_b_is_passed_over_at_a(
    tmp_path: Path, pg_url: str
) -> None:
    """W's receipt fails B's check (challenge refused): the job is back in the shared queue.
    A leases it for W's node there (the only node of A with credit), but offers it to Z,
    another wallet, once Z has credit: A read W's failed receipt from the shared table."""
    wallet = Account.create()
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], lease_seconds=30.0, models=[MODEL], verification=EVERY
        ) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host_b,
        open_host(key_path=None, listen=()) as host_w,
        open_host(key_path=None, listen=()) as host_z,
        trio.open_nursery() as nursery,
    ):
        a, b = m["a"], m["b"]
        at_b = Rogue(host_b, wallet)
        await _kept_alive(at_b, b, nursery)
        assert at_b.channel is not None
        await submit(client, a, tiny_request(1, seed=24))
        offer = await at_b.offer()
        await _held_result(at_b, b, offer, seed=3)
        challenge = await receive_skipping(at_b.channel, (Challenge,), 20)
        await at_b.channel.send(ChallengeRefused(job_id=challenge.job_id, reason="gone"))
        job_state = "SELECT state, attempts FROM queue_jobs"
        await _until_rows(pg_url, job_state, [("queued", 1)], 10)

        z, at_a = Rogue(host_z, Account.create()), Rogue(host_w, wallet)
        await _kept_alive(z, a, nursery, credit=0)
        await _kept_alive(at_a, a, nursery)  # W's credit at A: A leases the job
        assert z.channel is not None
        await _until_rows(pg_url, job_state, [("leased", 2)], 10)
        await z.channel.send(Ready(slots=1))
        again = await z.offer()
        assert again.offer.job_id == offer.offer.job_id
        held = a.running.dispatcher.jobs[offer.offer.job_id]
        assert set(held.offers.values()) == {host_z.peer_id}  # never offered to W here
        nursery.cancel_scope.cancel()


async def test_a_round_that_meets_a_busy_database_is_logged_and_the_cluster_runs_on(
    tmp_path: Path, pg_url: str, monkeypatch: Any
) -> None:
    """Another coordinator holding the shared write lock past the deadline (`DatabaseBusy`)
    in a refresh round of A's: one log line, and the next round goes on (it ended A's whole
    daemon: the exception escaped the loop's catch of driver errors)."""
    from structlog.testing import capture_logs

    from sogni_coordinator.cluster import Cluster
    from sogni_coordinator.db import DatabaseBusy

    busy: list[bytes] = []
    fail_dead = Cluster._fail_dead

    async def busy_once(self: Cluster, request_id: bytes) -> None:
        if not busy:
            busy.append(request_id)
            raise DatabaseBusy("database: another coordinator held the write lock for 30 s")
        await fail_dead(self, request_id)

    monkeypatch.setattr(Cluster, "_fail_dead", busy_once)
    with capture_logs() as logs:
        async with _node_at_b(tmp_path, pg_url, models=[MODEL]) as (a, _b, client, node):
            channel, accepted = await submit(client, a, tiny_request(1, seed=29))
            with trio.fail_after(20):  # a refresh round of A's met the busy database
                while not busy:
                    await trio.sleep(0.05)
            offer = await node.offer()
            await node.deliver(offer, a.net.domain)
            done = await receive_skipping(channel, (RequestDone,), 20, RESULT_FRAME_LIMIT)
            assert done.delivered == 1 and busy == [accepted.request_id]
    failed = [e for e in logs if e["event"] == "cluster_refresh_failed"]
    assert failed and failed[0]["error"] == "DatabaseBusy"
