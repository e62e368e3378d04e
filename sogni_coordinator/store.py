"""Durable state of a coordinator: requests, jobs and receipts in SQLite (WAL).

A receipt is committed (synchronous=FULL) before the node hears that it was accepted, so an
acknowledged receipt survives a crash. A job is receipted at most once: `receipts.job_id` is
the primary key and `store_receipt` reports a duplicate instead of overwriting.

Job parameters (which include the prompt) are stored as the opaque MessagePack blob the
request arrived in; nothing here logs them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sogni_protocol.messages import JobParams, Receipt

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   BLOB PRIMARY KEY,
    model_id     TEXT NOT NULL,
    images       INTEGER NOT NULL,
    network      TEXT NOT NULL,
    token_type   TEXT NOT NULL,
    client_peer  TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id       BLOB PRIMARY KEY,
    request_id   BLOB NOT NULL REFERENCES requests(request_id),
    idx          INTEGER NOT NULL,
    params       BLOB NOT NULL,
    work_units   INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('queued', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_request ON jobs(request_id);
CREATE TABLE IF NOT EXISTS receipts (
    job_id       BLOB PRIMARY KEY REFERENCES jobs(job_id),
    request_id   BLOB NOT NULL,
    worker       TEXT NOT NULL,
    offer_hash   BLOB NOT NULL,
    result_hash  BLOB NOT NULL,
    steps_done   INTEGER NOT NULL,
    work_units   INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    receipt      BLOB NOT NULL,
    signature    BLOB NOT NULL,
    stored_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_worker ON receipts(worker);
"""

_receipt_decoder = msgspec.msgpack.Decoder(Receipt)
_params_decoder = msgspec.msgpack.Decoder(JobParams)


@dataclass(frozen=True)
class StoredJob:
    job_id: bytes
    request_id: bytes
    index: int
    params: JobParams
    work_units: int
    state: str
    attempts: int


@dataclass(frozen=True)
class StoredReceipt:
    receipt: Receipt
    signature: bytes
    request_id: bytes


class Store:
    """One SQLite connection guarded by a lock; calls are short and run on the trio thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise RuntimeError(
                f"database {path} has schema version {version}, newer than this coordinator "
                f"({_SCHEMA_VERSION}); upgrade sogni-coordinator"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

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

    # --- writes ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: bytes,
        *,
        model_id: str,
        network: str,
        token_type: str,
        client_peer: str,
        jobs: list[tuple[bytes, JobParams, int]],
    ) -> None:
        """Request and all its jobs in one transaction: accepted means every job is queued."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request_id, model_id, len(jobs), network, token_type, client_peer, now),
            )
            db.executemany(
                "INSERT INTO jobs (job_id, request_id, idx, params, work_units, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                [
                    (job_id, request_id, i, msgspec.msgpack.encode(params), units, now)
                    for i, (job_id, params, units) in enumerate(jobs)
                ],
            )

    def count_attempt(self, job_id: bytes) -> None:
        """A failed attempt (node lost, deadline missed, handed back), kept across restarts."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET attempts=attempts+1, updated_at=? WHERE job_id=? AND state='queued'",
                (time.time(), job_id),
            )

    def mark_failed(self, job_id: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='failed', updated_at=? WHERE job_id=? AND state!='done'",
                (time.time(), job_id),
            )

    def store_receipt(self, receipt: Receipt, signature: bytes, request_id: bytes) -> bool:
        """Commit a verified receipt and mark its job done; False if the job already has one."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    receipt.job_id,
                    request_id,
                    receipt.worker.lower(),
                    receipt.offer_hash,
                    receipt.result_hash,
                    receipt.steps_done,
                    receipt.work_units,
                    receipt.completed_at,
                    msgspec.msgpack.encode(receipt),
                    signature,
                    time.time(),
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "UPDATE jobs SET state='done', updated_at=? WHERE job_id=?",
                (time.time(), receipt.job_id),
            )
            return True

    # --- reads -------------------------------------------------------------------------
    def unfinished_jobs(self) -> list[StoredJob]:
        """Jobs without a receipt: after a restart they go back in the queue."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, request_id, idx, params, work_units, state, attempts FROM jobs"
                " WHERE state='queued' ORDER BY rowid"
            ).fetchall()
        return [
            StoredJob(r[0], r[1], r[2], _params_decoder.decode(r[3]), r[4], r[5], r[6])
            for r in rows
        ]

    def job_state(self, job_id: bytes) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else str(row[0])

    def receipt(self, job_id: bytes) -> StoredReceipt | None:
        with self._lock:
            row = self._db.execute(
                "SELECT receipt, signature, request_id FROM receipts WHERE job_id=?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredReceipt(_receipt_decoder.decode(row[0]), row[1], row[2])

    def receipts(self) -> list[StoredReceipt]:
        with self._lock:
            rows = self._db.execute(
                "SELECT receipt, signature, request_id FROM receipts ORDER BY rowid"
            ).fetchall()
        return [StoredReceipt(_receipt_decoder.decode(r[0]), r[1], r[2]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            receipts = self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
        out = {state: int(n) for state, n in rows}
        out["receipts"] = int(receipts)
        return out
