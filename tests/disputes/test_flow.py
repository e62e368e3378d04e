"""A dispute end to end at the coordinator: a faulty pair of verifiers fails an honest
worker's check; the signed refusal is disputed on chain; opening it re-checks the step on
other wallets' nodes and publishes the bundle; stakers vote (the `sogni dispute` client,
salts on disk); the worker wins: bond back, strike pardoned, pay owed to the next epoch.

In-process coordinator (tests/coordinator's Harness, fake nodes answering `VerifyStep`) on
the embedded chain."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from eth_utils import to_checksum_address

from sogni_app.dispute_cli import JurorClient, SaltBox
from sogni_chain.disputes import CaseState, DisputeRefused, Refusal, open_dispute
from sogni_coordinator.disputes import DisputeBook, DisputeDesk, Reporter, Restorations
from sogni_protocol import epoch_math
from sogni_protocol.cli_errors import Refused
from sogni_protocol.messages import StepVerified, VerifyStep
from sogni_protocol.payout_rules import PayoutRules
from tests.coordinator.conftest import FakeNode, Harness
from tests.coordinator.test_checks import Trajectory, _paid_request, answer_challenge, next_of
from tests.coordinator.test_checks import until as until_true
from tests.coordinator.test_verifier_standing import POLICY, _held, _reply

from .dispute_env import SOGNI, Env


@pytest.fixture
async def h(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=POLICY)
    yield harness
    harness.close()


def _raw_params(db: Path) -> bytes:
    import sqlite3

    with sqlite3.connect(db) as conn:
        (row,) = conn.execute("SELECT params FROM dispute_refusals").fetchall()
    return bytes(row[0])


async def _faulty(h: Harness, node: FakeNode, truth: Trajectory) -> None:
    """A verifier with a broken kernel: its x'_{k+1} is another trajectory's."""
    ask = await next_of(node, VerifyStep)
    other = Trajectory(len(truth.leaves) - 1, seed=5)
    reply = StepVerified(check_id=ask.check_id, latents=other.tensor(ask.k + 1), start_distance=0.0)
    assert h.dispatcher.verifications.answered(node.link.peer_id, reply)


async def _honest(h: Harness, node: FakeNode, truth: Trajectory) -> None:
    ask = await next_of(node, VerifyStep)
    assert h.dispatcher.verifications.answered(node.link.peer_id, _reply(ask, [truth], True))


async def test_honest_worker_wins_against_faulty_verifiers(
    h: Harness, env: Env, tmp_path: Path
) -> None:
    chain, disputes = env.chain, env.disputes
    book = DisputeBook(tmp_path / "coordinator.db")
    h.dispatcher.refusals = Reporter(
        book,
        bytes(env.reporter.key),
        chain_id=chain.chain_id,
        disputes=disputes.address,
        clock=lambda: float(chain.timestamp()),
    )
    sub, _ = await _paid_request(h)
    worker, first, third = h.node(0), h.node(1, ready=False), h.node(2, ready=False)
    offer, truth = await _held(h, worker)  # the worker rendered honestly
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, truth)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_faulty, h, first, truth)
        nursery.start_soon(_faulty, h, third, truth)
    await until_true(lambda: book.refusals(job_id) and h.reputation.get(worker.wallet).strikes)

    # the worker's wallet on chain: gas and the bond
    account = chain.add_key(worker.key)
    chain.send_eth(account.address, 10**18, sender=env.gov)
    env.d.token.transfer(account.address, 50 * SOGNI)
    (record,) = book.refusals(job_id)
    # the prompt a re-check needs is kept sealed (it was plain msgpack in the row, forever)
    assert record.params is not None and record.params.positive_prompt == "a red circle"
    assert b"a red circle" not in _raw_params(tmp_path / "coordinator.db")
    refusal = Refusal.from_json(json.loads(json.dumps(record.as_json())))  # as served over HTTP
    with pytest.raises(DisputeRefused, match="not this wallet"):
        open_dispute(disputes, env.d.token.address, worker=env.outsider, refusal=refusal)
    open_dispute(disputes, env.d.token.address, worker=account, refusal=refusal)
    assert env.d.token.balance_of(account.address) == 40 * SOGNI

    # opening it: 2 more re-runs on other wallets' nodes, then the vote opens on the bundle
    more = [h.node(3, ready=False), h.node(4, ready=False)]
    desk = DisputeDesk(
        book,
        disputes,
        reporter=env.reporter,
        publish_dir=tmp_path / "publish",
        dispatcher=h.dispatcher,
        reputation=h.reputation,
        rechecks=2,
        verify_timeout=5.0,
    )
    # the coordinator sees the dispute late (it was away), past the evidence window but
    # before the case's voteBy (after it nobody may open the vote: test_no_escape.py): the
    # re-checks still run, the prompt is forgotten only after them
    chain.advance_time(disputes.case(record.case_id).vote_by - chain.timestamp() - 300)
    async with trio.open_nursery() as nursery:
        for node in more:
            nursery.start_soon(_honest, h, node, truth)
        assert await desk.poll() == 1
    case = disputes.case(record.case_id)
    assert case.state is CaseState.VOTING
    (record,) = book.refusals(job_id)
    assert record.bundle_path is not None
    body = Path(record.bundle_path).read_bytes()
    from eth_hash.auto import keccak

    assert case.bundle_hash == keccak(body) == record.bundle_hash
    bundle = json.loads(body)
    assert [r["passed"] for r in bundle["rechecks"]] == [True, True]
    assert {r["verifier"] for r in bundle["rechecks"]} == {"v1", "v2"}  # no wallets published
    assert worker.wallet.lower() not in body.decode().replace(record.worker, "")
    assert b"positive_prompt" not in body and b"prompt" not in body
    assert record.params is None and _raw_params(tmp_path / "coordinator.db") == b""  # shredded

    # jurors vote with the client; salts are kept 0600 for the reveal
    clients = [
        JurorClient(chain, disputes, SaltBox(tmp_path / f"juror{i}"), j)
        for i, j in enumerate(env.jurors)
    ]
    short = "0x" + record.case_id.hex()[:10]
    clients[0].vote(short, True)
    clients[1].vote(short, False)
    clients[2].vote(short, True)
    mode = stat.S_IMODE(clients[0].salts.path.stat().st_mode)
    assert mode == 0o600
    with pytest.raises(Refused, match="already voted"):
        clients[0].vote(short, False)
    with pytest.raises(Refused, match="not a staker"):
        JurorClient(chain, disputes, SaltBox(tmp_path / "x"), env.outsider).vote(short, True)
    with pytest.raises(Refused, match="reveal opens at"):
        clients[0].reveal(short)
    chain.advance_time(disputes.params().commit_window)
    with pytest.raises(Refused, match=r"voting window .* closed"):
        clients[2].vote(short, True)
    for c in clients:
        c.reveal(short)
    with pytest.raises(Refused, match="nothing to reveal"):
        clients[0].reveal(short)
    chain.advance_time(disputes.params().reveal_window)
    disputes.resolve(record.case_id, sender=env.outsider)
    assert env.d.token.balance_of(account.address) == 50 * SOGNI  # bond back

    # the coordinator acts on the outcome: strike pardoned, pay owed to the next epoch
    assert await desk.poll() == 1
    assert h.reputation.get(worker.wallet).strikes == []
    assert not h.reputation.blacklisted(worker.wallet)
    (due,) = book.due()
    rules = PayoutRules(
        wei_per_spark=10**16, stake_tiers_sogni=[0], take_rates_bps=[2000], creator_share_bps=0
    )
    restorations = Restorations(book)
    owed = restorations.owed(lambda epoch: None)
    earned, published = restorations.add_to({"0xabc": 5}, rules, 7, owed, lambda payee: 2000)
    receipt = record.receipt
    charge = epoch_math.expected_charge(
        receipt.work_units, receipt.price_factor_bps, receipt.steps_done, receipt.steps_done
    )
    worker_share = rules.split(charge * 10**16 // 10**6, receipt.model_id, 2000).worker
    assert worker_share > 0
    payee = to_checksum_address(record.payee)
    assert earned == {"0xabc": 5, payee: worker_share}
    assert [(r.payee, int(r.amount), r.take_bps) for r in published] == [
        (payee, worker_share, 2000)
    ]
    assert restorations.owed(lambda epoch: "planned") == []  # in epoch 7's pending plan
    restorations.posted(7)
    assert book.due() == []  # paid once
    assert restorations.owed(lambda epoch: None) == []
    assert await desk.poll() == 0  # nothing new; the outcome is applied once
    del sub, due
