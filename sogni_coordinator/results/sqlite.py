"""Images as rows of the coordinator's own SQLite file (`result_store = "database"` when
`database` is a file).

Why: a folder store makes each group of images durable with a `syncfs` of its own before
the receipts that name them commit, so every receipt waits on two flushes, one after the
other. Here an image's row is written inside its receipt's savepoint
(`db.Database.call_staged` sees `joins`), so a group of receipts and their images is one
transaction and one WAL flush, and an image without its receipt can never be left behind
(a folder needs `prune` at start for that). The cost: images pass through the WAL and are
copied again at checkpoint, and they sit in the database file (and its backups) until
their client acknowledges them or the retention sweep removes them; the pages they free
are reused, not returned to the file system.

The table shares the store's one connection per file (`db.Database`, component
`result_images`): reads take its lock, deletes ride the file's write queue (`submit`), so
acknowledging an image costs no commit of its own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from sogni_coordinator.db import Database
from sogni_coordinator.results.base import DEFAULT_MEMORY, ResultKey, ResultStore, StagedImage
from sogni_coordinator.storage import is_postgres

__all__ = ["COMPONENT", "SqliteResults"]

COMPONENT = "result_images"

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS result_images (
    request_id BLOB NOT NULL,
    idx        INTEGER NOT NULL,
    offer_hash BLOB NOT NULL,
    frame      BLOB NOT NULL,
    stored_at  REAL NOT NULL,
    PRIMARY KEY (request_id, idx, offer_hash)
);
CREATE INDEX IF NOT EXISTS result_images_stored_at ON result_images (stored_at);
"""
MIGRATIONS = (_SCHEMA_V1,)

_UPSERT = (
    "INSERT INTO result_images (request_id, idx, offer_hash, frame, stored_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (request_id, idx, offer_hash) DO UPDATE"
    " SET frame = excluded.frame, stored_at = excluded.stored_at"
)
_DELETE = "DELETE FROM result_images WHERE request_id = ? AND idx = ? AND offer_hash = ?"


class SqliteResults(ResultStore):
    """Result images in the coordinator's SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        memory_bytes: int = DEFAULT_MEMORY,
        *,
        retention: float | None = None,
    ) -> None:
        if is_postgres(path) or str(path) == ":memory:":
            raise ValueError(f"SqliteResults needs a database file, not {path!r}")
        super().__init__(memory_bytes=memory_bytes, retention=retention)
        self.db = Database(path, component=COMPONENT, migrations=MIGRATIONS)
        self._file = Path(path).resolve()

    def joins(self, database: str) -> bool:
        """The same file: an image's row commits in its receipt's transaction."""
        if is_postgres(database) or database == ":memory:":
            return False
        return Path(database).resolve() == self._file

    def write_rows(self, conn: Any, items: list[StagedImage]) -> None:
        now = time.time()
        conn.executemany(
            _UPSERT, [(i.key.request_id, i.key.index, i.key.offer_hash, i.data, now) for i in items]
        )

    def _write_many(self, items: list[tuple[ResultKey, bytes]]) -> dict[ResultKey, OSError]:
        now = time.time()
        rows = [(k.request_id, k.index, k.offer_hash, data, now) for k, data in items]
        try:
            with self.db._tx() as conn:
                conn.executemany(_UPSERT, rows)
        except Exception as exc:  # sqlite3.Error, DatabaseBusy: every image of the call failed
            error = OSError(f"image rows not stored: {str(exc)[:200]}")
            return {key: error for key, _ in items}
        return {}

    def _read(self, key: ResultKey) -> bytes | None:
        try:
            with self.db._lock:
                row = self.db._db.execute(
                    "SELECT frame FROM result_images"
                    " WHERE request_id = ? AND idx = ? AND offer_hash = ?",
                    tuple(key),
                ).fetchone()
        except sqlite3.Error as exc:  # unreadable, as a damaged file would be
            raise OSError(f"image row not read: {str(exc)[:200]}") from exc
        return None if row is None else bytes(row[0])

    def _delete(self, keys: list[ResultKey]) -> None:
        # with the next group commit (at once when no writer runs): a row outliving its
        # acknowledgement by a crash is removed by `prune` at the next start
        self.db.submit("result_delete", self._delete_rows, [tuple(k) for k in keys])

    def _delete_rows(self, keys: list[tuple[Any, ...]]) -> None:
        with self.db._tx() as conn:
            conn.executemany(_DELETE, keys)

    def _delete_older(self, max_age: float) -> int:
        with self.db._tx() as conn:
            cursor = conn.execute(
                "DELETE FROM result_images WHERE stored_at < ?", (time.time() - max_age,)
            )
            return int(cursor.rowcount)

    def stored_keys(self) -> list[ResultKey]:
        """Every stored image's key (blocking; `prune`, tests and the operator)."""
        with self.db._lock:
            rows = self.db._db.execute(
                "SELECT request_id, idx, offer_hash FROM result_images"
            ).fetchall()
        return [ResultKey(bytes(r[0]), int(r[1]), bytes(r[2])) for r in rows]

    def prune(self, keep: set[ResultKey]) -> int:
        """At start: delete rows the store does not list as pending (acknowledged before a
        crash took their delete with it). Returns the count."""
        stale = [key for key in self.stored_keys() if key not in keep]
        with self._lock:
            for key in [k for k in self._memory if k not in keep]:
                self._forget(key)
        if stale:
            self._delete_rows([tuple(k) for k in stale])
        return len(stale)

    async def discard(self, keys: Iterable[ResultKey]) -> None:
        wanted = list(keys)
        await trio.to_thread.run_sync(self.remove, wanted)

    def close(self) -> None:
        self.db.close()
