"""Cheat: two-level referral farming with self-made wallets.

Referral rewards are Ambassadors points (docs/ECONOMICS.md, "Seasons"): 1 per Spark bought by
an account you referred, 0.2 per Spark bought by the accounts it referred. A script made
wallet B with A's code and C with B's, for nothing, and every Spark C bought then scored three
times (C, B, A: 2.2 points). Off a local network a code now refers only when its owner is a
customer (bought Spark, deposited SOGNI or staked), as for the Daily Boost; free Spark never
scores at any level. Over the client protocol's handler (signed `ReferralQuery`), real SQLite.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from types import SimpleNamespace

from eth_account import Account
from eth_account.signers.local import LocalAccount

from sogni_coordinator.billing import Billing
from sogni_coordinator.gateway.referral import apply_referral
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.referral_intake import answer_referral
from sogni_coordinator.referrals import close_beside
from sogni_coordinator.seasons import board_rows
from sogni_coordinator.standing import Standing
from sogni_protocol.catalog import load_catalog
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import ReferralReport, RequestRefused
from sogni_protocol.pricing import Price, Quote
from sogni_protocol.referral_signing import sign_referral_query

DOMAIN = Domain(8453, "0x" + "d1" * 20)
PEER = "12D3KooWfarmer"


class Coordinator:
    """The referral handler as a client session calls it, on a ledger of its own."""

    def __init__(self, path: Path, *, local: bool) -> None:
        self.ledger = Ledger(path)
        self.billing = Billing(self.ledger, DOMAIN, boost_for_anyone=local)
        self._dispatcher = SimpleNamespace(domain=DOMAIN, billing=self.billing)

    def ask(self, who: LocalAccount, code: str = "") -> ReferralReport | RequestRefused:
        now = time.time()
        q = sign_referral_query(who.key, DOMAIN, peer_id=PEER, code=code, expiry=int(now) + 600)
        return answer_referral(self._dispatcher, q, PEER, now)  # type: ignore[arg-type]

    def code(self, who: LocalAccount) -> str:
        got = self.ask(who)
        assert isinstance(got, ReferralReport)
        return got.code

    def ambassadors(self) -> dict[str, float]:
        season = load_catalog().season_at(dt.datetime.now(dt.UTC))
        return {r.address: r.points for r in board_rows(self.ledger, "ambassadors", season)}

    def close(self) -> None:
        close_beside(self.ledger)
        self.ledger.close()


def _refused(got: ReferralReport | RequestRefused) -> str:
    assert isinstance(got, RequestRefused) and got.code == "referral_refused", got
    return got.reason


def test_off_a_local_network_a_chain_of_fresh_wallets_refers_nobody(tmp_path: Path) -> None:
    """The farm: fresh A, B (A's code), C (B's code); C then buys 30 Spark. Both codes are
    refused, so C's Spark scores once (C's own), not 2.2 times across the chain."""
    c = Coordinator(tmp_path / "coordinator.db", local=False)
    a, b, cc = (Account.create() for _ in range(3))
    assert "never bought Spark" in _refused(c.ask(b, c.code(a)))
    assert "never bought Spark" in _refused(c.ask(cc, c.code(b)))
    assert c.ledger.referrals() == {}
    c.ledger.credit_purchase(cc.address, 30)
    assert c.ambassadors() == {cc.address.lower(): 30}
    c.close()


def test_the_second_level_scores_only_through_a_paying_middle(tmp_path: Path) -> None:
    """A is a customer, so B may use A's code; B (who never paid) cannot refer C until it buys
    Spark itself: the second level is earned through a real customer, never a free wallet.
    A staked wallet is a customer too."""
    c = Coordinator(tmp_path / "coordinator.db", local=False)
    a, b, cc, staker, d = (Account.create() for _ in range(5))
    c.ledger.credit_purchase(a.address, 10)
    got = c.ask(b, c.code(a))
    assert isinstance(got, ReferralReport) and got.referred_by == a.address.lower()
    assert "never bought Spark" in _refused(c.ask(cc, c.code(b)))  # B: a free wallet
    c.ledger.credit_purchase(b.address, 20)
    got = c.ask(cc, c.code(b))
    assert isinstance(got, ReferralReport) and got.referred_by == b.address.lower()
    c.ledger.credit_purchase(cc.address, 30)
    points = c.ambassadors()
    assert points[a.address.lower()] == 36  # 10 + 20 + 0.2 x 30
    assert points[b.address.lower()] == 20 + 30

    c.billing.standing = lambda w: Standing(stake=1 if w.lower() == staker.address.lower() else 0)
    got = c.ask(d, c.code(staker))
    assert isinstance(got, ReferralReport) and got.referred_by == staker.address.lower()
    c.close()


def test_on_a_local_network_any_code_refers(tmp_path: Path) -> None:
    """Guard: a local network (demos, tests) keeps codes open to fresh wallets."""
    c = Coordinator(tmp_path / "coordinator.db", local=True)
    a, b = Account.create(), Account.create()
    got = c.ask(b, c.code(a))
    assert isinstance(got, ReferralReport) and got.referred_by == a.address.lower()
    c.close()


def test_free_spark_scores_no_referral_points_at_any_level(tmp_path: Path) -> None:
    """Guard: a chain A -> B -> C whose B and C only claim the Daily Boost and spend it earns
    no Ambassadors points anywhere (only card purchases score)."""
    c = Coordinator(tmp_path / "coordinator.db", local=True)
    a, b, cc, worker = (Account.create() for _ in range(4))
    assert isinstance(c.ask(b, c.code(a)), ReferralReport)
    assert isinstance(c.ask(cc, c.code(b)), ReferralReport)
    for i, who in enumerate((b, cc)):
        free = c.ledger.claim_daily_boost(who.address)
        rid = bytes([i + 1]) * 32
        quote = Quote("sdxl-base-1.0", 1, "fast", "spark", 0.005, Price(1.0, 1, free, free))
        c.ledger.reserve(rid, who.address, quote)
        c.ledger.settle(rid, free, worker.address, 3000, 500, job_id=bytes([i + 9]) * 32)
        c.ledger.refund(rid)
    assert c.ambassadors() == {}
    c.close()


async def test_the_gateway_refuses_a_fresh_wallets_code_off_a_local_network_too(
    tmp_path: Path,
) -> None:
    """`POST /v1/account/referral` applies the same rule as the libp2p handler."""
    c = Coordinator(tmp_path / "coordinator.db", local=False)
    gateway = SimpleNamespace(dispatcher=c._dispatcher)
    a, b = Account.create(), Account.create()
    why = await apply_referral(gateway, b.address, c.code(a))  # type: ignore[arg-type]
    assert why is not None and "never bought Spark" in why
    c.ledger.credit_purchase(a.address, 10)
    assert await apply_referral(gateway, b.address, c.code(a)) is None  # type: ignore[arg-type]
    assert c.ledger.referrals()[b.address.lower()][0] == a.address.lower()
    c.close()
