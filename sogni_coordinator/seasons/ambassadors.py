"""Ambassadors board: Spark purchases by you and by those you referred.

1 point per Spark you buy, 1 per Spark bought by an account you referred, 0.2 per Spark bought
by an account one of those referred (second level; of the season's total, rounded down once).
Only card purchases of paid Spark count (`Ledger.credit_purchase`), and a referral's
purchases only from the moment it was recorded. Referrals live in the ledger
(`Ledger.refer`: no self-referral, one referrer, no cycles). Arithmetic: `sogni_protocol.airdrop`.
"""

from __future__ import annotations

from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Inputs, Row, utc_day
from sogni_protocol.catalog import Season


def inputs(ledger: Ledger, season: Season) -> Inputs:
    """Account -> Spark bought by it, its referrals, their referrals; purchases; days."""
    referrals = ledger.referrals()
    bought: dict[str, dict[str, int]] = defaultdict(
        lambda: {"ownSpark": 0, "referredSpark": 0, "secondLevelSpark": 0}
    )
    counts: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)

    def score(who: str, kind: str, micro: int, at: float) -> None:
        bought[who][kind] += micro
        counts[who] += 1
        days[who].add(utc_day(at))

    for buyer, micro, at in ledger.purchases(season.start.timestamp(), season.end.timestamp()):
        score(buyer, "ownSpark", micro, at)
        first = referrals.get(buyer)
        if first is None or at < first[1]:
            continue
        score(first[0], "referredSpark", micro, at)
        second = referrals.get(first[0])
        if second is not None and at >= second[1] and second[0] != buyer:
            score(second[0], "secondLevelSpark", micro, at)
    return Inputs(dict(bought), dict(counts), {a: len(d) for a, d in days.items()})


def board(ledger: Ledger, season: Season, limit: int | None = None) -> list[Row]:
    return inputs(ledger, season).rank("ambassadors", season, limit)
