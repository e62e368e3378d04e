"""Only paid value is paid: each receipt earns what its payer paid for that job, at the epoch's
rate, minus take and creator share; unpaid work earns nothing; free work shares a budget."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.store import Store
from sogni_protocol.epoch_files import decode_batch
from sogni_protocol.payout_rules import SOGNI

from .settle_env import Net, rules, settler, signed_receipt, store_receipts, worker

SPARK = 43_200  # work units of one Spark at full price: the payer pays 1 Spark = 1 SOGNI
WORKER_SHARE = 65  # % at tier 0: take 30 %, creator share 5 %


def test_a_self_dealing_node_with_unpaid_requests_earns_nothing(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """The attack: a node serves requests with no payer (only it can serve its made-up model);
    every receipt is genuine, signed, answering a real offer, and still earns 0."""
    me = worker(1)
    unpaid = [signed_receipt(me, net.domain, model="made-up-model") for _ in range(5)]
    store_receipts(store, unpaid, paid="none")
    assert settler(store, net, tmp_path).close_epoch() is None  # nothing to post
    assert net.d.distributor.latest_epoch() == 0
    for r in unpaid:
        settled = store.receipt_settlement(r.receipt.job_id)
        assert settled is not None and settled[1] == "refused"
        assert "no payer" in settled[2]


def test_unpaid_receipts_beside_paid_ones_are_refused_in_the_batch(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    store_receipts(store, [signed_receipt(me, net.domain)], paid="spark")
    store_receipts(store, [signed_receipt(me, net.domain) for _ in range(3)], paid="none")
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    assert result.payouts == {me.address: SOGNI * WORKER_SHARE // 100}  # one paid receipt
    batch = decode_batch(result.receipts_file.read_bytes())
    assert len(batch.receipts) == 1 and len(batch.refused) == 3


def test_relaxed_work_pays_what_the_payer_paid_minus_take(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """A relaxed job costs half; its worker earns from that half, not from fast-tier value."""
    me = worker(1)
    store_receipts(store, [signed_receipt(me, net.domain, price_factor_bps=5_000)])
    ledger = Ledger(store.path)
    paid_by_payer = -sum(
        amount for account, amount in _entries(ledger, "settle") if account.startswith("reserved:")
    )
    ledger.close()
    assert paid_by_payer == 500_000  # micro-Spark: half of 1 Spark
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    value = SOGNI // 2  # 0.5 Spark at 1 SOGNI per Spark
    assert result.payouts == {me.address: value * WORKER_SHARE // 100}
    (entry,) = decode_batch(result.receipts_file.read_bytes()).receipts
    assert (entry.price_factor_bps, entry.offer.price_factor_bps) == (5_000, 5_000)
    assert int(entry.paid_value) == value and int(entry.free_value) == 0


def test_a_partial_receipt_earns_what_the_payer_was_charged_for_it(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    store_receipts(store, [signed_receipt(me, net.domain, steps_done=2)])  # 2 of 8 steps
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    assert result.payouts == {me.address: (SOGNI // 4) * WORKER_SHARE // 100}


def test_sogni_payments_pay_their_sogni(net: Net, store: Store, tmp_path: Path) -> None:
    me = worker(1)
    store_receipts(store, [signed_receipt(me, net.domain)], paid="sogni")  # 1 SOGNI per image
    result = settler(store, net, tmp_path, rules=rules(sogni_wei_per_spark=3 * SOGNI)).close_epoch()
    assert result is not None
    assert result.payouts == {me.address: SOGNI * WORKER_SHARE // 100}  # not at the Spark rate


def test_the_spark_rate_is_the_epochs_own_and_recorded(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    store_receipts(store, [signed_receipt(me, net.domain)])
    rate = 2 * SOGNI // 5  # SOGNI rose: 0.4 SOGNI per Spark this epoch
    result = settler(store, net, tmp_path, rules=rules(sogni_wei_per_spark=rate)).close_epoch()
    assert result is not None
    assert result.payouts == {me.address: rate * WORKER_SHARE // 100}
    assert decode_batch(result.receipts_file.read_bytes()).rules.wei_per_spark == rate


def test_free_work_beyond_the_emission_budget_is_paid_pro_rata(
    net: Net, store: Store, tmp_path: Path
) -> None:
    a, b = worker(1), worker(2)
    store_receipts(store, [signed_receipt(a, net.domain, work_units=3 * SPARK)], paid="free")
    store_receipts(store, [signed_receipt(b, net.domain, work_units=SPARK)], paid="free")
    store_receipts(store, [signed_receipt(b, net.domain)], paid="spark")
    budget_sogni = 2  # free work worth 4 SOGNI shares a 2 SOGNI budget: half each
    result = settler(
        store, net, tmp_path, rules=rules(free_emission_sogni=budget_sogni)
    ).close_epoch()
    assert result is not None
    batch = decode_batch(result.receipts_file.read_bytes())
    assert int(batch.free_requested) == 4 * SOGNI
    assert sum(int(e.free_value) for e in batch.receipts) == budget_sogni * SOGNI
    assert result.payouts == {
        a.address: (3 * SOGNI // 2) * WORKER_SHARE // 100,
        b.address: (SOGNI // 2) * WORKER_SHARE // 100 + SOGNI * WORKER_SHARE // 100,
    }


def test_free_work_within_the_budget_is_paid_in_full(
    net: Net, store: Store, tmp_path: Path
) -> None:
    a = worker(1)
    store_receipts(store, [signed_receipt(a, net.domain)], paid="free")
    result = settler(store, net, tmp_path, rules=rules(free_emission_sogni=10)).close_epoch()
    assert result is not None and result.payouts == {a.address: SOGNI * WORKER_SHARE // 100}


def test_free_work_earns_nothing_outside_a_local_network(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """The default budget is 0 unless the chain is a dev chain: Daily Boost renders are free
    for the payer and are not minted into rewards for the worker."""
    a = worker(1)
    store_receipts(store, [signed_receipt(a, net.domain)], paid="free")
    production = rules()  # `local=False`: no free emission budget
    assert production.free_budget_wei == 0
    assert settler(store, net, tmp_path, rules=production).close_epoch() is None
    settled = store.receipt_settlement(signed_receipt_job(store))
    assert settled is not None and "emission budget is 0" in settled[2]


def test_a_receipt_whose_ledger_settlement_is_queued_waits_for_the_next_epoch(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    r = signed_receipt(me, net.domain)
    store_receipts(store, [r])
    ledger = Ledger(store.path)  # as if the coordinator stopped before the ledger's commit
    with ledger._tx() as db:  # of the settlement, and so of the refund queued after it
        db.execute("DELETE FROM ledger_jobs WHERE job_id = ?", (r.receipt.job_id.hex(),))
        db.execute("UPDATE ledger_reservations SET state = 'open'")
    ledger.close()
    assert settler(store, net, tmp_path).close_epoch() is None
    assert store.receipt_settlement(r.receipt.job_id) is None  # neither paid nor refused


def test_a_charge_that_differs_from_the_offer_is_refused(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """The signed offer fixes the price: a settlement worth more than it is not paid."""
    me = worker(1)
    r = signed_receipt(me, net.domain)
    store_receipts(store, [r])
    ledger = Ledger(store.path)
    with ledger._tx() as db:
        db.execute(
            "UPDATE ledger_jobs SET spark_paid = 2 * spark_paid WHERE job_id = ?",
            (r.receipt.job_id.hex(),),
        )
    ledger.close()
    assert settler(store, net, tmp_path).close_epoch() is None
    settled = store.receipt_settlement(r.receipt.job_id)
    assert settled is not None
    assert "charged 2000000 micro-Spark for it, not the 1000000 its offer prices" in settled[2]


def test_a_receipt_for_an_offer_not_on_record_is_refused(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    r = signed_receipt(me, net.domain)
    cheap = msgspec.structs.replace(r.offer, work_units=SPARK // 2)
    store_receipts(store, [r._replace(offer=cheap)])
    assert settler(store, net, tmp_path).close_epoch() is None
    settled = store.receipt_settlement(r.receipt.job_id)
    assert settled is not None and "does not answer the offer on record" in settled[2]


@pytest.mark.parametrize("billing", ["optional", "off"])
def test_billing_must_be_required_outside_a_local_network(billing: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="billing must be 'required'"):
        CoordinatorConfig(data_dir=tmp_path, chain_id=8453, billing=billing)  # type: ignore[arg-type]
    CoordinatorConfig(data_dir=tmp_path, chain_id=8453, billing="required")
    CoordinatorConfig(data_dir=tmp_path, chain_id=31337, billing=billing)  # type: ignore[arg-type]


def signed_receipt_job(store: Store) -> bytes:
    (only,) = store.receipts()
    return only.receipt.job_id


def _entries(ledger: Ledger, kind: str) -> list[tuple[str, int]]:
    with ledger._lock:
        rows = ledger._db.execute(
            "SELECT e.account, e.amount FROM ledger_entries e JOIN ledger_tx t"
            " ON e.tx_id = t.tx_id WHERE t.kind = ?",
            (kind,),
        ).fetchall()
    return [(str(a), int(v)) for a, v in rows]


@pytest.mark.parametrize("sogni_usd", [0.005, 0.01, 0.05, 0.0025])
def test_a_partial_sogni_payment_is_never_mispriced_by_rounding(sogni_usd: float) -> None:
    """The ledger values a SOGNI-paid job from its micro-SOGNI, rounded down twice
    (`floor(floor(S k/s) P/S)`) against the offer's `floor(P k/s)`: off by up to P/S
    micro-Spark. With a 1 micro-Spark tolerance, every second cancelled job paid in SOGNI
    at $0.01 was refused by the epoch for good (the payer charged, the worker never paid)."""
    from sogni_coordinator.ledger import partial_value
    from sogni_protocol.epoch_files import PayerSettlement
    from sogni_protocol.epoch_math import _sogni_slack, expected_charge
    from sogni_protocol.pricing import sogni_micro

    for work_units in (1_000, 12_345, 43_200, 99_999):
        full = expected_charge(work_units, 10_000, 1, 1)
        per_image_sogni = sogni_micro(full, sogni_usd)
        for steps in (4, 20, 30):
            for done in range(1, steps + 1):
                charged_sogni = partial_value(per_image_sogni, done, steps)
                spark_equiv = charged_sogni * full // per_image_sogni  # as the ledger does
                paid = PayerSettlement(
                    payer="0x" + "11" * 20, token_type="sogni", spark_free=0, spark_paid=0,
                    sogni=charged_sogni, spark_equiv=spark_equiv,
                )  # fmt: skip
                charged = expected_charge(work_units, 10_000, done, steps)
                assert abs(spark_equiv - charged) <= _sogni_slack(charged, paid), (done, steps)
