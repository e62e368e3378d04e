"""A won dispute restores what billing would have charged for the refused receipt, as an
epoch would have paid it: paid Spark (a SOGNI payment at its Spark equivalent), never free
Daily Boost Spark, nothing for a request with no payer. It restored the list price for all
of them, from the distributor's funds."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from sogni_app.quote import quote
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.store import Store
from sogni_protocol.messages import JobParams

from .test_refusal_privacy import _record

PAYER = "0x" + "a1" * 20


def _stored_request(store: Store, images: int) -> bytes:
    rid = os.urandom(32)
    params = JobParams(
        model_id="sdxl-base-1.0",
        positive_prompt="p",
        steps=20,
        guidance=4.0,
        width=1024,
        height=1024,
        seed=1,
    )
    jobs = [(os.urandom(32), params, 1000) for _ in range(images)]
    store.add_request(
        rid, model_id="sdxl-base-1.0", network="fast", token_type="spark",
        client_peer="c", jobs=jobs,
    )  # fmt: skip
    return rid


def test_what_billing_would_have_charged_is_what_is_restored(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    store, ledger = Store(db), Ledger(db)
    try:
        per_image = quote("sdxl-base-1.0", images=1).spark_micro
        ledger.credit_purchase(PAYER, 100)
        paid = _stored_request(store, 2)
        ledger.reserve(paid, PAYER, quote("sdxl-base-1.0", images=2), "spark")
        assert ledger.paid_value_of(paid, 20, 20) == per_image
        assert ledger.paid_value_of(paid, 5, 20) == per_image * 5 // 20  # a partial receipt

        boosted = "0x" + "b2" * 20
        ledger.claim_daily_boost(boosted, dt.datetime(2026, 12, 4, tzinfo=dt.UTC))
        free = _stored_request(store, 1)
        ledger.reserve(free, boosted, quote("sdxl-base-1.0", images=1), "spark")
        assert ledger.paid_value_of(free, 20, 20) == 0  # Daily Boost Spark: nothing

        assert ledger.paid_value_of(_stored_request(store, 1), 20, 20) == 0  # no payer
    finally:
        store.close()
        ledger.close()


def test_a_won_dispute_restores_the_recorded_charge_not_the_list_price(tmp_path: Path) -> None:
    from dataclasses import replace

    from sogni_coordinator.disputes import DisputeBook

    book = DisputeBook(tmp_path / "coordinator.db")
    try:
        free_job = replace(_record(b"\x0a" * 32, refused_at=1), charge=0)
        legacy = _record(b"\x0b" * 32, refused_at=1)  # refused before charges were recorded
        book.add(free_job)
        book.add(legacy)
        assert book.settle(free_job.case_id, worker_won=True)
        assert book.settle(legacy.case_id, worker_won=True)
        owed = {case: spark for case, _payee, _model, spark, _e in book.due()}
        assert owed[free_job.case_id] == 0
        assert owed[legacy.case_id] > 0  # its list price, as before
    finally:
        book.close()
