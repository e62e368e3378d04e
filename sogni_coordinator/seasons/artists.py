"""Artists board: points for Spark and SOGNI spent on jobs (leaderboard page).

1 point per free (Daily Boost) Spark, 10 per paid Spark, 10 per Spark-equivalent of SOGNI
(SOGNI converted to Spark at the market rate of the request). Self-dealt jobs score nothing
(`eligible`).
"""

from __future__ import annotations

from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Row, rank, utc_day
from sogni_coordinator.seasons.eligible import counted_jobs
from sogni_protocol.catalog import Season


def artist_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Artist micro-points of one job: 1 per free Spark, 10 per paid Spark or SOGNI-Spark."""
    return free + 10 * (paid + sogni_as_spark)


def board(ledger: Ledger, season: Season, limit: int | None = None) -> list[Row]:
    points: dict[str, int] = defaultdict(int)
    jobs: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)
    for j in counted_jobs(ledger, season):
        points[j.payer] += artist_points_micro(j.spark_free, j.spark_paid, j.sogni_spark)
        jobs[j.payer] += 1
        days[j.payer].add(utc_day(j.settled_at))
    return rank("artists", season, points, jobs, {a: len(d) for a, d in days.items()}, limit)
