"""What this node has earned so far: the receipts its coordinators accepted, from the journal.

Why incremental: `/metrics` shows the totals, and a journal holds every receipt the node ever
signed. Reading them all at each refresh would cost more as the node ages, so the tally reads
only receipts completed since its cursor: the oldest one still waiting for its coordinator's
answer (an accepted receipt never changes again) or `SLACK` before the newest, at most
`LOOKBACK` seconds back. A receipt
acknowledged more than `LOOKBACK` after it was completed is missed until the node restarts
(the first refresh reads the whole journal). Blocking (SQLite): call `refresh` off the event
loop.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction

from sogni_node.journal import Journal
from sogni_protocol.payout_rules import BPS
from sogni_protocol.pricing import MICRO, WORK_UNITS_PER_SPARK

__all__ = ["LOOKBACK", "EarningsTally", "receipt_spark_micro"]

LOOKBACK = 86_400.0
"""How far back a refresh re-reads receipts still unanswered (seconds)."""
SLACK = 600
"""Receipts completed this long before the newest one are re-read too: one may be recorded
after a later one (two slots), or keep an earlier completion time (re-signed)."""


def receipt_spark_micro(work_units: int, price_factor_bps: int) -> int:
    """Micro-Spark value of a receipt: its work units at its tier's price (rounded half up),
    as billing charges the payer for it."""
    value = Fraction(work_units * MICRO, WORK_UNITS_PER_SPARK) * Fraction(price_factor_bps, BPS)
    return int((value * 2 + 1) // 2)


class EarningsTally:
    """Totals of accepted receipts: count, work units, micro-Spark value."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.accepted = 0
        self.work_units = 0
        self.spark_micro = 0
        self._cursor = 0
        self._counted: dict[bytes, int] = {}
        """Job ids counted whose receipt completed at or after the cursor (-> completed_at)."""
        self._lock = threading.Lock()

    def refresh(self, now: float | None = None) -> None:
        """Add the receipts accepted since the last refresh (blocking: a journal read)."""
        with self._lock:
            rows = self.journal.receipts(since=self._cursor)
            waiting = []
            for row in rows:
                r = row.receipt
                if row.accepted is None:
                    waiting.append(r.completed_at)
                elif row.accepted and r.job_id not in self._counted:
                    self._counted[r.job_id] = r.completed_at
                    self.accepted += 1
                    self.work_units += r.work_units
                    self.spark_micro += receipt_spark_micro(r.work_units, r.price_factor_bps)
            newest = max((row.receipt.completed_at for row in rows), default=self._cursor)
            horizon = int((time.time() if now is None else now) - LOOKBACK)
            self._cursor = max(min(min(waiting, default=newest), newest - SLACK), horizon)
            self._counted = {j: t for j, t in self._counted.items() if t >= self._cursor}
