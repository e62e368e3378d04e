"""Cheat: turning free Daily Boost Spark into one's own earnings.

A payer who also runs a node (or a node of a wallet it referred, or that referred it) has its
own boosted jobs rendered or checked by itself: the worker is paid the job's value from the
epoch's free emission, a verifier from the job's take. Neither may happen: the free grant is
spent on other people's work, never paid back to its payer's own accounts (docs/ECONOMICS.md,
"Free Spark is never its payer's earnings"). Real SQLite, real signatures, a real (embedded)
chain for the epoch.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace

import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.ledger import reserved_account, utc_day, worker_account
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.verifiers import PendingVerifications, choose_verifier, verify_step
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    JobParams,
    Message,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
)
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from sogni_protocol.pricing import Price, Quote

from .test_billing import BASELINE_MODEL, SPARK, Coordinator, _request

FREE_RULES = SettlementConfig(free_emission_sogni=1_000).rules()  # free work is paid


def _link(peer: str, wallet: str, payout: str | None = None) -> NodeLink:
    send, _ = trio.open_memory_channel[Message](1)
    return NodeLink(
        peer_id=peer,
        wallet=wallet,
        models=frozenset({BASELINE_MODEL}),
        slots=1,
        outbox=send,
        payout=payout,
    )


def _boosted(c: Coordinator, payer: LocalAccount) -> None:
    """The payer's Daily Boost for today, claimed with its signature."""
    claim = eip712.sign_boost_claim(payer.key, c.domain, utc_day(time.time()))
    assert c.billing.claim_boost(claim).amount_micro == 50 * SPARK


def test_a_payer_never_checks_its_own_boosted_jobs(tmp_path: Path) -> None:
    """The payer's own node, a node paid at the payer's account, and the node of a wallet the
    payer referred all serve the model; only the stranger's node may check the payer's job."""
    c = Coordinator.open(tmp_path / "coordinator.db", Domain(31337, "0x" + "d1" * 20))
    payer, twin, worker, stranger, partner = (Account.create() for _ in range(5))
    c.ledger.refer(twin.address, payer.address)  # the payer referred its own second wallet
    _boosted(c, payer)
    rid, _ = c.accept(payer, _request(1))
    assert c.ledger.balance(reserved_account(rid))["spark_free"] == SPARK  # boost-funded
    barred = c.billing.payer_accounts(rid)
    assert barred == {payer.address.lower(), twin.address.lower()}
    nodes = {
        "own": _link("own", payer.address),
        "paid-to-payer": _link("paid-to-payer", partner.address, payout=payer.address),
        "twin": _link("twin", twin.address),
        "stranger": _link("stranger", stranger.address),
    }
    rng = random.Random(3)
    unbarred = {choose_verifier(nodes, BASELINE_MODEL, worker.address, rng) for _ in range(200)}
    assert unbarred == set(nodes)  # every one of them could be drawn before
    picked = {
        choose_verifier(nodes, BASELINE_MODEL, worker.address, rng, payer_accounts=barred)
        for _ in range(200)
    }
    assert picked == {"stranger"}
    c.billing.finish(rid)
    assert c.billing.payer_accounts(rid) == frozenset()  # forgotten with the request
    c.close()


def test_verify_step_asks_no_node_of_the_payer() -> None:
    """With only the payer's node besides the worker's, the step goes unchecked ("no
    verifier", skipped by the checks) rather than checked, and paid, by the payer."""
    payer, worker = Account.create(), Account.create()
    dispatcher = SimpleNamespace(
        nodes={"own": _link("own", payer.address)}, verifications=PendingVerifications()
    )
    params = JobParams(
        model_id=BASELINE_MODEL,
        positive_prompt="p",
        steps=20,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )

    def opening(step: int) -> StepOpeningWire:
        data = bytes(4 * 4 * 8 * 8)
        latents = TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=data)
        timestep = ScalarEntry(name="timestep", value=None)
        return StepOpeningWire(
            step=step, tensors=[latents], scalars=[timestep], proof=[], n_leaves=21
        )

    async def main() -> None:
        verdict = await verify_step(
            dispatcher,  # type: ignore[arg-type]
            params=params,
            scheduler="",
            worker=worker.address,
            opening_k=opening(3),
            opening_next=opening(4),
            dtype="float32",
            timeout=1.0,
            payer_accounts={payer.address.lower()},
        )
        assert verdict.verifier is None and verdict.reason.startswith("no verifier")

    trio.run(main)


def test_boost_work_rendered_by_the_payer_or_its_linked_wallet_is_never_paid(
    tmp_path: Path,
) -> None:
    """The payer's boosted request of three images: one rendered by its own node, one by the
    node of the wallet it referred, one by a stranger. Only the stranger earns (from the free
    emission); the other two jobs are left unsettled, their free Spark goes back to the payer,
    and the epoch pays neither. Paid Spark rendered by the linked wallet is still paid (the
    payer's own money, docs/SETTLEMENT.md)."""
    chain = connect()
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(chain, treasury, coordinator=coordinator, distributor_funding=10 * SOGNI)
    deployment = Deployment(chain, addresses, sender=treasury)
    domain = Domain(addresses.chain_id, addresses.distributor)
    c = Coordinator.open(tmp_path / "coordinator.db", domain, rules=FREE_RULES)
    settler = Settler(
        c.store, deployment, sender=coordinator, rules=FREE_RULES, publish_dir=tmp_path / "e"
    )
    payer: LocalAccount = Account.create()
    twin: LocalAccount = Account.create()
    stranger: LocalAccount = Account.create()
    c.ledger.refer(twin.address, payer.address)
    _boosted(c, payer)
    rid, (own_job, twin_job, stranger_job) = c.accept(payer, _request(3))
    c.deliver(rid, own_job, payer)
    c.deliver(rid, twin_job, twin)
    c.deliver(rid, stranger_job, stranger)
    c.billing.finish(rid)
    for who in (payer, twin):
        assert c.ledger.balance(worker_account(who.address)) == dict.fromkeys(
            ("spark_paid", "spark_free", "sogni"), 0
        )
    assert c.ledger.balance(worker_account(stranger.address))["spark_free"] == 650_000
    assert c.ledger.balance(payer.address)["spark_free"] == 49 * SPARK  # 2 of 3 given back
    assert c.ledger.unsettled_of([own_job, twin_job, stranger_job]) == [own_job, twin_job]
    c.conserved()

    left = 49 * SPARK  # the rest of the boost, held by another request: the next is paid
    c.ledger.reserve(
        "ab" * 32,
        payer.address,
        Quote(BASELINE_MODEL, 1, "fast", "spark", 0.005, Price(1.0, 1, left, left)),
    )
    c.ledger.credit_purchase(payer.address, 1)
    rid2, (paid_job,) = c.accept(payer, _request(1))
    assert c.ledger.balance(reserved_account(rid2))["spark_paid"] == SPARK
    c.deliver(rid2, paid_job, twin)
    c.billing.finish(rid2)
    assert c.ledger.balance(worker_account(twin.address))["spark_paid"] == 650_000

    result = settler.close_epoch()
    assert result is not None
    assert payer.address not in result.payouts
    assert set(result.payouts) >= {stranger.address, twin.address}
    assert result.payouts[twin.address] == 650_000 * 10**12  # the paid job only
    for job in (own_job, twin_job):
        settled = c.store.receipt_settlement(job)
        assert settled is not None and settled[1] == "refused"
    c.close()
