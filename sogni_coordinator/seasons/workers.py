"""Relaxed and Fast Workers boards: job value in Spark, by the tier the job ran on.

Points = the jobs' value in Spark (SOGNI jobs at their Spark equivalent), full for paid Spark
and SOGNI, 1/10 for free Daily Boost Spark (of the season's total, rounded down once). The
points go to the receipt's payee (its payout address, else the signing wallet: who the ledger
paid). The tier is the request's network as the store recorded it; a job the store has no
request for (a ledger used alone) is counted as fast, the protocol's default network.
Self-dealt jobs score nothing (`eligible`). Arithmetic: `sogni_protocol.airdrop`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.boards import Inputs, Row, utc_day
from sogni_coordinator.seasons.eligible import counted_jobs
from sogni_coordinator.seasons.hardware import HardwareLog
from sogni_protocol.airdrop import points_of
from sogni_protocol.catalog import Season

TIER_OF_BOARD: dict[str, str | None] = {
    "workers-relaxed": "relaxed",
    "workers-fast": "fast",
    "workers": None,  # both tiers (the board before the split; no prize pool)
}


def worker_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Worker micro-points: full for paid Spark and SOGNI, 1/10 for free Spark."""
    spark = {"freeSpark": free, "paidSpark": paid, "sogniSpark": sogni_as_spark}
    return points_of("workers-fast", spark)


def inputs(ledger: Ledger, season: Season, board_id: str) -> Inputs:
    """Payee -> the Spark value of its counted jobs on the board's tier, jobs, days active."""
    tier = TIER_OF_BOARD[board_id]
    value: dict[str, dict[str, int]] = defaultdict(
        lambda: {"freeSpark": 0, "paidSpark": 0, "sogniSpark": 0}
    )
    jobs: dict[str, int] = defaultdict(int)
    days: dict[str, set[str]] = defaultdict(set)
    for j in counted_jobs(ledger, season):
        if tier is not None and (j.network or "fast") != tier:
            continue
        v = value[j.payee]
        v["freeSpark"] += j.spark_free
        v["paidSpark"] += j.spark_paid
        v["sogniSpark"] += j.sogni_spark
        jobs[j.payee] += 1
        days[j.payee].add(utc_day(j.settled_at))
    return Inputs(dict(value), dict(jobs), {a: len(d) for a, d in days.items()})


def board(ledger: Ledger, season: Season, board_id: str, limit: int | None = None) -> list[Row]:
    """The board's rows, each with the device its worker last advertised (`hardware`)."""
    scored = "workers-fast" if board_id == "workers" else board_id
    rows = inputs(ledger, season, board_id).rank(board_id, season, limit, scored_as=scored)
    log = HardwareLog(ledger.path)
    try:
        devices = log.devices(r.address for r in rows)
    finally:
        log.close()
    return [dataclasses.replace(r, hardware=devices.get(r.address.lower(), "")) for r in rows]
