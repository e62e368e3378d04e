"""Season boards from a real coordinator database (store and ledger in one SQLite file, as the
service keeps them), with signed receipts: tiers, points, prizes, and no farming."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sogni_coordinator.ledger import Ledger, ReferralRefused
from sogni_coordinator.seasons import board_rows
from sogni_coordinator.store import Store
from sogni_devnet.paid_work import (
    PAYER,
    PAYER_KEY,
    SignedReceipt,
    signed_receipt,
    store_receipts,
    worker,
)
from sogni_protocol.catalog import Season, load_catalog
from sogni_protocol.eip712 import Domain

DOMAIN = Domain(31337, "0x" + "5a" * 20)
M = 1_000_000
WEI = 10**18
FAST, RELAXED, HONEST = worker(1), worker(2), worker(3)
PAYOUT_TWIN, REFERRED_TWIN = worker(4), worker(5)


def _season() -> Season:
    return load_catalog().season_at(dt.datetime.now(dt.UTC))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "coordinator.db")
    yield s
    s.close()


def _rows(store: Store, board: str) -> dict[str, tuple[float, int]]:
    ledger = Ledger(store.path)
    try:
        return {r.address: (r.points, r.prize_wei) for r in board_rows(ledger, board, _season())}
    finally:
        ledger.close()


def _job_value(r: SignedReceipt) -> float:
    """Spark of one full job (store_receipts charges `expected_charge` of its work units)."""
    return r.offer.work_units / 43_200 * r.offer.price_factor_bps / 10_000


def test_workers_are_split_by_tier_and_artists_score_what_they_spend(store: Store) -> None:
    fast = signed_receipt(FAST, DOMAIN)  # 1 Spark, paid
    relaxed = signed_receipt(RELAXED, DOMAIN, price_factor_bps=5_000)  # 0.5 Spark, paid
    free = signed_receipt(FAST, DOMAIN)  # 1 Spark of Daily Boost
    sogni = signed_receipt(RELAXED, DOMAIN, price_factor_bps=5_000)  # 0.5 Spark of SOGNI
    store_receipts(store, [fast, relaxed])
    store_receipts(store, [free], paid="free")
    store_receipts(store, [sogni], paid="sogni")

    fast_board = _rows(store, "workers-fast")
    relaxed_board = _rows(store, "workers-relaxed")
    assert fast_board[FAST.address.lower()][0] == pytest.approx(1.0 + 0.1)  # free job: 1/10
    assert relaxed_board[RELAXED.address.lower()][0] == pytest.approx(0.5 + 0.5)
    assert FAST.address.lower() not in relaxed_board and RELAXED.address.lower() not in fast_board
    # one worker per board: it takes the whole pool (top 200 share it by points)
    assert fast_board[FAST.address.lower()][1] == 1_500_000 * WEI
    assert relaxed_board[RELAXED.address.lower()][1] == 500_000 * WEI

    artists = _rows(store, "artists")
    # 10 per paid Spark (1 + 0.5), 10 per Spark of SOGNI (0.5), 1 per free Spark (1)
    assert artists == {PAYER.lower(): (pytest.approx(10 * 1.5 + 10 * 0.5 + 1.0), 2_000_000 * WEI)}


def test_a_self_dealing_pair_earns_nothing(store: Store) -> None:
    """The payer renders its own jobs: with its own wallet, through a node whose receipts pay
    the payer's address, or through a wallet it referred. None of it scores; the one job an
    unrelated worker did does."""
    ledger = Ledger(store.path)
    ledger.refer(REFERRED_TWIN.address, PAYER)
    ledger.close()
    store_receipts(
        store,
        [
            signed_receipt(PAYER_KEY, DOMAIN),  # same wallet
            signed_receipt(PAYOUT_TWIN, DOMAIN, payout=PAYER),  # pays the payer's address
            signed_receipt(REFERRED_TWIN, DOMAIN),  # referred by the payer
        ],
    )
    assert _rows(store, "workers-fast") == {}
    assert _rows(store, "artists") == {}

    store_receipts(store, [signed_receipt(HONEST, DOMAIN)])
    assert set(_rows(store, "workers-fast")) == {HONEST.address.lower()}
    assert _rows(store, "artists")[PAYER.lower()][0] == pytest.approx(10.0)  # that job only


def test_only_settled_receipts_whose_checks_passed_count(store: Store) -> None:
    passed, skipped, refused = (signed_receipt(HONEST, DOMAIN) for _ in range(3))
    store_receipts(store, [passed, skipped, refused])
    db = sqlite3.connect(store.path)  # the check verdicts as the dispatcher records them
    with db:
        db.executemany(
            "INSERT INTO checks (job_id, worker, state, updated_at) VALUES (?, ?, ?, ?)",
            [
                (passed.receipt.job_id, HONEST.address.lower(), "passed", time.time()),
                (skipped.receipt.job_id, HONEST.address.lower(), "skipped", time.time()),
            ],
        )
    db.close()
    store.save_refused([(refused.receipt.job_id, "no payer authorization")])
    assert _rows(store, "workers-fast")[HONEST.address.lower()][0] == pytest.approx(1.0)


def test_ambassadors_score_purchases_two_levels_down(tmp_path: Path) -> None:
    a, b, c, late = (f"0x{d * 40}" for d in "abcd")
    ledger = Ledger(tmp_path / "db")
    ledger.refer(b, a)
    ledger.refer(c, b)
    ledger.credit_purchase(late, 40)  # bought before it was referred: not a's
    ledger.refer(late, a)
    for who, spark in ((a, 10), (b, 20), (c, 30)):
        ledger.credit_purchase(who, spark)
    rows = {r.address: r for r in board_rows(ledger, "ambassadors", _season())}
    assert rows[a].points == pytest.approx(10 + 20 + 0.2 * 30)
    assert rows[b].points == pytest.approx(20 + 30)
    assert rows[c].points == pytest.approx(30)
    assert rows[late].points == pytest.approx(40)
    total = 36 + 50 + 30 + 40  # every ambassador shares the pool by points
    assert rows[b].prize_wei == 3_000_000 * WEI * 50 * M // (total * M)
    assert sum(r.prize_wei for r in rows.values()) <= 3_000_000 * WEI
    ledger.close()


def test_referrals_refuse_self_second_referrer_and_cycles(tmp_path: Path) -> None:
    a, b, c = (f"0x{d * 40}" for d in "abc")
    ledger = Ledger(tmp_path / "db")
    with pytest.raises(ReferralRefused, match="itself"):
        ledger.refer(a, a.upper().replace("0X", "0x"))
    ledger.refer(b, a)
    ledger.refer(c, b)
    with pytest.raises(ReferralRefused, match="already referred"):
        ledger.refer(b, c)
    with pytest.raises(ReferralRefused, match="cycle"):
        ledger.refer(a, c)  # a -> b -> c -> a
    assert ledger.referrals() == {
        b: (a, pytest.approx(time.time(), abs=60)),
        c: (b, pytest.approx(time.time(), abs=60)),
    }
    ledger.close()


def test_top_200_cut(tmp_path: Path) -> None:
    """Artists beyond rank 200 are ranked but win nothing; the 200 share the whole pool."""
    from sogni_coordinator.seasons.boards import rank

    points = {f"0x{i:040x}": 1_000 - i for i in range(250)}
    rows = rank("artists", _season(), points, {}, {})
    assert len(rows) == 250 and all(r.prize_wei == 0 for r in rows[200:])
    paid = sum(r.prize_wei for r in rows[:200])
    assert 2_000_000 * WEI - 200 <= paid <= 2_000_000 * WEI
    assert rows[0].prize_wei > rows[199].prize_wei > 0
