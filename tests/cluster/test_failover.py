"""Two coordinators of one network on one PostgreSQL (issue #18), with real libp2p nodes:

- a request submitted at A is rendered by B's node and delivered (and billed) by A;
- A is killed mid-request: its client resumes at B and gets every image exactly once;
- a node holding a result for A's offer delivers it to B, which accepts it once;
- a job leased by the killed A comes back when its lease expires and runs at B;
- one receipt per job in the shared tables, the payer charged once per image, and one
  epoch root over both coordinators' receipts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_chain import connect
from sogni_coordinator.dispatch import MAX_ATTEMPTS
from sogni_coordinator.ledger import ASSETS, Ledger, reserved_account
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_net import open_host
from sogni_protocol import eip712
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Cancel,
    CancelRequest,
    ImageAck,
    JobImage,
    JobProgress,
    OfferDeclined,
    Progress,
    Ready,
    RequestAccepted,
    RequestDone,
    RequestResumed,
    ResultAck,
    ResumeRequest,
)
from sogni_protocol.payout_rules import SettlementConfig
from sogni_protocol.pricing import quote

from ..e2e.conftest import SlowBackend, receive_skipping, tiny_request
from ..settlement.settle_env import make_net
from .conftest import MODEL, Rogue, cancel_while_rendered, start_cluster


def _pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


async def test_failover_between_two_coordinators(tmp_path: Path, backend: Any, pg_url: str) -> None:
    chain = await trio.to_thread.run_sync(connect)
    net_chain = await trio.to_thread.run_sync(make_net, "embedded", chain)
    domain = net_chain.domain
    where = {"chain_id": domain.chain_id, "verifying_contract": domain.verifying_contract}
    payer = Account.create()
    ledger = Ledger(pg_url)
    ledger.credit_purchase(payer.address, 1)
    req = tiny_request(4, seed=0)
    per_image = quote(req).per_image.spark_micro
    async with (
        # The rogues hold their offers in silence while B's node renders two images: on a
        # loaded machine that outlasts a 3 s heartbeat timeout, and A would drop them.
        start_cluster(
            tmp_path, pg_url, ["a", "b"], lease_seconds=2.0, heartbeat_timeout=60.0, **where
        ) as members,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host1,
        open_host(key_path=None, listen=()) as host2,
    ):
        a, b = members["a"], members["b"]
        # two rogue nodes at A each take one job and hold it
        slow, quick = Rogue(host1, Account.create()), Rogue(host2, Account.create())
        await slow.connect(a)
        await quick.connect(a)
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(authorize(req, bytes(payer.key), domain))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        rid, token = accepted.request_id, accepted.resume_token
        held_slow, held_quick = await slow.offer(), await quick.offer()
        assert {held_slow.offer.coordinator, held_quick.offer.coordinator} == {a.signer.address}

        # B's real node renders the other two; A (the owner) delivers them to its client
        await b.net.add_node(SlowBackend(backend, 0.05), "node-b", **where)
        got: dict[bytes, JobImage] = {}
        with trio.fail_after(90):
            while len(got) < 2:
                image = await receive_skipping(channel, (JobImage,), 90, RESULT_FRAME_LIMIT)
                assert image.job_id not in got
                assert image.receipt.coordinator == b.signer.address  # B's offer, A delivers
                got[image.job_id] = image
        await channel.send(ImageAck(request_id=rid, job_ids=list(got)))
        store_a = a.running.dispatcher.store
        with trio.fail_after(20):
            while not all(o.delivered for o in store_a.job_outcomes(rid) if o.job_id in got):
                await trio.sleep(0.05)

        await a.kill()  # mid-request: two jobs leased by A, their nodes hold them

        # the quick node delivers its finished result for A's offer to B
        await quick.connect(b)
        assert quick.channel is not None
        result = quick.result(held_quick, domain)
        await quick.channel.send(result)
        ack = await receive_skipping(quick.channel, (ResultAck,), 20)
        assert ack.accepted, ack.reason
        await quick.channel.send(result)  # a second delivery: the one receipt stands
        again = await receive_skipping(quick.channel, (ResultAck,), 20)
        assert not again.accepted and "receipted" in again.reason

        # the client resumes at B: what it has not acknowledged, each once, then the end
        resumed = await client.open_channel(b.addr, CLIENT_PROTOCOL)
        await resumed.send(ResumeRequest(request_id=rid, token=token))
        reply = await resumed.receive(timeout=20)
        assert isinstance(reply, RequestResumed), reply
        assert set(reply.acked) == set(got)
        frames: list[Any] = []
        with trio.fail_after(90):  # the slow node's job comes back when A's lease expires
            while not isinstance(frames[-1] if frames else None, RequestDone):
                frame = await resumed.receive(limit=RESULT_FRAME_LIMIT, timeout=90)
                if isinstance(frame, JobImage):
                    await resumed.send(ImageAck(request_id=rid, job_ids=[frame.job_id]))
                frames.append(frame)
        images = [f for f in frames if isinstance(f, JobImage)]
        assert sorted(i.job_id for i in images) == sorted(
            {held_slow.offer.job_id, held_quick.offer.job_id}
        )
        done = frames[-1]
        assert isinstance(done, RequestDone) and done.delivered == 4 and done.failed == 0
        by_job = {i.job_id: i for i in images}
        assert by_job[held_quick.offer.job_id].receipt.coordinator == a.signer.address
        assert by_job[held_slow.offer.job_id].receipt.coordinator == b.signer.address
        store_b = b.running.dispatcher.store
        with trio.fail_after(20):  # the last ack and the refund are written by B's writer
            while sum(ledger.balance(reserved_account(rid)).values()) != 0 or not all(
                o.delivered for o in store_b.job_outcomes(rid)
            ):
                await trio.sleep(0.05)

    # one receipt per job, in both tables; the job A had leased ran again (attempt 2)
    receipts = _pg_rows(pg_url, "SELECT job_id FROM receipts")
    assert sorted(r[0] for r in receipts) == sorted(accepted.job_ids)
    queue = _pg_rows(pg_url, "SELECT job_id, state, attempts FROM queue_jobs")
    assert {r[1] for r in queue} == {"done"}
    attempts = {bytes(r[0]): r[2] for r in queue}
    assert attempts[held_slow.offer.job_id] >= 2  # leased again after A's lease expired
    completed = dict(_pg_rows(pg_url, "SELECT job_id, coordinator_id FROM queue_receipts"))
    assert len(completed) == 4
    assert completed[held_slow.offer.job_id] == b.signer.address.lower()
    assert completed[held_quick.offer.job_id] == b.signer.address.lower()
    owner = _pg_rows(pg_url, "SELECT owner FROM cluster_requests")
    assert owner == [(b.signer.address.lower(),)]  # B adopted the request

    # charged once per image, the rest refunded, the ledger conserved
    assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - 4 * per_image
    assert ledger.totals() == dict.fromkeys(ASSETS, 0)
    ledger.close()

    # one epoch over both coordinators' receipts, one root
    store = Store(pg_url)
    try:
        signers = {s.receipt.coordinator for s in store.receipts()}
        assert signers == {a.signer.address, b.signer.address}
        settler = Settler(
            store,
            net_chain.d,
            sender=net_chain.settler,
            rules=SettlementConfig().rules(local=True),
            publish_dir=tmp_path / "epochs",
        )
        closed = settler.close_epoch()
        assert closed is not None and closed.paid_receipts == 4, closed
        assert net_chain.d.distributor.root_of(closed.epoch) == closed.root
        for s in store.receipts():
            assert eip712.same_address(
                eip712.recover_receipt_signer(domain, s.receipt, s.signature), s.receipt.worker
            )
    finally:
        store.close()


async def test_a_client_that_moves_to_b_takes_its_request_along(
    tmp_path: Path, backend: Any, pg_url: str
) -> None:
    """A stays up: the request's claim moves to B in one statement, A stops delivering it,
    and the client gets each image once from the two coordinators together."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=3.0, models=[MODEL]) as members,
        open_host(key_path=None, listen=()) as client,
    ):
        a, b = members["a"], members["b"]
        await b.net.add_node(SlowBackend(backend, 0.3), "node-b")
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(3, seed=5))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        rid = accepted.request_id
        first = await receive_skipping(channel, (JobImage,), 60, RESULT_FRAME_LIMIT)
        await channel.send(ImageAck(request_id=rid, job_ids=[first.job_id]))
        with trio.fail_after(20):
            while first.job_id not in _delivered(a, rid):
                await trio.sleep(0.05)

        moved = await client.open_channel(b.addr, CLIENT_PROTOCOL)
        await moved.send(ResumeRequest(request_id=rid, token=accepted.resume_token))
        reply = await moved.receive(timeout=20)
        assert isinstance(reply, RequestResumed) and reply.acked == [first.job_id]
        seen = [first.job_id]
        with trio.fail_after(60):
            while True:
                frame = await moved.receive(limit=RESULT_FRAME_LIMIT, timeout=60)
                if isinstance(frame, JobImage):
                    seen.append(frame.job_id)
                    await moved.send(ImageAck(request_id=rid, job_ids=[frame.job_id]))
                if isinstance(frame, RequestDone):
                    break
        assert sorted(seen) == sorted(accepted.job_ids)  # each image once
        assert frame.delivered == 3
        with trio.fail_after(10):  # A noticed it lost the claim: no second delivery or refund
            while rid in a.running.dispatcher.requests:
                await trio.sleep(0.05)
        assert rid not in a.running.dispatcher.mailboxes
    assert _pg_rows(pg_url, "SELECT owner FROM cluster_requests") == [(b.signer.address.lower(),)]


def _delivered(member: Any, rid: bytes) -> set[bytes]:
    store = member.running.dispatcher.store
    return {o.job_id for o in store.job_outcomes(rid) if o.delivered}


async def test_a_dead_coordinators_request_is_finished_and_billed_by_another(
    tmp_path: Path, backend: Any, pg_url: str
) -> None:
    """A dies right after accepting a paid request and its client never comes back: B's node
    renders the jobs from the shared queue, B takes the orphaned request over once A's
    heartbeat lapsed, bills every image and refunds the rest; the images wait for a collect."""
    payer = Account.create()
    ledger = Ledger(pg_url)
    ledger.credit_purchase(payer.address, 1)
    req = tiny_request(3, seed=9)
    per_image = quote(req).per_image.spark_micro
    try:
        async with (
            start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=2.0, models=[MODEL]) as m,
            open_host(key_path=None, listen=()) as client,
        ):
            a, b = m["a"], m["b"]
            domain = a.net.domain
            channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
            await channel.send(authorize(req, bytes(payer.key), domain))
            accepted = await channel.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted), accepted
            rid = accepted.request_id
            await a.kill()
            await b.net.add_node(backend, "node-b")
            with trio.fail_after(60):  # A's heartbeat lapses after 6 s; B bills and refunds
                while sum(ledger.balance(reserved_account(rid)).values()) != 0:
                    await trio.sleep(0.1)
            assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - 3 * per_image
            assert ledger.totals() == dict.fromkeys(ASSETS, 0)
            # the client collects later, at B: every image once
            later = await client.open_channel(b.addr, CLIENT_PROTOCOL)
            await later.send(ResumeRequest(request_id=rid, token=accepted.resume_token))
            reply = await later.receive(timeout=20)
            assert isinstance(reply, RequestResumed) and reply.acked == []
            frames: list[Any] = []
            with trio.fail_after(30):
                while not frames or not isinstance(frames[-1], RequestDone):
                    frames.append(await later.receive(limit=RESULT_FRAME_LIMIT, timeout=30))
            images = sorted(f.job_id for f in frames if isinstance(f, JobImage))
            assert images == sorted(accepted.job_ids)
            assert frames[-1].delivered == 3
    finally:
        ledger.close()


async def test_declines_spend_no_attempt_of_the_job(tmp_path: Path, pg_url: str) -> None:
    """A node connected to several coordinators declines what it has no slot for: the job
    goes back to the shared queue without spending one of its attempts, however often (the
    queue's lease count still bounds it)."""
    async with (
        start_cluster(tmp_path, pg_url, ["a"], lease_seconds=30.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
    ):
        a = m["a"]
        busy = Rogue(host, Account.create())
        await busy.connect(a)
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(1, seed=3))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        assert busy.channel is not None
        for _ in range(MAX_ATTEMPTS + 2):
            offer = await busy.offer()
            await busy.channel.send(
                OfferDeclined(job_id=offer.offer.job_id, reason="no free render slot")
            )
            await busy.channel.send(Ready(slots=1))
        offer = await busy.offer()  # still offered: no attempt spent
        await busy.channel.send(busy.result(offer, a.net.domain))
        ack = await receive_skipping(busy.channel, (ResultAck,), 20)
        assert ack.accepted, ack.reason
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
    (row,) = _pg_rows(pg_url, "SELECT state, attempts FROM jobs")
    assert row == ("done", 0)
    (queued,) = _pg_rows(pg_url, "SELECT state, attempts FROM queue_jobs")
    assert queued == ("done", MAX_ATTEMPTS + 3)  # each lease counted in the queue


async def test_a_job_receipted_elsewhere_is_stopped_where_its_lease_was(
    tmp_path: Path, pg_url: str
) -> None:
    """The node holding A's offer delivers its result to B while A is up (say its stream to
    A is slow): B accepts it against the shared offer record, the receipt completes the job
    in the queue, A's next renewal finds the lease gone and tells its node to stop, and A
    (the owner) delivers the image to its client."""
    wallet = Account.create()
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=1.5, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host_a,
        open_host(key_path=None, listen=()) as host_b,
    ):
        a, b = m["a"], m["b"]
        at_a, at_b = Rogue(host_a, wallet), Rogue(host_b, wallet)
        await at_a.connect(a)
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(1, seed=4))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        offer = await at_a.offer()
        await at_b.connect(b, credit=0)
        assert at_a.channel is not None and at_b.channel is not None
        with trio.fail_after(10):  # the offer is recorded off the event loop
            while not _pg_rows(pg_url, "SELECT 1 FROM cluster_offers"):
                await trio.sleep(0.05)
        await at_b.channel.send(at_b.result(offer, a.net.domain))
        ack = await receive_skipping(at_b.channel, (ResultAck,), 20)
        assert ack.accepted, ack.reason
        cancel = await receive_skipping(at_a.channel, (Cancel,), 20)
        assert cancel.job_id == offer.offer.job_id
        assert offer.offer.job_id not in a.running.dispatcher.jobs
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
        assert image.receipt.coordinator == a.signer.address  # A's offer, B's receipt
        done = await receive_skipping(channel, (RequestDone,), 20)
        assert done.delivered == 1


async def test_a_cancel_ends_the_jobs_still_in_the_shared_queue(
    tmp_path: Path, pg_url: str
) -> None:
    """No node has taken the request's jobs yet: the client's cancel takes them out of the
    shared queue for good (nobody leases them later) and the request ends, all cancelled."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
    ):
        a = m["a"]
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(3, seed=6))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        await channel.send(CancelRequest(request_id=accepted.request_id))
        done = await receive_skipping(channel, (RequestDone,), 20)
        assert (done.delivered, done.cancelled) == (0, 3)
    assert {r[0] for r in _pg_rows(pg_url, "SELECT state FROM queue_jobs")} == {"dead"}
    assert {r[0] for r in _pg_rows(pg_url, "SELECT state FROM jobs")} == {"cancelled"}


async def test_a_cancel_stops_the_jobs_another_coordinator_leased(
    tmp_path: Path, pg_url: str
) -> None:
    """A's client cancels while B's node renders the request's job: A NOTIFYs, B tells its
    node to stop (a partial receipt is paid pro rata, as any cancel), and A ends the request
    with the job counted cancelled."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=30.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        await node.connect(b)
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(1, seed=8))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        offer = await node.offer()  # B leased A's job and offered it
        await cancel_while_rendered(channel, accepted, node, offer)
        assert offer.offer.job_id not in b.running.dispatcher.jobs
    assert {r[0] for r in _pg_rows(pg_url, "SELECT state FROM jobs")} == {"cancelled"}
    assert _pg_rows(pg_url, "SELECT count(*) FROM receipts") == [(0,)]


async def test_progress_of_a_job_rendered_elsewhere_reaches_the_owners_client(
    tmp_path: Path, pg_url: str
) -> None:
    """B's node renders A's job: its progress goes to A's client (relayed by NOTIFY, at most
    twice a second), then the image."""
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], lease_seconds=30.0, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        await node.connect(b)
        channel = await client.open_channel(a.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(1, seed=9))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted), accepted
        offer = await node.offer()
        assert node.channel is not None
        await node.channel.send(Progress(job_id=offer.offer.job_id, step=2))
        progress = await receive_skipping(channel, (JobProgress,), 20)
        assert (progress.job_id, progress.index, progress.step) == (offer.offer.job_id, 0, 2)
        assert progress.steps == offer.offer.steps
        await node.channel.send(node.result(offer, a.net.domain))
        image = await receive_skipping(channel, (JobImage,), 20, RESULT_FRAME_LIMIT)
        assert image.job_id == offer.offer.job_id
