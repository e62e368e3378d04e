"""One holder at a time across every coordinator of a network: closing an epoch.

Each coordinator of a network may run the epoch timer; two closing at once would plan the
same receipts into two roots. On PostgreSQL a session-level advisory lock, held on a
connection of its own for the whole close (plan, post, record), admits one closer; another
is told at once rather than queued (the next timer tick tries again). On SQLite there is
one coordinator per file and `BEGIN IMMEDIATE` already orders its writers: no lock.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sogni_coordinator.storage import is_postgres, location


class LockHeld(RuntimeError):
    """Another session holds the lock."""


@contextmanager
def exclusive(database: Path | str, name: str) -> Iterator[None]:
    """Hold the network-wide lock `name` on `database` for the block, or raise `LockHeld`."""
    if not is_postgres(database):
        yield
        return
    import psycopg

    key = zlib.crc32(f"sogni:{name}".encode())
    with psycopg.connect(location(database), autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not row or not row[0]:
            raise LockHeld(name)
        try:
            yield
        finally:
            if not conn.broken:  # a lost connection has released it already
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
