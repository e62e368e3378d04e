"""Images as `bytea` rows in the network's PostgreSQL (`result_store = "database"`).

Why: with several coordinators on one database, the one a client resumes at (or the one
that took an orphaned request over) must serve images another received, and a shared
folder is one more thing to mount and keep consistent. Rows in the database every
coordinator already has need nothing else, and `pg_dump` backs them up with the receipts.

One row per image (`result_images`, primary key request, index, offer hash), the
`JobImage` frame as `bytea` (stored uncompressed: images are compressed already), with the
database's clock at the write. Deleted when the client acknowledges the image, as files
are, and by the retention sweep (`result_retention`) when it never does. A group of images
is written in one transaction (one commit, one WAL flush). psycopg runs only in worker
threads, on a connection of this store's own (`storage.lazy`; not the store's write lock:
image writes do not wait for ledger writes); a connection the server dropped is opened
again for the next call, and a read or delete that met the drop is tried once more on the
new connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
import trio

from sogni_coordinator.queue.postgres import error_line, redact
from sogni_coordinator.results.base import (
    DEFAULT_MEMORY,
    ResultKey,
    ResultStore,
    StagedImage,
    StoreError,
)
from sogni_coordinator.storage import is_postgres, location
from sogni_coordinator.storage.lazy import LazyConnection, Unreachable
from sogni_protocol.logs import get_logger

log = get_logger(__name__)

__all__ = ["COMPONENT", "DEFAULT_RETENTION", "PostgresResults"]

COMPONENT = "result_images"
DEFAULT_RETENTION = 7 * 86_400.0
"""Seconds an unacknowledged image is kept in the database when `result_retention` is not
set (a folder keeps it until acknowledged, as before)."""

_SCHEMA_V1 = """
CREATE TABLE result_images (
    request_id BYTEA NOT NULL,
    idx INTEGER NOT NULL,
    offer_hash BYTEA NOT NULL,
    frame BYTEA NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (request_id, idx, offer_hash)
);
ALTER TABLE result_images ALTER COLUMN frame SET STORAGE EXTERNAL;
CREATE INDEX result_images_stored_at ON result_images (stored_at);
"""
_SCHEMA_V2 = """
CREATE TABLE gateway_images (
    image_id TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    image BYTEA NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE gateway_images ALTER COLUMN image SET STORAGE EXTERNAL;
CREATE INDEX gateway_images_stored_at ON gateway_images (stored_at);
"""
MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2)
_NOW = "extract(epoch from clock_timestamp())"

T = TypeVar("T")


class PostgresResults(ResultStore):
    """Result images in PostgreSQL (see the module docstring)."""

    shared = True

    def __init__(
        self, url: str, memory_bytes: int = DEFAULT_MEMORY, *, retention: float | None = None
    ) -> None:
        super().__init__(
            memory_bytes=memory_bytes,
            retention=DEFAULT_RETENTION if retention is None else retention,
        )
        self.url = url
        self._pg = LazyConnection(
            url,
            COMPONENT,
            MIGRATIONS,
            blocks="the PostgreSQL result store blocks: call it from a worker thread",
        )

    # --- the connection (worker threads only) --------------------------------------------
    def _call(self, fn: Callable[[psycopg.Connection[Any]], T], *, retry: bool) -> T:
        """`fn` on the connection; psycopg's errors as `StoreError`. `retry`: `fn` may run
        twice (a read or a delete), so a connection lost under it is opened again once."""
        try:
            return self._pg.call(fn, retry=retry)
        except Unreachable as exc:
            where = redact(self.url)
            raise StoreError(f"cannot connect to PostgreSQL at {where}: {exc}") from None
        except psycopg.Error as exc:
            raise StoreError(f"result store: {error_line(exc, self.url)}") from exc

    def open(self) -> None:
        """Connect and migrate now (blocking), so a bad URL fails at start, not at the
        first image."""
        self._call(lambda conn: None, retry=False)

    def close(self) -> None:
        """Close the connection (the next call opens it again)."""
        self._pg.close()

    # --- the store -----------------------------------------------------------------------
    def _write_many(self, items: list[tuple[ResultKey, bytes]]) -> dict[ResultKey, OSError]:
        rows = [(k.request_id, k.index, k.offer_hash, data) for k, data in items]

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO result_images (request_id, idx, offer_hash, frame, stored_at)"
                    f" VALUES (%s, %s, %s, %s, {_NOW})"
                    " ON CONFLICT (request_id, idx, offer_hash) DO UPDATE"
                    " SET frame = EXCLUDED.frame, stored_at = EXCLUDED.stored_at",
                    rows,
                )

        try:
            self._call(write, retry=False)  # lost at COMMIT: the outcome is unknown, so fail
        except StoreError as exc:
            return {key: exc for key, _ in items}
        return {}

    def joins(self, database: str) -> bool:
        """The coordinator's own database (`result_store = "database"` uses it): an image's
        row commits in its receipt's transaction (`db.Database.call_staged`), one commit
        for both and never a row without its receipt."""
        return is_postgres(database) and location(database) == location(self.url)

    def write_rows(self, conn: Any, items: list[StagedImage]) -> None:
        """On the store's connection (`storage.postgres.PgConnection`: SQLite-dialect SQL)."""
        conn.executemany(
            "INSERT INTO result_images (request_id, idx, offer_hash, frame, stored_at)"
            f" VALUES (?, ?, ?, ?, {_NOW})"
            " ON CONFLICT (request_id, idx, offer_hash) DO UPDATE"
            " SET frame = excluded.frame, stored_at = excluded.stored_at",
            [(i.key.request_id, i.key.index, i.key.offer_hash, i.data) for i in items],
        )

    def _read(self, key: ResultKey) -> bytes | None:
        def read(conn: psycopg.Connection[Any]) -> bytes | None:
            with conn.cursor(binary=True) as cur:  # bytea as bytes, not hex text
                row = cur.execute(
                    "SELECT frame FROM result_images"
                    " WHERE request_id = %s AND idx = %s AND offer_hash = %s",
                    tuple(key),
                ).fetchone()
            return None if row is None else bytes(row[0])

        return self._call(read, retry=True)

    def _delete(self, keys: list[ResultKey]) -> None:
        def delete(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "DELETE FROM result_images"
                    " WHERE request_id = %s AND idx = %s AND offer_hash = %s",
                    [tuple(k) for k in keys],
                )

        try:
            self._call(delete, retry=True)
        except StoreError as exc:  # kept until the retention sweep: never fails an ack
            log.warning("result_delete_failed", images=len(keys), error=str(exc)[:200])

    def _delete_older(self, max_age: float) -> int:
        return self._delete_stored_before("result_images", max_age)

    def _delete_stored_before(self, table: str, max_age: float) -> int:
        """Delete `table`'s rows stored over `max_age` seconds ago (the database's clock,
        one for every coordinator); how many."""
        sql = f"DELETE FROM {table} WHERE stored_at < {_NOW} - %s"
        return self._call(lambda conn: conn.execute(sql, (max_age,)).rowcount, retry=True)

    def count(self) -> int:
        """Images stored (blocking; for tests and the operator)."""
        row = self._call(
            lambda conn: conn.execute("SELECT COUNT(*) FROM result_images").fetchone(),
            retry=True,
        )
        return int(row[0]) if row else 0

    # --- the SDK gateway's downloadable images (`gateway/results.ImageStore`) ---------------
    def save_named(self, image_id: str, media_type: str, image: bytes) -> None:
        """Keep a gateway image under its id (blocking), for any coordinator's signed URL."""

        def save(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO gateway_images (image_id, media_type, image, stored_at)"
                f" VALUES (%s, %s, %s, {_NOW}) ON CONFLICT (image_id) DO UPDATE"
                " SET media_type = EXCLUDED.media_type, image = EXCLUDED.image,"
                " stored_at = EXCLUDED.stored_at",
                (image_id, media_type, image),
            )

        self._call(save, retry=False)

    def named(self, image_id: str, *, data: bool) -> tuple[str, float, bytes | None] | None:
        """(media type, stored at, the image if `data`) of a gateway image, or None."""
        column = "image" if data else "NULL"

        def read(conn: psycopg.Connection[Any]) -> tuple[str, float, bytes | None] | None:
            with conn.cursor(binary=True) as cur:
                row = cur.execute(
                    f"SELECT media_type, stored_at, {column} FROM gateway_images"
                    " WHERE image_id = %s",
                    (image_id,),
                ).fetchone()
            if row is None:
                return None
            return str(row[0]), float(row[1]), None if row[2] is None else bytes(row[2])

        return self._call(read, retry=True)

    def sweep_named(self, max_age: float) -> int:
        """Delete gateway images older than `max_age` seconds (blocking); how many."""
        return self._delete_stored_before("gateway_images", max_age)

    async def discard(self, keys: Iterable[ResultKey]) -> None:
        wanted = list(keys)
        await trio.to_thread.run_sync(self.remove, wanted)
