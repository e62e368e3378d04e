"""Verifier nodes are paid from the take for the steps they re-ran (issue #12), and the audit
refuses a batch whose verifier pay does not follow the rule.

One honest folder of two epochs is built once on the embedded chain: a worker's receipts,
checked by two verifier wallets (and, recorded by mistake, by the worker itself); the first
job's verifiers are owed more than its take and are scaled down to it. Every forgery edits a
copy, as consistently as a coordinator holding its own keys could, and must be named.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from sogni_chain import connect
from sogni_coordinator.settlement.epochs import epoch_claims
from sogni_coordinator.store import Store
from sogni_node import rewards
from sogni_protocol.epoch_audit import audit_folder
from sogni_protocol.epoch_files import (
    BatchEntry,
    ReceiptsBatch,
    VerifierPay,
    content_hash,
    decode_batch,
    encode,
    receipts_filename,
)
from sogni_protocol.payout_rules import SOGNI

from . import forge
from .settle_env import Net, make_net, settler, signed_receipt, store_receipts, worker

W, V1, V2, V3 = worker(1), worker(5), worker(6), worker(7)
STEP = SOGNI // 8  # a 1-Spark job (1 SOGNI at the default rate) of 8 steps
TAKE = 3 * SOGNI // 10  # tier-0 take: 30%
WORKER_PER_JOB = SOGNI * 65 // 100  # 1 - 30% take - 5% creator share: never touched


@dataclass
class Honest:
    net: Net
    store: Store
    folder: Path
    jobs: list[str]
    """0x job ids: [checked by V1 (2 steps), V2 and W itself; unchecked; checked by V1]."""


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, _nets: dict[str, Net]) -> Iterator[Honest]:
    if "embedded" not in _nets:
        _nets["embedded"] = make_net("embedded", connect())
    net = _nets["embedded"]
    snap = net.chain.snapshot()
    tmp = tmp_path_factory.mktemp("verifier-pay")
    store = Store(tmp / "coordinator.db")
    try:
        s = settler(store, net, tmp)
        first = [signed_receipt(W, net.domain), signed_receipt(W, net.domain)]
        store_receipts(store, first)
        checked = first[0].receipt.job_id
        for who, steps in ((V1, 1), (V1, 1), (V2, 1), (W, 1)):  # V1 twice: one per answer
            store.record_verifier_work(checked, who.address, steps)
        assert s.close_epoch() is not None
        second = signed_receipt(W, net.domain)
        store_receipts(store, [second])
        store.record_verifier_work(second.receipt.job_id, V1.address, 1)
        assert s.close_epoch() is not None
        jobs = ["0x" + r.receipt.job_id.hex() for r in [*first, second]]
        yield Honest(net, store, tmp / "epochs", jobs)
    finally:
        store.close()
        net.chain.revert(snap)


def _entry(batch: ReceiptsBatch, job: str) -> BatchEntry:
    (e,) = [e for e in batch.receipts if e.job_id == job]
    return e


def _with_entry(batch: ReceiptsBatch, e: BatchEntry) -> ReceiptsBatch:
    receipts = [e if x.job_id == e.job_id else x for x in batch.receipts]
    return forge.replace(batch, receipts=receipts)


def _pay(who: str, steps: int, amount: int) -> VerifierPay:
    return VerifierPay(account=who, steps=steps, amount=str(amount))


def _listed(*pays: VerifierPay) -> list[VerifierPay]:
    """As the batch lists verifiers: by lowercase account."""
    return sorted(pays, key=lambda p: p.account.lower())


# --- the honest folder ----------------------------------------------------------------------
def test_verifiers_are_paid_from_the_take_and_claim_like_workers(honest: Honest) -> None:
    one = forge.batch_of(honest.folder, 1)
    checked = _entry(one, honest.jobs[0])
    # owed 3 steps (0.375) from a take of 0.3: pro rata, 0.2 and 0.1; the worker itself: nothing
    assert [(v.account, v.steps, int(v.amount)) for v in checked.verifiers] == sorted(
        [(V1.address, 2, 2 * SOGNI // 10), (V2.address, 1, SOGNI // 10)],
        key=lambda v: v[0].lower(),  # listed by lowercase account
    )
    assert int(checked.worker_amount) == WORKER_PER_JOB  # never from the worker's amount
    assert _entry(one, honest.jobs[1]).verifiers == []
    assert one.format == "sogni-receipts-v5"
    two = forge.batch_of(honest.folder, 2)
    assert [(v.account, int(v.amount)) for v in _entry(two, honest.jobs[2]).verifiers] == [
        (V1.address, STEP)  # within the take: a full step's worth
    ]

    # the epoch files: payouts and cumulative leaves include the verifiers
    ef1, ef2 = forge.epoch_file(honest.folder, 1), forge.epoch_file(honest.folder, 2)
    assert ef2.format == "sogni-epoch-v3"
    payouts = {p.account: (int(p.amount), p.receipts) for p in ef1.payouts}
    assert payouts[V1.address] == (2 * SOGNI // 10, 0) and payouts[W.address][1] == 2
    leaves = dict(ef2.leaf_ints())
    assert leaves[V1.address] == 2 * SOGNI // 10 + STEP
    assert leaves[V2.address] == SOGNI // 10
    assert leaves[W.address] == 3 * WORKER_PER_JOB
    assert int(ef2.total) == sum(leaves.values())
    assert audit_folder(honest.folder).ok, audit_folder(honest.folder).problems

    # a verifier node audits its own account and claims its cumulative amount on chain
    published = rewards.load_published(honest.folder)
    report = rewards.audit(V1.address, [], published)
    assert report.problems == [] and report.earned == leaves[V1.address]
    net = honest.net
    net.chain.send_eth(V1.address, 10**18, sender=net.treasury)  # gas
    before = net.d.token.balance_of(V1)
    assert rewards.claim(net.d.distributor, V1, published) == leaves[V1.address]
    assert net.d.token.balance_of(V1) - before == leaves[V1.address]
    claims = epoch_claims(honest.store.epoch_record(2))  # type: ignore[arg-type]
    v2 = next(c for c in claims["claims"] if c["account"] == V2.address)
    tx = net.d.distributor.claim(
        V2.address, int(v2["cumulativeAmount"]), v2["proof"], sender=net.treasury
    )
    assert tx.event("Claimed")["amount"] == SOGNI // 10


# --- forgeries ------------------------------------------------------------------------------
@pytest.fixture
def copy(honest: Honest, tmp_path: Path) -> Path:
    return Path(shutil.copytree(honest.folder, tmp_path / "epochs"))


def _forged(honest: Honest, copy: Path, job: int, **changes: object) -> str:
    """Epoch 1's batch with job `job`'s entry changed, everything downstream rebuilt: the
    audit's first problem."""
    batch = forge.batch_of(copy, 1)
    e = forge.replace(_entry(batch, honest.jobs[job]), **changes)
    forge.publish_batch(copy, 1, _with_entry(batch, e))
    report = audit_folder(copy)
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.startswith("epoch 1: receipts file")
    return report.first_problem


def test_a_changed_amount_is_refused(honest: Honest, copy: Path) -> None:
    moved = _listed(_pay(V1.address, 2, 2 * SOGNI // 10 + 1), _pay(V2.address, 1, SOGNI // 10 - 1))
    why = _forged(honest, copy, 0, verifiers=moved)
    assert f"verifier {V2.address} is paid {SOGNI // 10 - 1} for 1 steps" in why


def test_pay_above_the_take_is_refused(honest: Honest, copy: Path) -> None:
    uncapped = _listed(_pay(V1.address, 2, 2 * STEP), _pay(V2.address, 1, STEP))
    why = _forged(honest, copy, 0, verifiers=uncapped)
    assert f"more than the take of {TAKE}" in why


def test_pay_to_the_worker_itself_is_refused(honest: Honest, copy: Path) -> None:
    why = _forged(honest, copy, 1, verifiers=[_pay(W.address, 1, STEP)])
    assert "paid as a verifier of its own receipt" in why


def test_more_steps_than_the_job_has_are_refused(honest: Honest, copy: Path) -> None:
    why = _forged(honest, copy, 1, verifiers=[_pay(V3.address, 9, TAKE)])
    assert "paid for 9 steps of a 8-step job" in why


def test_verifier_paid_from_the_workers_amount_is_refused(honest: Honest, copy: Path) -> None:
    why = _forged(
        honest,
        copy,
        1,
        verifiers=[_pay(V3.address, 1, STEP)],
        worker_amount=str(WORKER_PER_JOB - STEP),
    )
    assert "paid/free/worker/creator amounts are" in why


def test_listed_twice_or_not_checksummed_is_refused(honest: Honest, copy: Path) -> None:
    twice = [_pay(V3.address, 1, STEP // 2), _pay(V3.address, 1, STEP // 2)]
    assert "not listed once each" in _forged(honest, copy, 1, verifiers=twice)
    lower = [_pay(V3.address.lower(), 1, STEP)]
    assert "is not a checksummed address" in _forged(honest, copy, 1, verifiers=lower)


def test_a_verifier_the_leaves_do_not_pay_is_refused(honest: Honest, copy: Path) -> None:
    """Verifier pay added by the rule (out of the take), the batch re-hashed and re-pointed,
    but the leaves, total and root left as they were: the tree no longer matches."""
    batch = forge.batch_of(copy, 1)
    e = forge.replace(_entry(batch, honest.jobs[1]), verifiers=[_pay(V3.address, 1, STEP)])
    ef = forge.epoch_file(copy, 1)
    (copy / ef.receipts_file).unlink()
    raw = encode(_with_entry(batch, e))
    name = f"receipts/{receipts_filename(content_hash(raw))}"
    (copy / name).write_bytes(raw)
    digest = "0x" + content_hash(raw).hex()
    forge.write_epoch(copy, forge.replace(ef, receipts_hash=digest, receipts_file=name))
    report = audit_folder(copy)
    assert report.first_problem == (
        f"epoch 1: epoch-000001.json: account {V3.address}: no leaf, the receipts give {STEP}"
    )
    # the same edit with the tree rebuilt is internally consistent (see docs/AUDIT.md: the
    # files cannot prove a verifier did the work; only that it is paid by the rule)
    forge.rebuild(copy, 1)
    assert audit_folder(copy).ok


def test_a_v3_batch_cannot_pay_verifiers(honest: Honest) -> None:
    batch = forge.batch_of(honest.folder, 1)
    old = msgspec.structs.replace(batch, format="sogni-receipts-v3")
    with pytest.raises(ValueError, match="cannot pay verifiers"):
        decode_batch(encode(old))
