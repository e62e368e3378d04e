"""Workers' reputation: what the coordinator remembers about each wallet, across restarts.

Moving averages (EMA, weight `ALPHA` per event) of
- speed: expected render budget / actual time, capped, so a node that is faster than the
  deadline rule assumes scores above one that barely makes it;
- success: 1 for a receipted job, 0 for a lost, expired, handed-back or bad one;
- acceptance: 1 for an offer taken, 0 for one declined;
and uptime (seconds connected / seconds since first seen). Bad results and wrong models are
strikes; `BLACKLIST_STRIKES` strikes within `STRIKE_WINDOW` seconds blacklist the wallet for
`BLACKLIST_SECONDS`. The score mixes them into (0, 1]; newcomers get `NEWCOMER_FLOOR` until
they have `NEWCOMER_JOBS` jobs, so every capable node gets work (greedy best-first starves
the rest, as Livepeer's gateway learned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sogni_coordinator.db import Database
from sogni_protocol.logs import get_logger

log = get_logger(__name__)

ALPHA = 0.2
NEWCOMER_FLOOR = 0.5
NEWCOMER_JOBS = 10
SCORE_FLOOR = 0.05
STRIKE_WINDOW = 3600.0
BLACKLIST_STRIKES = 5
BLACKLIST_SECONDS = 24 * 3600.0

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS reputation (
    wallet TEXT PRIMARY KEY,
    speed REAL NOT NULL, success REAL NOT NULL, acceptance REAL NOT NULL,
    jobs INTEGER NOT NULL, failures INTEGER NOT NULL, strikes TEXT NOT NULL,
    first_seen REAL NOT NULL, connected_seconds REAL NOT NULL,
    blacklisted_until REAL NOT NULL, earned_units INTEGER NOT NULL
);
"""
_V2_WORK_RATE = "ALTER TABLE reputation ADD COLUMN work_rate REAL NOT NULL DEFAULT 0;"
MIGRATIONS = (_SCHEMA_V1, _V2_WORK_RATE)
_COLUMNS = (
    "wallet, speed, success, acceptance, jobs, failures, strikes, first_seen,"
    " connected_seconds, blacklisted_until, earned_units, work_rate"
)
"""Named, never `*`: on PostgreSQL the table also has `rowid` (storage.dialect)."""
_UPSERT = (
    f"INSERT INTO reputation ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (wallet) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.replace(" ", "").split(",")[1:])
)


@dataclass
class WorkerRecord:
    wallet: str
    speed: float = 1.0
    success: float = 1.0
    acceptance: float = 1.0
    jobs: int = 0
    failures: int = 0
    strikes: list[float] = field(default_factory=list)
    first_seen: float = 0.0
    connected_seconds: float = 0.0
    blacklisted_until: float = 0.0
    earned_units: int = 0
    work_rate: float = 0.0
    """Work units per second from offer to full receipt (EMA; 0: not measured yet). Bounds
    what a partial receipt may claim: never what the node says, what it has shown."""

    def uptime(self, now: float, connected_since: float | None) -> float:
        live = now - connected_since if connected_since is not None else 0.0
        span = max(now - self.first_seen, 1.0)
        return min(1.0, (self.connected_seconds + live) / span)

    def score(self, now: float, connected_since: float | None = None) -> float:
        speed = min(self.speed, 2.0) / 2.0
        raw = (
            self.success**2
            * self.acceptance
            * (0.5 + 0.5 * speed)
            * (0.5 + 0.5 * self.uptime(now, connected_since))
        )
        if self.jobs < NEWCOMER_JOBS:
            raw = max(raw, NEWCOMER_FLOOR)
        return max(SCORE_FLOOR, min(1.0, raw))


_FIELDS = tuple(f.name for f in fields(WorkerRecord))
"""A record's attributes in `_COLUMNS`' order."""
_STRIKES = _FIELDS.index("strikes")


def _ema(old: float, sample: float) -> float:
    return (1 - ALPHA) * old + ALPHA * sample


FIRST_SESSION_KEPT = 60.0
"""Seconds a wallet with no record must have been connected for its session to create one."""


def _untouched(rec: WorkerRecord | None) -> bool:
    """No record, or one that only scoring made: no job, failure, strike, decline or time."""
    return rec is None or (
        rec.jobs == 0
        and rec.failures == 0
        and not rec.strikes
        and rec.acceptance == 1.0
        and rec.connected_seconds == 0.0
        and rec.blacklisted_until == 0.0
    )


class Reputation(Database):
    """Per-wallet records in memory, written through to SQLite (its own table)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        # Reputation is advisory: losing the last moments of it in a crash is fine, an fsync
        # per job on the event loop is not (its writes are queued; see `_save`).
        super().__init__(path, component="reputation", migrations=MIGRATIONS, synchronous="NORMAL")
        self._clock = clock
        self._dirty_lock = threading.Lock()  # `_write` runs in the writer's thread
        self._dirty: dict[str, tuple[Any, ...]] = {}
        self._write_queued = False
        self.on_strike: Callable[[str, bytes, float], None] | None = None
        """Told of each strike of a known job (wallet, job id, time): the dispute desk keeps
        when each refused job struck, so a won dispute takes back exactly those strikes
        (`pardon_strikes`)."""
        self.records: dict[str, WorkerRecord] = {}
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM reputation"):
            strikes = [float(x) for x in row[6].split(",") if x]
            wallet, speed, success, acceptance, jobs, failures = row[:6]
            first_seen, connected, blacklisted_until, earned, work_rate = row[7:12]
            self.records[wallet] = WorkerRecord(
                wallet,
                speed,
                success,
                acceptance,
                jobs,
                failures,
                strikes,
                first_seen,
                connected,
                blacklisted_until,
                earned,
                work_rate,
            )

    def get(self, wallet: str) -> WorkerRecord:
        key = wallet.lower()
        rec = self.records.get(key)
        if rec is None:
            rec = self.records[key] = WorkerRecord(key, first_seen=self._clock())
        return rec

    def _save(self, rec: WorkerRecord) -> None:
        """Write-behind: the row joins the database's write queue (the group commit's next
        transaction, off the event loop); memory is the truth meanwhile. Rows changed
        before that write runs share it (one queued write and one statement per group, not
        per job; a wallet changed twice is written once, as it is last)."""
        values = [getattr(rec, name) for name in _FIELDS]  # flat: no deep copy
        values[_STRIKES] = ",".join(f"{t:.0f}" for t in rec.strikes)
        row = tuple(values)
        with self._dirty_lock:
            self._dirty[rec.wallet] = row
            if self._write_queued:
                return
            self._write_queued = True
        self.submit("reputation", self._write)

    def _write(self) -> None:
        """The rows changed since the last write (the writer's thread, or at once)."""
        with self._dirty_lock:
            rows, self._dirty = self._dirty, {}
            self._write_queued = False
        if not rows:
            return
        try:
            with self._tx() as db:
                db.executemany(_UPSERT, list(rows.values()))
        except BaseException:
            with self._dirty_lock:  # not written: kept for the next write (newer rows win)
                self._dirty = rows | self._dirty
            raise

    # --- events --------------------------------------------------------------------------
    def succeeded(
        self,
        wallet: str,
        elapsed: float,
        budget: float,
        work_units: int,
        *,
        full: bool = True,
        late: bool = False,
        timed: bool = True,
    ) -> None:
        """A receipt was stored; `full`: a whole render (a partial one says nothing about
        the node's rate); `late`: it came after the node's holding was released (deadline
        missed, handed back): a slow sample, no rate (its time is unknown). It counted as
        the fastest (elapsed 0). Not `timed`: a kept result answering a re-offer (its time
        is the network's): no speed nor rate sample."""
        rec = self.get(wallet)
        if full and elapsed > 0 and not late and timed:
            sample = work_units / elapsed
            rec.work_rate = sample if rec.work_rate <= 0 else _ema(rec.work_rate, sample)
        on_time = budget / max(elapsed, 1e-3) if elapsed > 0 else 2.0
        if timed:
            rec.speed = _ema(rec.speed, 0.0 if late else on_time)
        rec.success = _ema(rec.success, 1.0)
        rec.acceptance = _ema(rec.acceptance, 1.0)
        rec.jobs += 1
        rec.earned_units += work_units
        self._save(rec)

    def failed(self, wallet: str) -> None:
        rec = self.get(wallet)
        rec.success = _ema(rec.success, 0.0)
        rec.failures += 1
        self._save(rec)

    def declined(self, wallet: str) -> None:
        rec = self.get(wallet)
        rec.acceptance = _ema(rec.acceptance, 0.0)
        self._save(rec)

    def strike(self, wallet: str, now: float | None = None, *, job: bytes | None = None) -> bool:
        """A bad result or a wrong model (of `job`, when known); True if this strike
        blacklists the wallet."""
        now = self._clock() if now is None else now
        rec = self.get(wallet)
        rec.strikes = [t for t in rec.strikes if now - t < STRIKE_WINDOW] + [now]
        rec.success = _ema(rec.success, 0.0)
        rec.failures += 1
        hit = len(rec.strikes) >= BLACKLIST_STRIKES
        if hit:
            rec.blacklisted_until = now + BLACKLIST_SECONDS
            rec.strikes = []
        self._save(rec)
        if job is not None and self.on_strike is not None:
            try:
                self.on_strike(rec.wallet, job, now)
            except Exception as exc:  # the strike stands; a pardon then takes the latest
                log.error("strike_not_recorded", job=job.hex()[:16], error=type(exc).__name__)
        return hit

    def pardon_strikes(self, wallet: str, struck: Sequence[float | None]) -> None:
        """A won dispute (`sogni_coordinator.disputes`): take back exactly these strikes
        (their times, as `strike` recorded them; None: a strike of unknown time) and their
        failures, and lift the blacklisting only if one of them counted towards it (it
        began within `STRIKE_WINDOW` after one of them). Written at once, not behind: the
        desk records the pardon as done right after."""
        if not struck:
            return
        rec = self.get(wallet)
        began = rec.blacklisted_until - BLACKLIST_SECONDS if rec.blacklisted_until > 0 else None
        lift = False
        for t in struck:
            rec.failures = max(0, rec.failures - 1)
            rec.success = _ema(rec.success, 1.0)
            if t is None:  # as `pardon`: the latest strike, and the blacklisting
                rec.strikes = rec.strikes[:-1]
                lift = True
                continue
            for i, s in enumerate(rec.strikes):
                if abs(s - t) < 1.0:  # kept to the second (`_save`)
                    del rec.strikes[i]
                    break
            if began is not None and t - 1.0 <= began < t + STRIKE_WINDOW:
                lift = True
        if lift:
            rec.blacklisted_until = 0.0
        self._save(rec)
        self.flush()

    def flush(self) -> None:
        """Write the changed rows now (a pardon must not be lost in a crash)."""
        self._write()

    def disconnected(self, wallet: str, connected_for: float) -> None:
        key = wallet.lower()
        if connected_for < FIRST_SESSION_KEPT and _untouched(self.records.get(key)):
            # a wallet that never worked, on a blip: no record (one per fresh wallet a peer
            # churns through was kept for ever and reloaded at every start; scoring it for
            # an offer (`get`) made one in memory)
            self.records.pop(key, None)
            return
        rec = self.get(wallet)
        rec.connected_seconds += max(0.0, connected_for)
        self._save(rec)

    def blacklisted(self, wallet: str) -> bool:
        rec = self.records.get(wallet.lower())
        return rec is not None and rec.blacklisted_until > self._clock()
