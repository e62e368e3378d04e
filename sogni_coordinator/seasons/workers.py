"""Relaxed and Fast Workers boards: job value in Spark, by the tier the job ran on.

Points = the job's value in Spark (SOGNI jobs at their Spark equivalent), full for paid Spark
and SOGNI, 1/10 for free Daily Boost Spark. The points go to the receipt's payee (its payout
address, else the signing wallet: who the ledger paid). The tier is the request's network as
the store recorded it; a job the store has no request for (a ledger used alone) is counted
as fast, the protocol's default network. Self-dealt jobs score nothing (`eligible`).
"""

from __future__ import annotations

from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Row, rank, utc_day
from sogni_coordinator.seasons.eligible import counted_jobs
from sogni_protocol.catalog import Season

TIER_OF_BOARD: dict[str, str | None] = {
    "workers-relaxed": "relaxed",
    "workers-fast": "fast",
    "workers": None,  # both tiers (the board before the split; no prize pool)
}


def worker_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Worker micro-points of one job: full for paid Spark and SOGNI, 1/10 for free Spark."""
    return paid + sogni_as_spark + free // 10


def board(ledger: Ledger, season: Season, board_id: str, limit: int | None = None) -> list[Row]:
    tier = TIER_OF_BOARD[board_id]
    points: dict[str, int] = defaultdict(int)
    jobs: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)
    for j in counted_jobs(ledger, season):
        if tier is not None and (j.network or "fast") != tier:
            continue
        points[j.payee] += worker_points_micro(j.spark_free, j.spark_paid, j.sogni_spark)
        jobs[j.payee] += 1
        days[j.payee].add(utc_day(j.settled_at))
    return rank(board_id, season, points, jobs, {a: len(d) for a, d in days.items()}, limit)
