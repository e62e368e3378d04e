"""Tiers, reputation, weighted selection, cancellation with partial pay, and fast failure."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.jobs import Job, NodeLink
from sogni_coordinator.ledger import Ledger, partial_value, worker_account
from sogni_coordinator.reputation import BLACKLIST_STRIKES, NEWCOMER_FLOOR, Reputation
from sogni_coordinator.routing import Router
from sogni_coordinator.standing import Standing
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Cancel,
    CancelRequest,
    Goodbye,
    JobFailed,
    Offer,
    Ready,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    RequestRefused,
    job_params,
)
from sogni_protocol.pricing import quote

from .conftest import MODEL, SlowBackend, receive_skipping, rogue_node, tiny_request


def _request(n: int, **kw: Any) -> RenderRequest:
    return tiny_request(n, **{"steps": 10, "seed": 0, **kw})


def _link(wallet: str, device: str = "cpu") -> NodeLink:
    send, _ = trio.open_memory_channel[Any](1)
    return NodeLink(wallet, wallet, frozenset({MODEL}), 1, send, device=device)


def test_fast_tier_needs_cuda_licence_and_stake() -> None:
    standing = {"0xa": Standing(True, 20_000), "0xb": Standing(True, 10), "0xc": Standing()}
    router = Router(
        Reputation(":memory:"),
        tiers="enforced",
        fast_min_stake=10_000,
        standing=lambda w: standing[w],
    )
    assert router.classify("cuda", "0xa")[0] == {"fast"}
    assert router.classify("cuda", "0xb")[0] == {"relaxed"}  # not enough stake
    assert router.classify("cuda", "0xc")[0] == {"relaxed"}  # no licence
    assert router.classify("mps", "0xa")[0] == {"relaxed"}  # Macs are the relaxed tier
    assert router.classify("cpu", "0xa")[0] == {"relaxed"}
    open_router = Router(Reputation(":memory:"))
    assert open_router.classify("cpu", "0xc")[0] == {"fast", "relaxed"}
    # stake raises the selection weight of any node
    assert router.classify("cuda", "0xa")[1] > router.classify("cuda", "0xc")[1]


def test_reputation_persists_and_blacklists_repeat_offenders(tmp_path: Path) -> None:
    db = tmp_path / "rep.db"
    rep = Reputation(db)
    rep.succeeded("0xAA", elapsed=1.0, budget=4.0, work_units=100)
    rep.failed("0xAA")
    for _ in range(BLACKLIST_STRIKES - 1):
        assert not rep.strike("0xBB")
    assert rep.strike("0xBB") and rep.blacklisted("0xbb")
    rep.close()
    again = Reputation(db)
    rec = again.get("0xaa")
    assert (rec.jobs, rec.failures, rec.earned_units) == (1, 1, 100)
    assert again.blacklisted("0xBB")
    assert again.get("0xnew").score(0.0) >= NEWCOMER_FLOOR  # newcomers are never starved


def test_selection_is_weighted_random_and_every_capable_node_gets_work() -> None:
    rep = Reputation(":memory:")
    good, poor, newcomer = _link("0xgood"), _link("0xpoor"), _link("0xnew")
    for _ in range(20):
        rep.succeeded("0xgood", 1.0, 4.0, 1)
        rep.failed("0xpoor")
        rep.succeeded("0xpoor", 1.0, 1.0, 1)
    router = Router(rep, rng=random.Random(7))

    job = Job(b"j" * 32, b"r" * 32, 0, job_params(_request(1), 0), 1)
    counts = {good: 0, poor: 0, newcomer: 0}
    for _ in range(3000):
        for link in counts:
            link.credit = 1
        picked = router.pick(job, counts, set())
        assert picked is not None
        counts[picked] += 1
    assert all(n > 100 for n in counts.values())
    assert counts[good] > counts[poor]


async def test_no_capable_node_is_said_within_seconds(net_factory: Any, backend: Any) -> None:
    async with net_factory(models=[MODEL], tiers="enforced") as net:
        net.coordinator.dispatcher.no_node_grace = 1.0
        await net.add_node(backend, "node0")  # a CPU node: relaxed tier only
        async with open_host(key_path=None, listen=()) as client:
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(_request(1, network="fast"))
            assert isinstance(await channel.receive(timeout=10), RequestAccepted)
            with trio.fail_after(5):
                failed = await receive_skipping(channel, (JobFailed,), timeout=5)
            assert "no connected node can serve fast" in failed.reason
    async with net_factory(tiers="enforced") as net:
        await net.add_node(backend, "node0")
        async with open_host(key_path=None, listen=()) as client:
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(_request(1, network="fast"))
            refused = await channel.receive(timeout=10)
            assert isinstance(refused, RequestRefused)
            assert "no connected node can serve fast" in refused.reason
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(_request(1, network="relaxed", steps=2))
            assert isinstance(await channel.receive(timeout=10), RequestAccepted)
            done = await receive_skipping(channel, (RequestDone,), limit=RESULT_FRAME_LIMIT)
            assert done.delivered == 1


async def test_cancel_pays_the_steps_done_and_refunds_the_rest(
    net_factory: Any, backend: Any
) -> None:
    payer = Account.create()
    async with net_factory() as net:
        slow = SlowBackend(backend, 0.25)
        node = await net.add_node(slow, "node0")
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
            request = authorize(_request(3), bytes(payer.key), net.domain)
            async with open_host(key_path=None, listen=()) as client:
                channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await channel.send(request)
                accepted = await channel.receive(timeout=10)
                assert isinstance(accepted, RequestAccepted)
                with trio.fail_after(20):
                    while True:
                        msg = await channel.receive(timeout=20)
                        if type(msg).__name__ == "JobProgress" and msg.step >= 2:
                            break
                await channel.send(CancelRequest(request_id=accepted.request_id))
                done = await receive_skipping(channel, (RequestDone,), timeout=20)
            assert (done.delivered, done.cancelled) == (0, 3)
            receipts = net.coordinator.dispatcher.store.receipts()
            assert len(receipts) == 1
            partial = receipts[0].receipt
            assert 2 <= partial.steps_done < 10
            assert partial.worker == node.wallet.address
            per_image = quote(_request(3)).per_image.spark_micro
            charged = partial_value(per_image, partial.steps_done, 10)
            assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - charged
            assert sum(ledger.balance(worker_account(node.wallet.address)).values()) > 0
        finally:
            ledger.close()


async def test_a_cancelled_job_whose_node_vanishes_ends_for_good(net_factory: Any) -> None:
    """No partial receipt ever comes: the job ends as cancelled, also in the store, so a
    restarted coordinator does not render (and charge) it again."""
    async with net_factory() as net, rogue_node(net) as (node, _acct):
        await node.send(Ready(slots=1))
        async with open_host(key_path=None, listen=()) as client:
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(_request(1))
            accepted = await channel.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted)
            offer = await receive_skipping(node, (Offer,))
            await channel.send(CancelRequest(request_id=accepted.request_id))
            cancel = await receive_skipping(node, (Cancel,))
            assert cancel.pay_partial
            await node.send(Goodbye(reason="gone"))
            done = await receive_skipping(channel, (RequestDone,), timeout=20)
        assert (done.delivered, done.cancelled) == (0, 1)
        store = net.coordinator.dispatcher.store
        assert store.job_state(offer.offer.job_id) == "cancelled"
        assert store.live_jobs() == []


def test_workers_command_lists_reputation(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from sogni_coordinator.cli import app

    rep = Reputation(tmp_path / "coordinator.db")
    rep.succeeded("0xAA", elapsed=1.0, budget=4.0, work_units=43_200)
    rep.failed("0xAA")
    rep.close()
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["workers", "--json"], env=env)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["wallet"], row["jobs"], row["failures"], row["earnedSpark"]) == ("0xaa", 1, 1, 1.0)
    assert row["tier"] == "unknown" and 0 < row["score"] <= 1
