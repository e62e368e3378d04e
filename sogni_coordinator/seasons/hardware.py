"""The Workers boards' Hardware column: the device each worker last advertised.

A node's `Capabilities.device` (e.g. "NVIDIA GeForce RTX 4090", "Apple M2 Max") is what the
leaderboard page shows beside a worker. The dispatcher records it on every handshake and
capabilities update, under the node's wallet and its payout address (board rows are keyed by
the payee); the boards read it back. Its own component (`season_hardware`) in the
coordinator database; a write-behind like reputation's, so a handshake never waits on disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from sogni_coordinator.db import Database
from sogni_protocol.messages import Capabilities

__all__ = ["HardwareLog"]

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS worker_hardware (
    account  TEXT PRIMARY KEY,
    device   TEXT NOT NULL,
    backend  TEXT NOT NULL,
    seen_at  REAL NOT NULL
);
"""
MIGRATIONS = (_SCHEMA_V1,)


class HardwareLog(Database):
    def __init__(self, path: Path | str) -> None:
        super().__init__(path, component="season_hardware", migrations=MIGRATIONS)

    def seen(self, caps: Capabilities, now: float | None = None) -> None:
        """Record the device `caps` advertises for its wallet (and payout address)."""
        at = time.time() if now is None else now
        accounts = {caps.wallet.lower()} | ({caps.payout.lower()} if caps.payout else set())
        rows = [(a, caps.device, caps.backend, at) for a in sorted(accounts)]
        self.submit("season_hardware", self._write, rows)

    def _write(self, rows: list[tuple[str, str, str, float]]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO worker_hardware VALUES (?, ?, ?, ?) ON CONFLICT (account) DO UPDATE"
                " SET device = excluded.device, backend = excluded.backend,"
                " seen_at = excluded.seen_at",
                rows,
            )

    def devices(self, accounts: Iterable[str]) -> dict[str, str]:
        """Account (lowercase) -> the device it last advertised (accounts never seen left out)."""
        wanted = {a.lower() for a in accounts}
        if not wanted:
            return {}
        with self._lock:  # one row per node account ever seen: small, and no IN-list limit
            rows = self._db.execute("SELECT account, device FROM worker_hardware").fetchall()
        return {str(a): str(d) for a, d in rows if a in wanted}
