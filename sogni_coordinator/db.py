"""The coordinator's SQLite databases share one way of opening, migrating and writing.

One connection per component, guarded by a lock so trio worker threads (settlement) can use
it too; WAL so readers (the CLI, settlement) never block the writer; `BEGIN IMMEDIATE`
transactions so a write never fails half-way on a lock upgrade.

Schemas are versioned per component (store, ledger and reputation share one file, so one
`PRAGMA user_version` cannot serve them all): `schema_versions` records each component's
version, and on open the migrations after it are applied in order, in one transaction with
the version, so a crash mid-migration leaves the previous version intact. Migration 1 of
each component is the schema of the release before versioning (`CREATE ... IF NOT EXISTS`),
so a database from that release opens and migrates forward. A database newer than the code
is refused: running old code on it could misread or corrupt rows it does not understand.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component   TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    migrated_at REAL NOT NULL
)
"""


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release than this code."""


def statements(script: str) -> list[str]:
    """Split a migration into statements (`executescript` would commit our transaction).
    Migrations therefore keep `;` out of string literals."""
    return [s.strip() for s in script.split(";") if s.strip()]


def schema_version(db: sqlite3.Connection, component: str) -> int:
    """The component's recorded version (0: never opened by versioned code)."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_versions'"
    ).fetchone():
        return 0
    row = db.execute(
        "SELECT version FROM schema_versions WHERE component=?", (component,)
    ).fetchone()
    return 0 if row is None else int(row[0])


class Database:
    def __init__(
        self,
        path: Path | str,
        *,
        component: str,
        migrations: Sequence[str],
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self.schema_version = self._migrate(component, migrations)
            self._db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            self._db.close()
            raise

    def _migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Bring `component` to `len(migrations)`; returns that version.

        Foreign keys are off meanwhile (SQLite cannot change that inside a transaction), so
        a migration may rebuild a referenced table; `foreign_key_check` runs before commit.
        """
        target = len(migrations)
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._tx() as db:
            current = schema_version(db, component)
            if current > target:
                raise SchemaTooNew(
                    f"database {self.path}: the {component} schema is version {current}, "
                    f"newer than this code's version {target}; upgrade sogni-coordinator"
                )
            for script in migrations[current:]:
                for sql in statements(script):
                    db.execute(sql)
            if current < target:
                db.execute(_VERSIONS_TABLE)
                db.execute(
                    "INSERT OR REPLACE INTO schema_versions VALUES (?, ?, ?)",
                    (component, target, time.time()),
                )
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"{component} migration broke foreign keys: {broken[:3]}")
        return target

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
