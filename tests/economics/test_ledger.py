"""Ledger rules: purchases, Daily Boost once per UTC day, reserve/settle/refund, balance."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from sogni_app.quote import quote
from sogni_coordinator.ledger import (
    BoostAlreadyClaimed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    partial_value,
)

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
M = 1_000_000


@pytest.fixture
def ledger(database: str) -> Iterator[Ledger]:
    ledger = Ledger(database, daily_boost_spark=50)  # each engine (tests/conftest.py)
    yield ledger
    ledger.close()


def test_daily_boost_once_per_utc_day(ledger: Ledger) -> None:
    day = dt.datetime(2025, 3, 1, 0, 5, tzinfo=dt.UTC)
    assert ledger.claim_daily_boost(ALICE, day) == 50 * M
    with pytest.raises(BoostAlreadyClaimed, match="already claimed"):
        ledger.claim_daily_boost(ALICE, day + dt.timedelta(hours=23))
    ledger.claim_daily_boost(ALICE, day + dt.timedelta(days=1))
    ledger.claim_daily_boost(BOB, day)
    assert ledger.balance(ALICE)["spark_free"] == 100 * M
    assert ledger.balance(ALICE)["spark_paid"] == 0


def test_reserve_settle_refund(ledger: Ledger) -> None:
    ledger.claim_daily_boost(ALICE, dt.datetime(2025, 3, 1, tzinfo=dt.UTC))
    ledger.credit_purchase(ALICE, 100)
    q = quote("sdxl-base-1.0", images=60)  # 60 Spark: 50 free first, then 10 paid
    res = ledger.reserve(b"\x01" * 32, ALICE, q, "spark")
    assert (res.spark_free, res.spark_paid, res.per_image) == (50 * M, 10 * M, M)
    assert ledger.balance(ALICE) == {"spark_paid": 90 * M, "spark_free": 0, "sogni": 0}
    s = ledger.settle(b"\x01" * 32, M, BOB, 3000, 1000, model_id="sdxl-base-1.0", job_id="j1")
    assert (s.worker, s.platform, s.creator, s.spark_free) == (600_000, 300_000, 100_000, M)
    again = ledger.settle(b"\x01" * 32, M, BOB, 3000, 1000, model_id="sdxl-base-1.0", job_id="j1")
    assert again == s  # idempotent per job id
    cancelled = partial_value(M, steps_done=5, steps=20)
    ledger.settle(b"\x01" * 32, cancelled, BOB, 3000, 0, job_id="j2")
    refunded = ledger.refund(b"\x01" * 32)
    assert refunded["spark_free"] + refunded["spark_paid"] == 60 * M - M - cancelled
    assert ledger.balance("worker:" + BOB)["spark_free"] == 600_000 + cancelled * 7 // 10
    with pytest.raises(LedgerError, match="closed"):
        ledger.settle(b"\x01" * 32, 1, BOB, 0, 0)
    assert ledger.totals() == {"spark_paid": 0, "spark_free": 0, "sogni": 0}


def test_insufficient_funds_carries_quote(ledger: Ledger) -> None:
    ledger.credit_purchase(ALICE, 1)
    q = quote("sdxl-base-1.0", images=2)
    with pytest.raises(InsufficientFunds) as err:
        ledger.reserve("r1", ALICE, q)
    assert err.value.quote is q and err.value.needed == 2 * M and err.value.available == M
    assert ledger.balance(ALICE)["spark_paid"] == M  # nothing moved


def test_sogni_payment(ledger: Ledger) -> None:
    ledger.deposit_sogni(ALICE, 10 * M)
    q = quote("sdxl-base-1.0", images=2, token_type="sogni", sogni_usd=0.01)
    res = ledger.reserve("r2", ALICE, q)
    assert res.sogni == M and res.per_image == 500_000  # 0.005 USD / 0.01 USD = 0.5 SOGNI
    ledger.settle("r2", res.per_image, BOB, 2000, 0)
    jobs = ledger.settled_jobs(0, 2e10)
    assert jobs == [(ALICE.lower(), BOB.lower(), 0, 0, 500_000, M)]  # 1 Spark equivalent


def test_over_settle_refused(ledger: Ledger) -> None:
    ledger.credit_purchase(ALICE, 1)
    ledger.reserve("r3", ALICE, quote("sdxl-base-1.0"))
    with pytest.raises(LedgerError, match="exceeds"):
        ledger.settle("r3", M + 1, BOB, 0, 0)


def test_an_epoch_never_reads_a_settled_job_as_unsettled_in_a_closed_request(
    ledger: Ledger,
) -> None:
    """`payer_settlements` read the jobs, then their reservations: a settle and the refund
    that follows it (another coordinator, another process, or PostgreSQL's per-statement
    snapshots) landing between the two reads gave "unsettled, request closed", and the
    epoch refused a receipt the payer was charged for, for good. Reservations are read
    first now; whatever lands between, the answer is consistent."""
    ledger.credit_purchase(ALICE, 10)
    rid = b"\x07" * 32
    ledger.reserve(rid, ALICE, quote("sdxl-base-1.0", images=1), "spark")
    real = ledger._db

    class SettleAfterFirstRead:
        reads = 0

        def execute(self, sql: str, *args: object) -> object:
            out = real.execute(sql, *args)  # type: ignore[arg-type]
            SettleAfterFirstRead.reads += 1
            if SettleAfterFirstRead.reads == 1:  # the job settled and the rest refunded now
                rows = out.fetchall()
                ledger._db = real
                ledger.settle(rid, M, BOB, 3000, 0, job_id=bytes(32).hex())
                ledger.refund(rid)
                ledger._db = self  # type: ignore[assignment]
                return _Rows(rows)
            return out

    class _Rows:
        def __init__(self, rows: list[object]) -> None:
            self.rows = rows

        def fetchone(self) -> object:
            return self.rows[0] if self.rows else None

    ledger._db = SettleAfterFirstRead()  # type: ignore[assignment]
    try:
        settled, reserved = ledger.payer_settlements([(bytes(32), rid, 0)])
    finally:
        ledger._db = real
    assert bytes(32) in settled or reserved[rid]  # never "unsettled" in a closed request
