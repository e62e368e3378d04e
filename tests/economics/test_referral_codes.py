"""Referral codes: stable per account, unknown to anyone without the coordinator's secret, and
using one records the referral the Ambassadors board scores (1 and 0.2 per Spark bought)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from sogni_coordinator.ledger import Ledger, ReferralRefused
from sogni_coordinator.referrals import CODE_LENGTH, ReferralCodes
from sogni_coordinator.seasons import board_rows
from sogni_protocol.catalog import load_catalog

A, B, C, D = (Account.from_key(bytes([0x30 + i]) * 32).address for i in range(4))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Ledger, ReferralCodes]]:
    path = tmp_path / "coordinator.db"
    ledger, codes = Ledger(path), ReferralCodes(path)
    yield ledger, codes
    codes.close()
    ledger.close()


def test_a_code_is_stable_short_and_secret(tmp_path: Path) -> None:
    codes = ReferralCodes(tmp_path / "coordinator.db")
    code = codes.code_for(A)
    assert len(code) == CODE_LENGTH and code.isalnum() and code.isupper()
    assert codes.code_for(A.lower()) == code != codes.code_for(B)
    codes.close()
    again = ReferralCodes(tmp_path / "coordinator.db")  # a restart keeps the secret
    assert again.code_for(A) == code and again.owner(code.lower()) == A.lower()
    other = ReferralCodes(tmp_path / "elsewhere.db")  # another coordinator's secret
    assert other.code_for(A) != code and other.owner(code) is None
    again.close()
    other.close()


def test_using_codes_refuses_self_unknown_second_referrer_and_cycles(
    db: tuple[Ledger, ReferralCodes],
) -> None:
    ledger, codes = db
    a, b, c = codes.code_for(A), codes.code_for(B), codes.code_for(C)
    with pytest.raises(ReferralRefused, match="your own referral code"):
        codes.use(ledger, A, a)
    with pytest.raises(ReferralRefused, match="unknown referral code"):
        codes.use(ledger, A, "AAAAAAAAAA")
    with pytest.raises(ReferralRefused, match="not a referral code"):
        codes.use(ledger, A, "short!")
    assert codes.use(ledger, B, a) == A.lower()  # A referred B
    with pytest.raises(ReferralRefused, match="already referred"):
        codes.use(ledger, B, c)  # the referrer, once set, does not change
    with pytest.raises(ReferralRefused, match="cycle"):
        codes.use(ledger, A, b)  # A -> B -> A
    assert codes.use(ledger, C, b) == B.lower()  # B referred C
    with pytest.raises(ReferralRefused, match="cycle"):
        codes.use(ledger, A, c)  # A -> B -> C -> A
    assert codes.referrer_of(ledger, C) == B.lower() and codes.referrer_of(ledger, A) is None
    assert ledger.referrals().keys() == {B.lower(), C.lower()}


def test_code_use_scores_referred_purchases_on_the_ambassadors_board(
    db: tuple[Ledger, ReferralCodes],
) -> None:
    ledger, codes = db
    catalog = load_catalog()
    season = catalog.season_at(dt.datetime.now(dt.UTC))
    ledger.credit_purchase(B, 5)  # before B used A's code: scores B only
    codes.use(ledger, B, codes.code_for(A))
    codes.use(ledger, C, codes.code_for(B))
    ledger.credit_purchase(A, 10)
    ledger.credit_purchase(B, 20)
    ledger.credit_purchase(C, 30)
    ledger.credit_purchase(D, 40)  # nobody referred D
    rows = {r.address: r.points for r in board_rows(ledger, "ambassadors", season)}
    assert rows[A.lower()] == pytest.approx(10 + 20 + 0.2 * 30)
    assert rows[B.lower()] == pytest.approx(5 + 20 + 30)
    assert rows[C.lower()] == pytest.approx(30)
    assert rows[D.lower()] == pytest.approx(40)
