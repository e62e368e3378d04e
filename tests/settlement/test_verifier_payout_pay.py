"""Verifier pay at payout addresses (issue #12, docs/SETTLEMENT.md "Verifier nodes are paid
from the take"): the coordinator records a verifier's work at its payout account
(`tests/coordinator/test_verifier_payout.py` shows the record), the epoch pays it there on
the embedded chain, and neither the receipt's worker nor its payout account is ever paid
for checking that receipt, by the settler or in a batch the audit accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

from sogni_coordinator.settlement.epochs import epoch_claims
from sogni_coordinator.store import Store
from sogni_protocol.epoch_audit import audit_folder
from sogni_protocol.epoch_files import VerifierPay
from sogni_protocol.payout_rules import SOGNI

from . import forge
from .settle_env import Net, settler, signed_receipt, store_receipts, worker

EPHEMERAL, PAYOUT = worker(21), worker(22)
"""The worker: a container's throwaway key, paid to its operator's PAYOUT account."""
CONTAINER, OPERATOR = worker(23), worker(24)
"""The verifier: another operator's container key and that operator's payout account."""
STEP = SOGNI // 8  # a 1-Spark job (1 SOGNI at the default rate) of 8 steps
WORKER_AMOUNT = SOGNI * 65 // 100  # tier 0: take 30 %, creator share 5 %


def test_a_verifier_container_is_paid_at_its_payout_account(
    net: Net, store: Store, tmp_path: Path
) -> None:
    signed = signed_receipt(EPHEMERAL, net.domain, payout=PAYOUT.address)
    store_receipts(store, [signed])
    job = signed.receipt.job_id
    store.record_verifier_work(job, OPERATOR.address.lower(), 2)  # as `checks` records it
    # recorded against the receipt's own accounts (a coordinator bug): never paid
    store.record_verifier_work(job, PAYOUT.address, 1)
    store.record_verifier_work(job, EPHEMERAL.address, 1)
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None and result.paid_receipts == 1
    assert result.payouts == {PAYOUT.address: WORKER_AMOUNT, OPERATOR.address: 2 * STEP}
    (entry,) = forge.batch_of(tmp_path / "epochs", 1).receipts
    assert entry.verifiers == [VerifierPay(account=OPERATOR.address, steps=2, amount=str(2 * STEP))]
    assert audit_folder(tmp_path / "epochs").ok

    # the operator's account claims it on chain (anyone may send the claim); the container
    # key is in no leaf
    claims = epoch_claims(store.epoch_record(1))  # type: ignore[arg-type]
    assert {c["account"] for c in claims["claims"]} == {PAYOUT.address, OPERATOR.address}
    claim = next(c for c in claims["claims"] if c["account"] == OPERATOR.address)
    before = net.d.token.balance_of(OPERATOR.address)
    net.d.distributor.claim(
        OPERATOR.address, int(claim["cumulativeAmount"]), claim["proof"], sender=net.treasury
    )
    assert net.d.token.balance_of(OPERATOR.address) - before == 2 * STEP
    assert net.d.token.balance_of(CONTAINER.address) == 0

    # a coordinator paying the worker's payout account as a verifier of its own receipt,
    # every downstream file rebuilt to match: the audit names it
    copy = Path(shutil.copytree(tmp_path / "epochs", tmp_path / "forged"))
    batch = forge.batch_of(copy, 1)
    self_paid = [VerifierPay(account=PAYOUT.address, steps=1, amount=str(STEP))]
    forged = forge.replace(batch, receipts=[forge.replace(entry, verifiers=self_paid)])
    forge.publish_batch(copy, 1, forged)
    report = audit_folder(copy)
    assert not report.ok
    assert report.first_problem is not None
    assert (
        f"the payout address {PAYOUT.address} is paid as a verifier of its own receipt"
        in report.first_problem
    )
