"""A won dispute's pay reaches the next epoch's root (the epoch close's `Restorations`
hook): the worker's payee earns the refused receipt's worker share on top of its other
receipts, once; the next epoch does not pay it again."""

from __future__ import annotations

from pathlib import Path

from sogni_chain import connect
from sogni_coordinator.disputes import DisputeBook, RefusalRecord, Restorations
from sogni_coordinator.store import Store
from sogni_protocol.messages import JobParams, Receipt
from tests.settlement.settle_env import (
    make_net,
    rules,
    settler,
    signed_receipt,
    store_receipts,
    worker,
)

SPARK = 43_200  # work units of one Spark: 1 SOGNI at the default rate


def test_restoration_is_paid_in_the_next_epoch_once(tmp_path: Path) -> None:
    net = make_net("embedded", connect(accounts=4))
    store = Store(tmp_path / "coordinator.db")
    book = DisputeBook(tmp_path / "coordinator.db")
    honest, other = worker(1), worker(2)
    refused = Receipt(
        job_id=b"\x09" * 32,
        offer_hash=b"\x00" * 32,
        worker=honest.address,
        coordinator=honest.address,
        model_id="sogni-test",
        result_hash=b"\x00" * 32,
        steps_done=4,
        work_units=SPARK,
        completed_at=1,
    )
    params = JobParams(
        model_id="sogni-test",
        positive_prompt="p",
        steps=4,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )
    case = b"\x0c" * 32
    book.add(
        RefusalRecord(
            refused.job_id,
            case,
            honest.address,
            honest.address,
            refused,
            params,
            "float32",
            "step 0 over",
            b"\x01" * 32,
            1,
            b"sig",
        )
    )
    assert book.settle(case, worker_won=True) and not book.settle(case, worker_won=True)
    s = settler(store, net, tmp_path)
    s.restorations = Restorations(book)
    store_receipts(store, [signed_receipt(other, net.domain, work_units=SPARK)])
    first = s.close_epoch()
    assert first is not None
    share = rules().split(10**18, "sogni-test", rules().take_rates_bps[0]).worker
    assert first.payouts.get(honest.address, 0) == 0  # payouts list receipts' entries only
    tree_total = first.total
    assert tree_total == first.payouts[other.address] + share
    assert net.d.distributor.total_of(1) == tree_total
    (row,) = book.restorations()
    assert row["epoch"] == 1 and int(row["amount"]) == share
    store_receipts(store, [signed_receipt(other, net.domain, work_units=SPARK)])
    second = s.close_epoch()
    assert second is not None and second.total == tree_total + second.payouts[other.address]
    store.close()
    book.close()
