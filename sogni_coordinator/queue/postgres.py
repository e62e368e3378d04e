"""The job queue in PostgreSQL, shared by every coordinator of a network.

Why this shape: coordinators take jobs with `SELECT ... FOR UPDATE SKIP LOCKED`, so two
of them leasing at once take different jobs and neither waits for the other; expired leases
are swept by whoever leases next (also `SKIP LOCKED`), so a dead coordinator's jobs come
back without a leader. Times are the database's clock (`clock_timestamp()`), one clock for
every coordinator however far apart their own clocks drift. Enqueues and jobs returned to
the queue `NOTIFY` a channel that every coordinator `LISTEN`s on, on a connection of its own.

psycopg is blocking: every call runs in a trio worker thread, never on the trio thread, and
each connection has a lock (a psycopg connection serves one statement at a time).
Migrations run under a transaction-scoped advisory lock, so coordinators starting together
apply them once.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import trio
from psycopg import errors as pg_errors

from sogni_coordinator.db import SchemaTooNew
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
from sogni_protocol.migrations import split_statements

T = TypeVar("T")

COMPONENT = "job_queue"
DEFAULT_CHANNEL = "sogni_queue"
_MIGRATION_LOCK = 0x736F676E69  # "sogni": one advisory lock key for every schema change
_WAIT_SLICE = 0.25
"""A waiting thread checks for cancellation this often."""
BOUNDED = "-c lock_timeout=10s -c statement_timeout=60s"
"""Session options of the queue's working connections: no statement waits for good (a lock
held by a stuck or dead session fails the call, which its caller retries)."""

_SCHEMA_V1 = """
CREATE TABLE queue_jobs (
    job_id        BYTEA PRIMARY KEY,
    seq           BIGINT GENERATED ALWAYS AS IDENTITY,
    request_id    BYTEA NOT NULL,
    payload       BYTEA NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'dead')),
    attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_owner   TEXT,
    lease_expires DOUBLE PRECISION,
    enqueued_at   DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    CHECK ((state = 'leased') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL))
);
CREATE INDEX queue_jobs_ready ON queue_jobs (seq) WHERE state = 'queued';
CREATE INDEX queue_jobs_leased ON queue_jobs (lease_expires) WHERE state = 'leased';
CREATE INDEX queue_jobs_request ON queue_jobs (request_id);
CREATE TABLE queue_receipts (
    job_id         BYTEA PRIMARY KEY REFERENCES queue_jobs (job_id),
    receipt_id     BYTEA NOT NULL UNIQUE,
    coordinator_id TEXT NOT NULL,
    completed_at   DOUBLE PRECISION NOT NULL
);
"""

_SCHEMA_V2 = """
ALTER TABLE queue_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX queue_jobs_ready;
CREATE INDEX queue_jobs_ready ON queue_jobs (priority DESC, seq) WHERE state = 'queued';
"""
"""v2: the payer's stake tier orders the shared queue (higher first, then first in)."""

MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2)
"""The job_queue component's PostgreSQL schema versions, in order."""

_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component   TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    migrated_at DOUBLE PRECISION NOT NULL
)
"""

_NOW = "extract(epoch FROM clock_timestamp())::float8"

_SWEEP = f"""
UPDATE queue_jobs j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
    lease_owner = NULL, lease_expires = NULL, updated_at = {_NOW}
FROM (SELECT job_id FROM queue_jobs
      WHERE state = 'leased' AND lease_expires <= {_NOW}
      FOR UPDATE SKIP LOCKED) e
WHERE j.job_id = e.job_id
RETURNING j.job_id, j.state
"""

_TAKE = f"""
WITH c AS (SELECT {_NOW} AS now),
picked AS (SELECT job_id FROM queue_jobs WHERE state = 'queued'
             AND (%(all)s OR payload = ANY(%(payloads)s))
           ORDER BY priority DESC, seq LIMIT %(n)s FOR UPDATE SKIP LOCKED)
UPDATE queue_jobs j
SET state = 'leased', lease_owner = %(owner)s, lease_expires = c.now + %(ttl)s,
    attempts = j.attempts + 1, updated_at = c.now
FROM picked, c
WHERE j.job_id = picked.job_id
RETURNING -j.priority, j.seq, j.job_id, j.request_id, j.payload, j.attempts, j.lease_expires
"""

_RENEW = f"""
WITH c AS (SELECT {_NOW} AS now)
UPDATE queue_jobs SET lease_expires = c.now + %(ttl)s, updated_at = c.now
FROM c
WHERE job_id = %(job)s AND state = 'leased' AND lease_owner = %(owner)s
  AND attempts = %(attempt)s AND lease_expires > c.now
RETURNING lease_expires
"""

_RENEW_LAPSED = f"""
WITH c AS (SELECT {_NOW} AS now)
UPDATE queue_jobs SET lease_expires = c.now + %(ttl)s, updated_at = c.now
FROM c
WHERE job_id = %(job)s AND state = 'leased' AND lease_owner = %(owner)s
  AND attempts = %(attempt)s
RETURNING lease_expires
"""
"""`_RENEW`, and a lease that lapsed while nobody swept it: the row still names this lease
(a sweep that returned it to the queue changed its state, and the row lock orders the two),
so no other coordinator holds the job or ever did since."""

_RELEASE = f"""
UPDATE queue_jobs
SET state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
    lease_owner = NULL, lease_expires = NULL, updated_at = {_NOW}
WHERE job_id = %(job)s AND state = 'leased' AND lease_owner = %(owner)s
  AND attempts = %(attempt)s
RETURNING state
"""

_STATUS = """
SELECT j.job_id, j.state, j.attempts, j.max_attempts, j.lease_owner, j.lease_expires,
       r.receipt_id
FROM queue_jobs j LEFT JOIN queue_receipts r ON r.job_id = j.job_id WHERE j.job_id = %s
"""


def redact(url: str) -> str:
    """`url` without its password, for error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def error_line(exc: BaseException, url: str) -> str:
    """The first line of a psycopg error, without the URL's password (libpq may quote the
    URL it could not use)."""
    text = str(exc).strip()
    line = text.splitlines()[0][:300] if text else type(exc).__name__
    password = _password(url)
    return line.replace(password, "***") if password else line


def connect_migrated(
    url: str, component: str, migrations: Sequence[str] | None
) -> psycopg.Connection[Any]:
    """An autocommit connection with bounded lock and statement times, `component` migrated
    first when `migrations` is given (closed again if that fails)."""
    conn = psycopg.connect(url, autocommit=True, connect_timeout=10, options=BOUNDED)
    try:
        if migrations is not None:
            migrate(conn, component, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: psycopg.Connection[Any], component: str, migrations: Sequence[str]) -> int:
    """Bring `component` to `len(migrations)` in one transaction, under the advisory lock;
    refuses a database newer than the code (`SchemaTooNew`)."""
    target = len(migrations)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(_VERSIONS_TABLE)
        row = conn.execute(
            "SELECT version FROM schema_versions WHERE component = %s", (component,)
        ).fetchone()
        current = 0 if row is None else int(row[0])
        if current > target:
            raise SchemaTooNew(
                f"PostgreSQL {component} schema is version {current}, newer than this "
                f"code's version {target}; upgrade sogni-coordinator"
            )
        for script in migrations[current:]:
            for statement in split_statements(script):
                conn.execute(statement.encode())
        if current < target:
            conn.execute(
                "INSERT INTO schema_versions VALUES (%s, %s, %s) ON CONFLICT (component)"
                " DO UPDATE SET version = EXCLUDED.version, migrated_at = EXCLUDED.migrated_at",
                (component, target, time.time()),
            )
    return target


def _receipt_refused(job_id: bytes, exc: psycopg.Error) -> QueueError:
    if isinstance(exc, pg_errors.ForeignKeyViolation):
        return UnknownJob(f"job {short(job_id)} was never queued")
    if exc.diag.constraint_name == "queue_receipts_receipt_id_key":
        return QueueError(f"job {short(job_id)}: that receipt id is recorded for another job")
    return AlreadyCompleted(f"job {short(job_id)} has its receipt already")


class PostgresQueue(JobQueue):
    """One coordinator's handle: a connection for queue work, one for LISTEN."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        listen: psycopg.Connection[Any],
        channel: str,
        url: str = "",
    ) -> None:
        self._url = url
        """Where a lost connection is opened again (empty: it is not)."""
        self._conn = conn
        self._listen = listen
        self._channel = channel
        self._lock = threading.Lock()
        self._listen_lock = threading.Lock()
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, channel: str = DEFAULT_CHANNEL) -> PostgresQueue:
        """Connect to `url`, apply the queue's migrations, LISTEN on `channel`."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", channel):
            raise QueueError(f"channel {channel!r}: use lower-case letters, digits and _")
        return await trio.to_thread.run_sync(cls._open_sync, url, channel)

    @classmethod
    def _open_sync(cls, url: str, channel: str) -> PostgresQueue:
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10, options=BOUNDED)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            password = _password(url)
            if password:  # libpq may quote the URL it could not parse
                reason = reason.replace(password, "***")
            raise QueueError(f"cannot connect to PostgreSQL at {redact(url)}: {reason}") from exc
        try:
            migrate(conn, COMPONENT, MIGRATIONS)
            listen = cls._listener(url, channel)
        except BaseException:
            conn.close()
            raise
        return cls(conn, listen, channel, url)

    @staticmethod
    def _listener(url: str, channel: str) -> psycopg.Connection[Any]:
        listen = psycopg.connect(url, autocommit=True, connect_timeout=10)
        listen.execute(f"LISTEN {channel}".encode())
        return listen

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise QueueError("the queue handle is closed")
        return await trio.to_thread.run_sync(functools.partial(self._locked, fn, *args))

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the queue connection; a connection the server lost is opened again
        first (the call that met the loss fails with `QueueError`; its caller retries)."""
        with self._lock:
            try:
                if (self._conn.closed or self._conn.broken) and self._url and not self._closed:
                    self._conn = psycopg.connect(
                        self._url, autocommit=True, connect_timeout=10, options=BOUNDED
                    )
                return fn(*args)
            except psycopg.OperationalError as exc:
                if self._conn.closed or self._conn.broken:
                    raise QueueError(f"PostgreSQL connection lost ({type(exc).__name__})") from exc
                raise

    def _notify(self) -> None:
        self._conn.execute("SELECT pg_notify(%s, '')", (self._channel,))

    # --- the synchronous halves (worker thread, under `_lock`) -----------------------------
    def _enqueue(self, jobs: Sequence[NewJob]) -> None:
        with self._conn.transaction():
            for job in jobs:  # a refused insert rolls the whole batch back
                try:
                    self._conn.execute(
                        "INSERT INTO queue_jobs (job_id, request_id, payload, state,"
                        " max_attempts, priority, enqueued_at, updated_at)"
                        f" VALUES (%s, %s, %s, 'queued', %s, %s, {_NOW}, {_NOW})",
                        (job.job_id, job.request_id, job.payload, job.max_attempts, job.priority),
                    )
                except pg_errors.UniqueViolation as exc:
                    raise DuplicateJob(f"job {short(job.job_id)} is already queued") from exc
            self._notify()

    def _sweep(self) -> Expired:
        rows = self._conn.execute(_SWEEP).fetchall()
        return Expired(
            requeued=tuple(bytes(r[0]) for r in rows if r[1] == QueueState.QUEUED),
            dead=tuple(bytes(r[0]) for r in rows if r[1] == QueueState.DEAD),
        )

    def _expire(self) -> Expired:
        with self._conn.transaction():
            expired = self._sweep()
            if expired.requeued:
                self._notify()
        return expired

    def _drain(self) -> None:
        """Forget wake-ups that arrived before this lease began: it sees their jobs."""
        if self._listen_lock.acquire(blocking=False):  # not while this handle waits
            try:
                for _ in self._listen.notifies(timeout=0):
                    pass
            except psycopg.OperationalError:
                pass  # the next wait opens it again
            finally:
                self._listen_lock.release()

    def _lease(
        self, owner: str, n: int, ttl: float, payloads: Sequence[bytes] | None = None
    ) -> list[Lease]:
        self._drain()
        args = {
            "n": n,
            "owner": owner,
            "ttl": ttl,
            "all": payloads is None,
            "payloads": list(payloads or ()),
        }
        with self._conn.transaction():
            expired = self._sweep()
            rows = self._conn.execute(_TAKE, args).fetchall()
            if expired.requeued and len(rows) == n:  # others may take what we did not
                self._notify()
        return [
            Lease(bytes(job_id), bytes(request_id), bytes(payload), owner, attempts, expires, -neg)
            for neg, _seq, job_id, request_id, payload, attempts, expires in sorted(rows)
        ]

    def _renew(self, lease: Lease, ttl: float, lapsed: bool = False) -> Lease:
        row = self._conn.execute(
            _RENEW_LAPSED if lapsed else _RENEW,
            {"ttl": ttl, "job": lease.job_id, "owner": lease.owner, "attempt": lease.attempt},
        ).fetchone()
        if row is None:
            raise LeaseLost(f"job {short(lease.job_id)}: lease {lease.attempt} is lost")
        return Lease(
            lease.job_id, lease.request_id, lease.payload, lease.owner, lease.attempt, float(row[0])
        )

    def _release(self, lease: Lease) -> QueueState:
        with self._conn.transaction():
            row = self._conn.execute(
                _RELEASE, {"job": lease.job_id, "owner": lease.owner, "attempt": lease.attempt}
            ).fetchone()
            if row is None:
                raise LeaseLost(f"job {short(lease.job_id)}: lease {lease.attempt} is lost")
            state = QueueState(row[0])
            if state is QueueState.QUEUED:
                self._notify()
        return state

    def _complete(self, job_id: bytes, receipt_id: bytes, owner: str) -> None:
        with self._conn.transaction():
            try:
                self._conn.execute(
                    "INSERT INTO queue_receipts (job_id, receipt_id, coordinator_id,"
                    f" completed_at) VALUES (%s, %s, %s, {_NOW})",
                    (job_id, receipt_id, owner),
                )
            except (pg_errors.UniqueViolation, pg_errors.ForeignKeyViolation) as exc:
                raise _receipt_refused(job_id, exc) from exc
            done = self._conn.execute(
                "UPDATE queue_jobs SET state = 'done', lease_owner = NULL, lease_expires = NULL,"
                f" updated_at = {_NOW} WHERE job_id = %s AND state IN ('queued', 'leased')"
                " RETURNING 1",
                (job_id,),
            ).fetchone()
            if done is None:
                raise JobNotLive(f"job {short(job_id)} was given up on; it takes no receipt")

    def _bury(self, job_ids: Sequence[bytes], request_id: bytes | None) -> list[bytes]:
        if request_id is not None:  # every job of the request nobody leases now
            rows = self._conn.execute(
                f"UPDATE queue_jobs SET state = 'dead', updated_at = {_NOW}"
                " WHERE request_id = %s AND state = 'queued' RETURNING job_id",
                (request_id,),
            ).fetchall()
        else:
            rows = self._conn.execute(
                "UPDATE queue_jobs SET state = 'dead', lease_owner = NULL, lease_expires = NULL,"
                f" updated_at = {_NOW} WHERE job_id = ANY(%s) AND state IN ('queued', 'leased')"
                " RETURNING job_id",
                (list(job_ids),),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def _status(self, job_id: bytes) -> JobStatus:
        row = self._conn.execute(_STATUS, (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"job {short(job_id)} was never queued")
        return JobStatus.from_row(row)

    def _counts(self) -> dict[QueueState, int]:
        rows = self._conn.execute(
            "SELECT state, COUNT(*) FROM queue_jobs GROUP BY state"
        ).fetchall()
        out = dict.fromkeys(QueueState, 0)
        out.update({QueueState(state): int(n) for state, n in rows})
        return out

    def _wait(self, deadline: float, stop: threading.Event) -> bool:
        """True on a NOTIFY. A lost LISTEN connection is opened again; until it is, every
        wait says "look" (a missed NOTIFY costs a look at the queue, never a stall)."""
        with self._listen_lock:
            while not (stop.is_set() or self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    if (self._listen.closed or self._listen.broken) and self._url:
                        self._listen = self._listener(self._url, self._channel)
                    for _ in self._listen.notifies(
                        timeout=min(remaining, _WAIT_SLICE), stop_after=1
                    ):
                        return True
                except psycopg.OperationalError:
                    time.sleep(min(max(deadline - time.monotonic(), 0.0), _WAIT_SLICE))
                    return True
        return False

    def _close(self) -> None:
        with self._lock:
            self._conn.close()
        with self._listen_lock:
            self._listen.close()

    # --- the interface ---------------------------------------------------------------------
    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        check_new(jobs)
        if jobs:
            await self._run(self._enqueue, list(jobs))

    async def lease(
        self, owner: str, n: int, ttl: float, payloads: Sequence[bytes] | None = None
    ) -> list[Lease]:
        check_lease_args(owner, n, ttl)
        return await self._run(self._lease, owner, n, float(ttl), payloads)

    async def bury(
        self, job_ids: Sequence[bytes] = (), *, request_id: bytes | None = None
    ) -> list[bytes]:
        """Take jobs out of the queue for good (the dead state), whoever leases them: the
        coordinator gave up on them, or (`request_id`) its client cancelled and these were
        still queued. Returns the jobs buried."""
        return await self._run(self._bury, list(job_ids), request_id)

    async def renew(self, lease: Lease, ttl: float, *, lapsed: bool = False) -> Lease:
        """`lapsed`: also a lease past its expiry that no coordinator swept yet (its holder
        was cut off from the database longer than the lease, and its node still renders):
        kept, rather than lost to a sweep that never came and the render stopped."""
        check_lease_args(lease.owner, 1, ttl)
        return await self._run(self._renew, lease, float(ttl), lapsed)

    async def release(self, lease: Lease) -> QueueState:
        return await self._run(self._release, lease)

    async def complete(self, job_id: bytes, receipt_id: bytes, owner: str) -> None:
        if not receipt_id:
            raise QueueError(f"job {short(job_id)}: the receipt id is empty")
        await self._run(self._complete, job_id, receipt_id, owner)

    async def expire(self) -> Expired:
        return await self._run(self._expire)

    async def status(self, job_id: bytes) -> JobStatus:
        return await self._run(self._status, job_id)

    async def counts(self) -> dict[QueueState, int]:
        return await self._run(self._counts)

    async def wait_for_work(self, timeout: float) -> bool:
        """NOTIFYs that arrive between waits stay in the LISTEN connection's buffer and wake
        the next wait at once, so none is lost (a stale one only wakes early)."""
        if self._closed:
            raise QueueError("the queue handle is closed")
        stop = threading.Event()
        try:
            wait = functools.partial(self._wait, time.monotonic() + timeout, stop)
            return await trio.to_thread.run_sync(wait, abandon_on_cancel=True)  # type: ignore[call-arg]
        finally:
            stop.set()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await trio.to_thread.run_sync(self._close)
