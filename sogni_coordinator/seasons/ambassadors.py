"""Ambassadors board: Spark purchases by you and by those you referred.

1 point per Spark you buy, 1 per Spark bought by an account you referred, 0.2 per Spark bought
by an account one of those referred (second level). Only card purchases of paid Spark count
(`Ledger.credit_purchase`), and a referral's purchases only from the moment it was recorded.
Referrals live in the ledger (`Ledger.refer`: no self-referral, one referrer, no cycles).
"""

from __future__ import annotations

from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Row, rank, utc_day
from sogni_protocol.catalog import Season

SECOND_LEVEL_TENTHS = 2
"""0.2 points per Spark of second-level referrals."""


def board(ledger: Ledger, season: Season, limit: int | None = None) -> list[Row]:
    referrals = ledger.referrals()
    points: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)

    def score(who: str, micro: int, at: float) -> None:
        points[who] += micro
        counts[who] += 1
        days[who].add(utc_day(at))

    for buyer, micro, at in ledger.purchases(season.start.timestamp(), season.end.timestamp()):
        score(buyer, micro, at)
        first = referrals.get(buyer)
        if first is None or at < first[1]:
            continue
        score(first[0], micro, at)
        second = referrals.get(first[0])
        if second is not None and at >= second[1] and second[0] != buyer:
            score(second[0], micro * SECOND_LEVEL_TENTHS // 10, at)
    return rank("ambassadors", season, points, counts, {a: len(d) for a, d in days.items()}, limit)
