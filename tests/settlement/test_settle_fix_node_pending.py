"""A node's audit calls an unbatched receipt missing only once the coordinator's dispute window
(and a grace for checks and queued settlements) has passed before the latest close: receipts
the settler had to leave out are pending, not a false alarm."""

from __future__ import annotations

import time
from pathlib import Path

from sogni_coordinator.store import Store
from sogni_node.journal import JournalReceipt
from sogni_node.rewards import MAX_DISPUTE_WINDOW_S, PENDING_GRACE_S, audit, load_published

from .settle_env import (
    Net,
    SignedReceipt,
    settler,
    signed_receipt,
    store_receipts,
    stored_at,
    worker,
)

WINDOW = 3600.0


def _journalled(net: Net, sr: SignedReceipt, recorded_at: float) -> JournalReceipt:
    return JournalReceipt(
        receipt=sr.receipt,
        signature=sr.signature,
        image_sha256=b"",
        chain_id=net.domain.chain_id,
        verifying_contract=net.domain.verifying_contract,
        meta=None,
        recorded_at=recorded_at,
        accepted=True,
        ack_reason=None,
        domain_version="4",
    )


def test_receipts_inside_the_dispute_window_are_pending_not_missing(
    net: Net, store: Store, tmp_path: Path
) -> None:
    now = [0.0]
    s = settler(store, net, tmp_path, dispute_window=WINDOW, clock=lambda: now[0])
    w = worker(1)
    early, late = signed_receipt(w, net.domain), signed_receipt(w, net.domain)
    dropped = signed_receipt(w, net.domain)  # accepted, and never settled by the coordinator
    store_receipts(store, [early])
    t0 = stored_at(store, early.receipt.job_id)
    time.sleep(0.05)
    store_receipts(store, [late])
    t1 = stored_at(store, late.receipt.job_id)
    assert t1 > t0
    now[0] = (t0 + t1) / 2 + WINDOW  # early's window has closed, late's has not
    result = s.close_epoch()
    assert result is not None and result.paid_receipts == 1
    epochs = load_published(tmp_path / "epochs")
    closed = epochs[-1].file.closed_at
    paid = _journalled(net, early, t0)
    waiting = _journalled(net, late, closed - 1800)  # 30 min before the close: in the window
    gone = _journalled(net, dropped, closed - WINDOW - PENDING_GRACE_S - 600)
    late_job, gone_job = "0x" + late.receipt.job_id.hex(), "0x" + dropped.receipt.job_id.hex()

    report = audit(w.address, [paid, waiting], epochs)
    assert report.ok, report.problems
    assert report.verified == 1 and report.pending == [late_job]

    # the paid receipt proves the window is at most about an hour: older than that is missing
    report = audit(w.address, [paid, waiting, gone], epochs)
    assert report.problems == [f"job {gone_job} accepted but missing from every batch"]
    assert report.pending == [late_job]

    # no paid receipt proves anything: the largest window a coordinator may set applies ...
    report = audit(w.address, [waiting, gone], epochs)
    assert report.ok and report.pending == [late_job, gone_job]
    assert MAX_DISPUTE_WINDOW_S >= 30 * 86_400
    # ... unless the caller knows the coordinator's window
    report = audit(w.address, [waiting, gone], epochs, dispute_window=WINDOW)
    assert report.problems == [f"job {gone_job} accepted but missing from every batch"]
