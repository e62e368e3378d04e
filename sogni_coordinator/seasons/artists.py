"""Artists board: points for Spark and SOGNI spent on jobs (leaderboard page).

1 point per free (Daily Boost) Spark, 10 per paid Spark, 10 per Spark-equivalent of SOGNI
(SOGNI converted to Spark at the market rate of the request). Self-dealt jobs score nothing
(`eligible`). The arithmetic is `sogni_protocol.airdrop`'s, so the airdrop audit recomputes it.
"""

from __future__ import annotations

from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Inputs, Row, utc_day
from sogni_coordinator.seasons.eligible import counted_jobs
from sogni_protocol.airdrop import points_of
from sogni_protocol.catalog import Season


def artist_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Artist micro-points of Spark spent: 1 per free Spark, 10 per paid Spark or SOGNI-Spark."""
    spark = {"freeSpark": free, "paidSpark": paid, "sogniSpark": sogni_as_spark}
    return points_of("artists", spark)


def inputs(ledger: Ledger, season: Season) -> Inputs:
    """Payer -> its Spark spent on counted jobs (the points' inputs), jobs, days active."""
    spent: dict[str, dict[str, int]] = defaultdict(
        lambda: {"freeSpark": 0, "paidSpark": 0, "sogniSpark": 0}
    )
    jobs: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)
    for j in counted_jobs(ledger, season):
        s = spent[j.payer]
        s["freeSpark"] += j.spark_free
        s["paidSpark"] += j.spark_paid
        s["sogniSpark"] += j.sogni_spark
        jobs[j.payer] += 1
        days[j.payer].add(utc_day(j.settled_at))
    return Inputs(dict(spent), dict(jobs), {a: len(d) for a, d in days.items()})


def board(ledger: Ledger, season: Season, limit: int | None = None) -> list[Row]:
    return inputs(ledger, season).rank("artists", season, limit)
