"""Billing on real SQLite, real signatures and a real (embedded) chain: stake-tiered take per
receipt, the same numbers epoch settlement pays; Daily Boost and balances; what a restarted
coordinator does with the reservations it finds."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from sogni_app.api import authorize
from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.billing import Billing, Refusal
from sogni_coordinator.chain_link import ChainLink
from sogni_coordinator.job_state import JobState
from sogni_coordinator.ledger import (
    ISSUERS,
    PLATFORM,
    Ledger,
    creator_account,
    next_utc_midnight,
    reserved_account,
    utc_day,
    worker_account,
)
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.standing import Standing
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import JobOffer, JobParams, Receipt, RenderRequest
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from sogni_protocol.pricing import quote

BASELINE_MODEL = "sdxl-base-1.0"  # SDXL class: 1024x1024, 20 steps = 43.2 render s = 1 Spark
SPARK = 1_000_000  # micro
COORDINATOR = Account.from_key(b"\x0c" * 32)
RULES = SettlementConfig().rules()  # tiers 0/1k/10k/100k SOGNI -> take 30/25/20/15 %, creator 5 %


def _request(n: int, **kw: object) -> RenderRequest:
    fields: dict[str, object] = dict(
        model_id=BASELINE_MODEL,
        positive_prompt="a lighthouse",
        steps=20,
        width=1024,
        height=1024,
        number_of_images=n,
    )
    fields.update(kw)
    return RenderRequest(**fields)  # type: ignore[arg-type]


def _jobs(req: RenderRequest, request_id: bytes) -> list[tuple[bytes, JobParams, int]]:
    """The request's jobs, each known by the id derived from the hash its payer signed (as
    `Dispatcher.submit` names the jobs of a paid request)."""
    params = JobParams(
        model_id=req.model_id,
        positive_prompt=req.positive_prompt,
        steps=req.steps,
        guidance=req.guidance,
        width=req.width,
        height=req.height,
        seed=0,
    )
    units = quote(req).per_image.work_units
    return [(eip712.job_id_of(request_id, i), params, units) for i in range(req.number_of_images)]


def _receipt(
    worker: LocalAccount, domain: Domain, job_id: bytes, units: int, steps_done: int = 20
) -> tuple[Receipt, bytes, tuple[JobOffer, bytes]]:
    """A worker's receipt answering the offer the coordinator signed for `job_id` (an epoch
    pays only a receipt that answers a signed offer)."""
    offer = JobOffer(
        job_id=job_id,
        coordinator=COORDINATOR.address,
        model_id=BASELINE_MODEL,
        params_hash=os.urandom(32),
        steps=20,
        width=1024,
        height=1024,
        seed=0,
        work_units=units,
        deadline=1_700_000_600,
    )
    receipt = Receipt(
        job_id=job_id,
        offer_hash=eip712.offer_hash(domain, offer),
        worker=worker.address,
        coordinator=COORDINATOR.address,
        model_id=BASELINE_MODEL,
        result_hash=os.urandom(32),
        steps_done=steps_done,
        work_units=units * steps_done // 20,
        completed_at=1_700_000_000,
    )
    offer_signature = eip712.sign_offer(COORDINATOR.key, domain, offer)
    return receipt, eip712.sign_receipt(worker.key, domain, receipt), (offer, offer_signature)


@dataclass
class Coordinator:
    """The parts of a coordinator that hold money: store and ledger in one database."""

    path: Path
    domain: Domain
    store: Store
    ledger: Ledger
    billing: Billing

    @classmethod
    def open(cls, path: Path, domain: Domain, **kw: object) -> Coordinator:
        store, ledger = Store(path), Ledger(path)
        return cls(path, domain, store, ledger, Billing(ledger, domain, **kw))  # type: ignore[arg-type]

    def restart(self, **kw: object) -> Coordinator:
        self.close()
        return Coordinator.open(self.path, self.domain, **kw)

    def close(self) -> None:
        self.store.close()
        self.ledger.close()

    def accept(self, payer: LocalAccount, req: RenderRequest) -> tuple[bytes, list[bytes]]:
        """What `Dispatcher.submit` does: reserve under the hash the payer signed (the paid
        request's id), then commit the request and its jobs (ids derived from it)."""
        signed = authorize(req, payer.key, self.domain)
        rid = eip712.request_hash(signed)
        self.billing.admit(signed, rid)
        jobs = _jobs(req, rid)
        self.store.add_request(
            rid,
            model_id=req.model_id,
            network=req.network,
            token_type=req.token_type,
            client_peer="test",
            jobs=jobs,
        )
        return rid, [j for j, _, _ in jobs]

    def deliver(
        self, rid: bytes, job_id: bytes, worker: LocalAccount, *, settle: bool = True
    ) -> None:
        """A verified receipt is stored, then (unless the coordinator stops first) settled."""
        units = quote(_request(1)).per_image.work_units
        receipt, signature, offer = _receipt(worker, self.domain, job_id, units)
        assert self.store.store_receipt(receipt, signature, rid, offer=offer)
        if settle:
            self.billing.settle(rid, job_id, worker.address, 20, 20)

    def conserved(self) -> None:
        """Every asset sums to zero, and no account but the issuers is negative."""
        assert set(self.ledger.totals().values()) == {0}
        for account, held in self.ledger.balances().items():
            if account not in ISSUERS:
                assert min(held.values()) >= 0, account


@pytest.fixture
def payer() -> LocalAccount:
    acct: LocalAccount = Account.create()
    return acct


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator.open(tmp_path / "coordinator.db", Domain(31337, "0x" + "d1" * 20))
    yield c
    c.close()


# --- take rate per receipt follows the worker's stake tier ---------------------------------
def test_take_rate_per_receipt_follows_stake_on_chain_as_settlement_does(tmp_path: Path) -> None:
    chain = connect()
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(
        chain, treasury, coordinator=coordinator, distributor_funding=1_000 * SOGNI
    )
    deployment = Deployment(chain, addresses, sender=treasury)
    stakes = {3: 0, 4: 1_000, 5: 10_000, 6: 100_000}  # account index -> whole SOGNI staked
    for i, amount in stakes.items():
        if amount:
            worker = chain.accounts[i]
            deployment.token.transfer(worker, amount * SOGNI)
            deployment.token.approve(deployment.staking.address, amount * SOGNI, sender=worker)
            deployment.staking.stake(amount * SOGNI, sender=worker)
    workers = {i: chain.accounts[i] for i in stakes}
    domain = Domain(addresses.chain_id, addresses.distributor)
    c = Coordinator.open(tmp_path / "coordinator.db", domain, rules=RULES)
    settler = Settler(
        c.store, deployment, sender=coordinator, rules=RULES, publish_dir=tmp_path / "epochs"
    )
    c.billing.standing = ChainLink(deployment, settler).standing  # what service.py wires
    payer: LocalAccount = Account.create()
    c.ledger.credit_purchase(payer.address, 10)
    rid, jobs = c.accept(payer, _request(4))
    assert c.ledger.balance(reserved_account(rid))["spark_paid"] == 4 * SPARK  # the baseline
    for worker, job in zip(workers.values(), jobs, strict=True):
        c.deliver(rid, job, worker)
    c.billing.finish(rid)

    # 1 Spark per image: worker gets 1 - take(tier) - 5 % creator share
    earned = {
        i: c.ledger.balance(worker_account(w.address))["spark_paid"] for i, w in workers.items()
    }
    assert earned == {3: 650_000, 4: 700_000, 5: 750_000, 6: 800_000}
    assert c.ledger.balance(PLATFORM)["spark_paid"] == 300_000 + 250_000 + 200_000 + 150_000
    assert c.ledger.balance(creator_account(BASELINE_MODEL))["spark_paid"] == 4 * 50_000
    assert c.ledger.balance(payer.address)["spark_paid"] == 6 * SPARK
    c.conserved()

    # the epoch pays the same split on chain (1 SOGNI per Spark: micro-Spark x 10^12 wei)
    result = settler.close_epoch()
    assert result is not None
    for i, worker in workers.items():
        assert result.payouts[worker.address] == earned[i] * 10**12
    c.close()


def test_a_staked_payers_discounted_job_is_paid_on_chain_and_audits(tmp_path: Path) -> None:
    """The payer's stake discount is charged, published with the settlement and checked
    against the signed offer's price less that discount: the epoch pays the worker its share
    of the discounted charge, the published files recompute, and a forged discount does not."""
    import json

    from web3.types import Wei

    from sogni_coordinator.staking_benefits import PayerBenefits
    from sogni_protocol.epoch_audit import audit_folder
    from sogni_protocol.stake_benefits import StakeBenefits

    chain = connect()
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(
        chain, treasury, coordinator=coordinator, distributor_funding=1_000 * SOGNI
    )
    deployment = Deployment(chain, addresses, sender=treasury)
    payer: LocalAccount = chain.add_key(b"\x5a" * 32)
    chain.w3.eth.send_transaction(
        {"from": treasury.address, "to": payer.address, "value": Wei(10**18)}
    )
    deployment.token.transfer(payer.address, 1_000 * SOGNI)  # tier 1: 5 % off
    deployment.token.approve(deployment.staking.address, 1_000 * SOGNI, sender=payer.address)
    deployment.staking.stake(1_000 * SOGNI, sender=payer.address)
    domain = Domain(addresses.chain_id, addresses.distributor)
    c = Coordinator.open(tmp_path / "coordinator.db", domain, rules=RULES)
    settler = Settler(
        c.store, deployment, sender=coordinator, rules=RULES, publish_dir=tmp_path / "epochs"
    )
    link = ChainLink(deployment, settler)
    c.billing.standing = link.standing  # what service.py wires
    c.billing.benefits = PayerBenefits(StakeBenefits(), link.standing)
    c.ledger.credit_purchase(payer.address, 10)
    worker = chain.accounts[3]
    rid, (job,) = c.accept(payer, _request(1))
    assert c.ledger.balance(reserved_account(rid))["spark_paid"] == 950_000  # 1 Spark, 5 % off
    c.deliver(rid, job, worker)
    c.billing.finish(rid)
    earned = c.ledger.balance(worker_account(worker.address))["spark_paid"]
    assert earned == 950_000 * 65 // 100  # tier 0 worker: 30 % take, 5 % creator

    result = settler.close_epoch()
    assert result is not None and result.payouts[worker.address] == earned * 10**12
    report = audit_folder(tmp_path / "epochs")
    assert report.ok, report.problems
    (batch_file,) = (tmp_path / "epochs" / "receipts").glob("*.json")
    published = json.loads(batch_file.read_text())
    assert published["receipts"][0]["settlement"]["discountBps"] == 500
    c.close()

    # a coordinator claiming a deeper discount than it charged is caught by anyone's audit
    forged = batch_file.read_text().replace('"discountBps":500', '"discountBps":1000')
    assert forged != batch_file.read_text()
    batch_file.write_text(forged)
    assert not audit_folder(tmp_path / "epochs").ok


def test_a_revoked_or_limited_api_keys_account_cannot_pay_outside_the_gateway(
    coord: Coordinator,
) -> None:
    """Whoever holds an API key can derive its account's key and sign requests over the
    native protocol: the key's revocation and daily limit hold there too (the gateway checks
    its own requests, once)."""
    from sogni_coordinator.api_keys import ApiKeys, account_private_key

    keys = ApiKeys(coord.path)
    try:
        coord.billing.key_accounts = keys
        key, account = keys.create("an app", daily_limit_spark=1.5)
        coord.ledger.credit_purchase(account, 10)
        holder: LocalAccount = Account.from_key(account_private_key(key))
        assert holder.address == account
        coord.accept(holder, _request(1))  # 1 Spark of its 1.5 a day
        with pytest.raises(Refusal, match="daily spend limit") as limited:
            coord.accept(holder, _request(1))
        assert limited.value.code == "unauthorized"
        assert coord.ledger.balance(account)["spark_paid"] == 9 * SPARK  # the first only
        signed = authorize(_request(1), holder.key, coord.domain)
        coord.billing.admit(signed, eip712.request_hash(signed), via_gateway=True)  # checked
        (record,) = keys.list()
        assert keys.revoke(record.key_id)
        with pytest.raises(Refusal, match="revoked"):
            coord.accept(holder, _request(1, seed=5))
        assert coord.ledger.balance(account)["spark_paid"] == 8 * SPARK
        other: LocalAccount = Account.create()  # a wallet that is no key's: unaffected
        coord.ledger.credit_purchase(other.address, 1)
        coord.accept(other, _request(1))
    finally:
        keys.close()


def test_a_receipt_committed_after_its_request_ended_is_refused_not_kept_waiting(
    tmp_path: Path,
) -> None:
    """The node's last attempt ran out while its receipt was being written: the request
    ended and was refunded, then the receipt committed. Nothing was charged for it, so no
    epoch can pay it; it is refused with that reason (it waited in every epoch, forever)."""
    from sogni_coordinator.settlement.epochs import ENDED_UNSETTLED

    chain = connect()
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(chain, treasury, coordinator=coordinator, distributor_funding=SOGNI)
    deployment = Deployment(chain, addresses, sender=treasury)
    domain = Domain(addresses.chain_id, addresses.distributor)
    c = Coordinator.open(tmp_path / "coordinator.db", domain, rules=RULES)
    settler = Settler(
        c.store, deployment, sender=coordinator, rules=RULES, publish_dir=tmp_path / "epochs"
    )
    payer: LocalAccount = Account.create()
    c.ledger.credit_purchase(payer.address, 1)
    rid, (job,) = c.accept(payer, _request(1))
    c.billing.finish(rid)  # given up: refunded
    c.deliver(rid, job, chain.accounts[3], settle=False)  # ... and then its receipt commits
    assert settler.close_epoch() is None  # nothing payable
    assert c.store.receipt_settlement(job) == (None, "refused", ENDED_UNSETTLED)
    assert c.ledger.balance(payer.address)["spark_paid"] == SPARK  # nothing was charged
    c.close()


# --- Daily Boost and balances ------------------------------------------------------------
NOON = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC).timestamp()


def test_daily_boost_once_a_day_with_a_signed_claim(
    coord: Coordinator, payer: LocalAccount
) -> None:
    coord.billing.clock = lambda: NOON
    claim = eip712.sign_boost_claim(payer.key, coord.domain, "2025-06-01")
    granted = coord.billing.claim_boost(claim)
    assert granted.amount_micro == 50 * SPARK and granted.day == "2025-06-01"
    assert granted.balances.spark_free == 50 * SPARK
    assert granted.next_claim_at == dt.datetime(2025, 6, 2, tzinfo=dt.UTC).timestamp()
    with pytest.raises(Refusal) as again:  # the same signed claim, replayed
        coord.billing.claim_boost(claim)
    assert again.value.code == "already_claimed"
    assert "next claim opens at 2025-06-02T00:00:00Z" in again.value.reason
    with pytest.raises(Refusal) as stale:  # yesterday's claim cannot be used today
        coord.billing.claim_boost(eip712.sign_boost_claim(payer.key, coord.domain, "2025-05-31"))
    assert stale.value.code == "wrong_day" and "today is 2025-06-01" in stale.value.reason
    coord.billing.clock = lambda: NOON + 12 * 3600  # 00:00 UTC the next day
    assert (
        coord.billing.claim_boost(
            eip712.sign_boost_claim(payer.key, coord.domain, "2025-06-02")
        ).balances.spark_free
        == 100 * SPARK
    )
    coord.conserved()


def test_off_a_local_network_a_fresh_wallet_gets_no_daily_boost(
    coord: Coordinator, payer: LocalAccount
) -> None:
    """A script minting wallets got a day's free Spark with each: renders for nothing (and
    unpaid workers where the free budget is 0). Only a paying or staking account claims."""
    coord.billing.clock = lambda: NOON
    coord.billing.boost_for_anyone = False
    claim = eip712.sign_boost_claim(payer.key, coord.domain, "2025-06-01")
    with pytest.raises(Refusal) as fresh:
        coord.billing.claim_boost(claim)
    assert fresh.value.code == "not_eligible" and payer.address in fresh.value.reason
    assert coord.ledger.balances() == {}
    staker = Account.create()
    coord.billing.standing = lambda w: Standing(stake=1) if w == staker.address else Standing()
    staked = coord.billing.claim_boost(
        eip712.sign_boost_claim(staker.key, coord.domain, "2025-06-01")
    )
    assert staked.amount_micro == 50 * SPARK
    coord.ledger.credit_purchase(payer.address, 1)  # a customer now
    assert coord.billing.claim_boost(claim).amount_micro == 50 * SPARK


def test_forged_and_foreign_claims_are_refused(coord: Coordinator, payer: LocalAccount) -> None:
    coord.billing.clock = lambda: NOON
    other_chain = eip712.sign_boost_claim(
        payer.key, Domain(1, coord.domain.verifying_contract), "2025-06-01"
    )
    with pytest.raises(Refusal) as info:
        coord.billing.claim_boost(other_chain)
    assert info.value.code == "unauthorized"
    assert f"chain {coord.domain.chain_id}" in info.value.reason  # says which domain to use
    someone_else = msgspec.structs.replace(
        eip712.sign_boost_claim(payer.key, coord.domain, "2025-06-01"),
        payer=Account.create().address,
    )
    with pytest.raises(Refusal, match="not from the payer"):
        coord.billing.claim_boost(someone_else)
    assert coord.ledger.balances() == {}  # nothing granted
    coord.billing.mode = "off"
    with pytest.raises(Refusal) as off:
        coord.billing.claim_boost(eip712.sign_boost_claim(payer.key, coord.domain, "2025-06-01"))
    assert off.value.code == "billing_off"


def test_balance_report_shows_spendable_reserved_and_boost(
    coord: Coordinator, payer: LocalAccount
) -> None:
    now = time.time()
    coord.billing.clock = lambda: now
    coord.ledger.credit_purchase(payer.address, 3)
    peer = "12D3KooWclient"
    query = eip712.sign_balance_query(payer.key, coord.domain, peer, int(now) + 60)
    report = coord.billing.report(query, peer)
    assert report.balances.spark_paid == 3 * SPARK and report.reserved.spark_paid == 0
    assert report.boost_available and report.next_boost_at == int(now)
    coord.accept(payer, _request(2))
    coord.billing.claim_boost(eip712.sign_boost_claim(payer.key, coord.domain, utc_day(now)))
    report = coord.billing.report(query, peer)
    assert report.reserved.spark_paid == 2 * SPARK and report.balances.spark_paid == SPARK
    assert report.balances.spark_free == 50 * SPARK
    assert not report.boost_available and report.next_boost_at == next_utc_midnight(now)
    with pytest.raises(Refusal, match="another peer id"):
        coord.billing.report(query, "12D3KooWthief")
    coord.billing.clock = lambda: now + 61
    with pytest.raises(Refusal, match="expired"):
        coord.billing.report(query, peer)


# --- restart --------------------------------------------------------------------------------
def test_restart_settles_missed_receipts_refunds_ended_requests_keeps_running_ones(
    coord: Coordinator, payer: LocalAccount
) -> None:
    worker: LocalAccount = Account.create()
    coord.ledger.credit_purchase(payer.address, 20)
    running, (r0, r1) = coord.accept(payer, _request(2))
    coord.deliver(running, r0, worker, settle=False)  # stopped between the two commits
    ended, (e0, e1) = coord.accept(payer, _request(2))
    coord.deliver(ended, e0, worker)
    coord.deliver(ended, e1, worker, settle=False)
    failed, (f0, f1) = coord.accept(payer, _request(2))
    coord.deliver(failed, f0, worker, settle=False)
    coord.store.save_job_states([(f1, JobState.FAILED, 1)])  # given up on: nothing to pay
    orphan = os.urandom(32)  # reserved, then stopped before the request was stored
    coord.billing.admit(authorize(_request(3), payer.key, coord.domain), orphan)
    assert coord.ledger.balance(payer.address)["spark_paid"] == 11 * SPARK

    coord = coord.restart()
    assert coord.billing.restore(coord.store) == 1  # only `running` still has queued jobs
    # settled: r0, e0, e1, f0; refunded: f1 and the orphan's 3; held: r1
    assert coord.ledger.balance(payer.address)["spark_paid"] == 15 * SPARK
    assert coord.ledger.balance(reserved_account(running))["spark_paid"] == SPARK
    for rid in (ended, failed, orphan):
        assert sum(coord.ledger.balance(reserved_account(rid)).values()) == 0
    assert coord.ledger.open_reservations()[0].request_id == running.hex()

    coord.deliver(running, r1, worker)  # the re-queued job finishes after the restart
    coord.billing.finish(running)
    # five images delivered and paid once each (no chain: tier 0, 30 % take, 5 % creator)
    assert coord.ledger.balance(payer.address)["spark_paid"] == 15 * SPARK
    assert coord.ledger.balance(worker_account(worker.address))["spark_paid"] == 5 * 650_000
    assert coord.ledger.open_reservations() == []
    coord.conserved()
    coord.billing.restore(coord.store)  # restarting again changes nothing
    assert coord.ledger.balance(payer.address)["spark_paid"] == 15 * SPARK


def test_a_signed_request_cannot_be_replayed_after_a_restart(
    coord: Coordinator, payer: LocalAccount
) -> None:
    coord.ledger.credit_purchase(payer.address, 10)
    signed = authorize(_request(1), payer.key, coord.domain)
    coord.billing.admit(signed, os.urandom(32))
    coord = coord.restart()
    with pytest.raises(Refusal) as info:
        coord.billing.admit(signed, os.urandom(32))
    assert info.value.code == "replayed"
    assert coord.ledger.balance(payer.address)["spark_paid"] == 9 * SPARK
