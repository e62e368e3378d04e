"""The job queue in the coordinator's SQLite file: one coordinator, same semantics as PostgreSQL.

Why it exists: the embedded single-coordinator default keeps SQLite, and the dispatcher
should speak one queue interface whatever the engine. The tables are their own component
(`job_queue`) of `db.Database`, so writes join the file's group commit when its writer runs.
Wake-ups are in-process: handles on the same file in one trio run wake each other.
"""

from __future__ import annotations

import sqlite3
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import trio

from sogni_coordinator.db import Database
from sogni_coordinator.queue.base import (
    AlreadyCompleted,
    DuplicateJob,
    Expired,
    JobNotLive,
    JobQueue,
    JobStatus,
    Lease,
    LeaseLost,
    NewJob,
    QueueError,
    QueueState,
    UnknownJob,
    check_lease_args,
    check_new,
    short,
)

_SCHEMA_V1 = """
CREATE TABLE queue_jobs (
    job_id        BLOB PRIMARY KEY,
    request_id    BLOB NOT NULL,
    payload       BLOB NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'dead')),
    attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_owner   TEXT,
    lease_expires REAL,
    enqueued_at   REAL NOT NULL,
    updated_at    REAL NOT NULL,
    CHECK ((state = 'leased') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL))
);
CREATE INDEX queue_jobs_state ON queue_jobs(state, lease_expires);
CREATE INDEX queue_jobs_request ON queue_jobs(request_id);
CREATE TABLE queue_receipts (
    job_id         BLOB PRIMARY KEY REFERENCES queue_jobs(job_id),
    receipt_id     BLOB NOT NULL UNIQUE,
    coordinator_id TEXT NOT NULL,
    completed_at   REAL NOT NULL
);
"""

_SCHEMA_V2 = """
ALTER TABLE queue_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
"""
"""v2: a priority (the payer's stake tier), leased highest first, then first in."""

MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2)
"""The job_queue component's schema versions (`db.Database` applies the missing ones)."""

COMPONENT = "job_queue"

_STATUS_SQL = """
SELECT j.job_id, j.state, j.attempts, j.max_attempts, j.lease_owner, j.lease_expires,
       r.receipt_id
FROM queue_jobs j LEFT JOIN queue_receipts r ON r.job_id = j.job_id WHERE j.job_id = ?
"""


class _QueueFile(Database):
    """The synchronous half: every method is one transaction (or a savepoint in one)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, component=COMPONENT, migrations=MIGRATIONS)

    def enqueue(self, jobs: Sequence[NewJob]) -> None:
        now = time.time()
        with self._tx() as db:
            for job in jobs:
                try:
                    db.execute(
                        "INSERT INTO queue_jobs (job_id, request_id, payload, state, attempts,"
                        " max_attempts, priority, enqueued_at, updated_at)"
                        " VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?)",
                        (
                            job.job_id,
                            job.request_id,
                            job.payload,
                            job.max_attempts,
                            job.priority,
                            now,
                            now,
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    raise DuplicateJob(f"job {short(job.job_id)} is already queued") from exc

    def _expire(self, db: sqlite3.Connection, now: float) -> Expired:
        rows = db.execute(
            "SELECT job_id, attempts >= max_attempts FROM queue_jobs"
            " WHERE state = 'leased' AND lease_expires <= ?",
            (now,),
        ).fetchall()
        requeued: list[bytes] = []
        dead: list[bytes] = []
        for job_id, exhausted in rows:
            state = QueueState.DEAD if exhausted else QueueState.QUEUED
            db.execute(
                "UPDATE queue_jobs SET state = ?, lease_owner = NULL, lease_expires = NULL,"
                " updated_at = ? WHERE job_id = ?",
                (state.value, now, job_id),
            )
            (dead if exhausted else requeued).append(bytes(job_id))
        return Expired(requeued=tuple(requeued), dead=tuple(dead))

    def expire(self) -> Expired:
        with self._tx() as db:
            return self._expire(db, time.time())

    def lease(
        self, owner: str, n: int, ttl: float, payloads: Sequence[bytes] | None = None
    ) -> tuple[list[Lease], Expired]:
        now = time.time()
        expires = now + ttl
        only = ""
        if payloads is not None:  # an empty list takes nothing
            only = f" AND payload IN ({', '.join('?' * len(payloads))})" if payloads else " AND 0"

        with self._tx() as db:
            expired = self._expire(db, now)
            rows = db.execute(
                "SELECT job_id, request_id, payload, attempts, priority FROM queue_jobs"
                f" WHERE state = 'queued'{only} ORDER BY priority DESC, rowid LIMIT ?",
                (*(payloads or ()), n),
            ).fetchall()
            leases = []
            for job_id, request_id, payload, attempts, priority in rows:
                db.execute(
                    "UPDATE queue_jobs SET state = 'leased', lease_owner = ?, lease_expires = ?,"
                    " attempts = attempts + 1, updated_at = ? WHERE job_id = ?",
                    (owner, expires, now, job_id),
                )
                leases.append(
                    Lease(
                        bytes(job_id),
                        bytes(request_id),
                        bytes(payload),
                        owner,
                        attempts + 1,
                        expires,
                        priority,
                    )
                )
        return leases, expired

    def renew(self, lease: Lease, ttl: float) -> Lease:
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE queue_jobs SET lease_expires = ?, updated_at = ? WHERE job_id = ?"
                " AND state = 'leased' AND lease_owner = ? AND attempts = ? AND lease_expires > ?",
                (now + ttl, now, lease.job_id, lease.owner, lease.attempt, now),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {short(lease.job_id)}: lease {lease.attempt} is lost")
        return Lease(
            lease.job_id, lease.request_id, lease.payload, lease.owner, lease.attempt, now + ttl
        )

    def release(self, lease: Lease) -> QueueState:
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT attempts >= max_attempts FROM queue_jobs WHERE job_id = ?"
                " AND state = 'leased' AND lease_owner = ? AND attempts = ?",
                (lease.job_id, lease.owner, lease.attempt),
            ).fetchone()
            if row is None:
                raise LeaseLost(f"job {short(lease.job_id)}: lease {lease.attempt} is lost")
            state = QueueState.DEAD if row[0] else QueueState.QUEUED
            db.execute(
                "UPDATE queue_jobs SET state = ?, lease_owner = NULL, lease_expires = NULL,"
                " updated_at = ? WHERE job_id = ?",
                (state.value, now, lease.job_id),
            )
        return state

    def complete(self, job_id: bytes, receipt_id: bytes, owner: str) -> None:
        now = time.time()
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO queue_receipts (job_id, receipt_id, coordinator_id,"
                    " completed_at) VALUES (?, ?, ?, ?)",
                    (job_id, receipt_id, owner, now),
                )
            except sqlite3.IntegrityError as exc:
                raise _receipt_refused(job_id, str(exc)) from exc
            cursor = db.execute(
                "UPDATE queue_jobs SET state = 'done', lease_owner = NULL, lease_expires = NULL,"
                " updated_at = ? WHERE job_id = ? AND state IN ('queued', 'leased')",
                (now, job_id),
            )
            if cursor.rowcount != 1:
                raise JobNotLive(f"job {short(job_id)} was given up on; it takes no receipt")

    def status(self, job_id: bytes) -> JobStatus:
        with self._lock:
            row = self._db.execute(_STATUS_SQL, (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"job {short(job_id)} was never queued")
        return JobStatus.from_row(row)

    def counts(self) -> dict[QueueState, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM queue_jobs GROUP BY state"
            ).fetchall()
        out = dict.fromkeys(QueueState, 0)
        out.update({QueueState(state): n for state, n in rows})
        return out


def _receipt_refused(job_id: bytes, error: str) -> QueueError:
    if "FOREIGN KEY" in error:
        return UnknownJob(f"job {short(job_id)} was never queued")
    if "receipt_id" in error:
        return QueueError(f"job {short(job_id)}: that receipt id is recorded for another job")
    return AlreadyCompleted(f"job {short(job_id)} has its receipt already")


_handles: dict[str, weakref.WeakSet[SqliteQueue]] = {}


class SqliteQueue(JobQueue):
    """The queue in one SQLite file, for the single coordinator that owns it."""

    def __init__(self, path: Path | str) -> None:
        self._file = _QueueFile(path)
        self._key = str(path) if str(path) == ":memory:" else str(Path(path).resolve())
        self._signalled = False
        self._woken: trio.Event | None = None
        self._closed = False
        _handles.setdefault(self._key, weakref.WeakSet()).add(self)

    @property
    def database(self) -> Database:
        """The file's `Database` (its writer groups this queue's writes with the others)."""
        return self._file

    def _poke(self) -> None:
        self._signalled = True
        if self._woken is not None:
            self._woken.set()

    def _wake_all(self) -> None:
        for handle in list(_handles.get(self._key, ())):
            handle._poke()

    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        check_new(jobs)
        if jobs:
            await self._file.call(self._file.enqueue, list(jobs))
            self._wake_all()

    async def lease(
        self, owner: str, n: int, ttl: float, payloads: Sequence[bytes] | None = None
    ) -> list[Lease]:
        check_lease_args(owner, n, ttl)
        self._signalled = False
        leases, expired = await self._file.call(self._file.lease, owner, n, ttl, payloads)
        if expired.requeued and len(leases) == n:  # others may take what we did not
            self._wake_all()
        return leases

    async def renew(self, lease: Lease, ttl: float) -> Lease:
        check_lease_args(lease.owner, 1, ttl)
        return await self._file.call(self._file.renew, lease, ttl)

    async def release(self, lease: Lease) -> QueueState:
        state = await self._file.call(self._file.release, lease)
        if state is QueueState.QUEUED:
            self._wake_all()
        return state

    async def complete(self, job_id: bytes, receipt_id: bytes, owner: str) -> None:
        if not receipt_id:
            raise QueueError(f"job {short(job_id)}: the receipt id is empty")
        await self._file.call(self._file.complete, job_id, receipt_id, owner)

    async def expire(self) -> Expired:
        expired = await self._file.call(self._file.expire)
        if expired.requeued:
            self._wake_all()
        return expired

    async def status(self, job_id: bytes) -> JobStatus:
        return await trio.to_thread.run_sync(self._file.status, job_id)

    async def counts(self) -> dict[QueueState, int]:
        return await trio.to_thread.run_sync(self._file.counts)

    async def wait_for_work(self, timeout: float) -> bool:
        if self._signalled:
            return True
        self._woken = woken = trio.Event()
        try:
            with trio.move_on_after(timeout):
                await woken.wait()
        finally:
            self._woken = None
        return woken.is_set()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            handles = _handles.get(self._key)
            if handles is not None:
                handles.discard(self)
                if not handles:
                    del _handles[self._key]
            self._file.close()
