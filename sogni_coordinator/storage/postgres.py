"""A psycopg connection that behaves like the part of `sqlite3.Connection` components use.

Why an adapter: the components are written against `sqlite3` (execute, fetchone, rowcount,
`sqlite3.IntegrityError`); this runs the same calls on PostgreSQL, translating each
statement once (`dialect.to_postgres`, cached) and normalising what comes back: `bytea`
as `bytes`, integral `numeric` (what `SUM(bigint)` returns) as `int`. psycopg's errors are
raised as the `sqlite3` classes components already catch (IntegrityError for a constraint,
OperationalError for a missing table or a lost server), with psycopg's as the cause.

Autocommit mode with explicit `BEGIN`/`COMMIT`, like the SQLite connection in `db.py`.
A write transaction first takes one transaction-scoped advisory lock per database
(`WRITE_LOCK`): writers of every coordinator on the database take turns, as SQLite's
`BEGIN IMMEDIATE` makes them, so a component's read-then-write (a balance check before a
debit) sees every committed write and the ledger stays conserved. The cost is one writer
at a time per database (docs/SCALING.md measures it); the job queue does not take this
lock (its own `SKIP LOCKED` leases let coordinators lease in parallel).

psycopg is blocking: `db.Database` runs writes in worker threads (its write queue) and
reads under its lock; see docs/SCALING.md for which reads still run on the calling thread.
"""

from __future__ import annotations

import select
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from sogni_coordinator.storage.dialect import to_postgres

WRITE_LOCK = 0x736F676E69
"""The advisory lock key a write transaction holds (the job queue's migration lock too)."""

Row = tuple[Any, ...]


def _value(v: Any) -> Any:
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def _params(params: Sequence[Any]) -> tuple[Any, ...]:
    """SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL would refuse a boolean
    there, so it gets the same 0/1."""
    return tuple(int(p) if isinstance(p, bool) else p for p in params)


def _row(row: Sequence[Any]) -> Row:
    return tuple(_value(v) for v in row)


def _as_sqlite(exc: psycopg.Error) -> sqlite3.Error:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.IntegrityError):
        return sqlite3.IntegrityError(text)
    if isinstance(exc, psycopg.errors.LockNotAvailable | pg_errors.QueryCanceled):
        return sqlite3.OperationalError(f"database is locked: {text}")
    if isinstance(exc, psycopg.OperationalError | psycopg.ProgrammingError):
        return sqlite3.OperationalError(text)
    return sqlite3.DatabaseError(text)


class PgCursor:
    """What `execute` returns: rows read eagerly (the connection is shared), `rowcount`."""

    def __init__(self, rows: list[Row], rowcount: int, changed: int = 0) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount
        self.changed = changed
        """Rows an INSERT, UPDATE or DELETE wrote (0 for a read)."""

    @property
    def lastrowid(self) -> int | None:
        raise AttributeError("lastrowid does not exist on PostgreSQL: use INSERT ... RETURNING")

    def fetchone(self) -> Row | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Row]:
        rows, self._next = self._rows[self._next :], len(self._rows)
        return rows

    def fetchmany(self, size: int = 1) -> list[Row]:
        rows = self._rows[self._next : self._next + size]
        self._next += len(rows)
        return rows

    def __iter__(self) -> Iterator[Row]:
        while (row := self.fetchone()) is not None:
            yield row


LOST_IN_TRANSACTION = (
    "the connection to PostgreSQL was lost inside a transaction: the server rolled it back "
    "(retry it; the connection is opened again after ROLLBACK)"
)
LOST_AT_COMMIT = (
    "the connection to PostgreSQL was lost during COMMIT: the transaction may or may not "
    "have committed (check before retrying)"
)


class PgConnection:
    """One psycopg connection, used by one thread at a time (`db._Shared` holds the lock).

    A connection the server dropped (restart, failover, `pg_terminate_backend`, an idle
    timeout) is opened again before the next statement outside a transaction: a drop while
    idle is seen before anything is sent (the server's goodbye is waiting on the socket), and
    a read or `BEGIN` that met a drop in flight is run once more on the new connection.
    Inside a transaction there is nothing to resume (the server rolled it back): the
    statement fails with `LOST_IN_TRANSACTION`, and so does every later one until the
    caller's `ROLLBACK`, never running the rest of the transaction on a fresh connection
    outside it."""

    def __init__(self, url: str, *, lock_timeout_s: float) -> None:
        self.url = url
        self._lock_timeout_ms = int(lock_timeout_s * 1000)
        self._conn = self._connect()
        self._lost = False
        """The connection broke inside a transaction that the caller has not rolled back."""
        self._shut = False
        """`close()` was called."""
        self.reconnects = 0
        self.total_changes = 0
        """Rows written since it opened, as `sqlite3.Connection.total_changes` (db.py tells
        a commit that wrote from an empty one by it: only the first proves the disk)."""

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            conn = psycopg.connect(self.url, autocommit=True)
            conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
        except psycopg.Error as exc:
            raise _as_sqlite(exc) from exc
        return conn

    def _usable(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, between transactions; one the server dropped (or a reconnect
        that failed left closed) is replaced first."""
        if self._shut:  # as sqlite3 after `close()`: never opened again behind its back
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        if self._conn.closed or self._conn.broken or _dropped(self._conn):
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        self._conn.close()
        self._conn = self._connect()  # a failure leaves it closed: the next call tries again
        self.reconnects += 1

    @property
    def in_transaction(self) -> bool:
        if self._lost:  # until the caller's ROLLBACK
            return True
        if self._conn.broken or self._conn.closed:  # a closed one's status reads UNKNOWN,
            return False  # not IDLE: taken for a transaction, it was never opened again
        return self._conn.info.transaction_status != TransactionStatus.IDLE

    def _lost_error(self, sql: str) -> sqlite3.OperationalError:
        self._lost = True
        text = LOST_AT_COMMIT if _first_word(sql) in ("COMMIT", "END") else LOST_IN_TRANSACTION
        return sqlite3.OperationalError(text)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        if self._lost:
            if _first_word(sql) == "ROLLBACK" and "TO" not in sql.upper().split():
                self._lost = False  # the server rolled it back already
                return PgCursor([], -1)
            raise sqlite3.OperationalError(LOST_IN_TRANSACTION)
        in_tx = self.in_transaction
        for attempt in (0, 1):
            conn = self._conn if in_tx else self._usable()
            try:
                out = self._run(conn, sql, params)
                self.total_changes += out.changed
                return out
            except psycopg.Error as exc:
                if not conn.broken:
                    raise _as_sqlite(exc) from exc
                if in_tx:
                    raise self._lost_error(sql) from exc
                if attempt or _first_word(sql) not in _REPEATABLE:
                    raise _as_sqlite(exc) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _run(
        conn: psycopg.Connection[tuple[Any, ...]], sql: str, params: Sequence[Any]
    ) -> PgCursor:
        out = PgCursor([], -1)
        with conn.cursor() as cur:
            for query in to_postgres(sql):  # one, but none for PRAGMA, more for ADD COLUMN
                cur.execute(query, _params(params))  # type: ignore[arg-type]  # translated
                rows = [_row(r) for r in cur.fetchall()] if cur.description else []
                out = PgCursor(rows, cur.rowcount, _changed(cur.statusmessage, cur.rowcount))
        return out

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        queries = to_postgres(sql)
        if len(queries) != 1:
            raise ValueError(f"executemany takes one plain statement, not {sql[:40]!r}")
        query = queries[0]
        rows = [_params(p) for p in seq]
        if not rows:
            return PgCursor([], 0)
        if self._lost:
            raise sqlite3.OperationalError(LOST_IN_TRANSACTION)
        in_tx = self.in_transaction
        conn = self._conn if in_tx else self._usable()
        try:
            with conn.cursor() as cur:
                cur.executemany(query, rows)  # type: ignore[arg-type]  # translated
                self.total_changes += max(cur.rowcount, 0)
                return PgCursor([], cur.rowcount)
        except psycopg.Error as exc:
            if conn.broken and in_tx:
                raise self._lost_error(sql) from exc
            raise _as_sqlite(exc) from exc

    def begin_write(self) -> None:
        """`BEGIN`, then wait for the database's write lock (up to `lock_timeout`)."""
        self.execute("BEGIN")
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
        except BaseException:
            self.execute("ROLLBACK")
            raise

    def table_exists(self, name: str) -> bool:
        row = self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        self._shut = True
        self._conn.close()


_WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE")


def _changed(status: str | None, rowcount: int) -> int:
    """Rows a statement wrote, from its command tag ("INSERT 0 3", "UPDATE 2", "SELECT 1")."""
    return max(rowcount, 0) if status is not None and status.startswith(_WRITES) else 0


_REPEATABLE = frozenset({"BEGIN", "SELECT", "ROLLBACK"})
"""Statements that may run twice outside a transaction: one that met a dropped connection
in flight is run again on a new one (a write outside a transaction is not: it may have
committed before the connection went)."""


def _first_word(sql: str) -> str:
    return sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""


def _dropped(conn: psycopg.Connection[Any]) -> bool:
    """Has the server closed this idle connection? Between statements nothing is due from
    the server, so anything readable on the socket is its goodbye (a FATAL error, then
    EOF); at worst an unasked-for message costs a reconnect, outside any transaction.
    `poll`, not `select`: select() refuses a descriptor of 1024 or more (FD_SETSIZE), which a
    busy coordinator's sockets reach, and every statement would then reconnect."""
    try:
        if not hasattr(select, "poll"):  # Windows: select() has no such limit there
            readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
            return bool(readable)
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))  # readable, or hung up / in error: dropped either way
    except (psycopg.Error, OSError, ValueError):
        return True


def probe_writable(url: str, timeout: float) -> str | None:
    """The readiness probe's PostgreSQL form (blocking): a connection of its own takes the
    write lock and rolls back at once, and asks whether the server takes writes at all (a
    standby after a failover, or a database set read-only, grants the lock but refuses
    every write); None if it could and does, else a one-line reason. A full disk on the
    server shows in the coordinator's own failing writes (`db.WriteFailure`), not here."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute(f"SET lock_timeout = {int(timeout * 1000)}")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
                ).fetchone()
    except psycopg.Error as exc:
        return f"database not writable ({type(exc).__name__})"
    if row is not None and row[0]:
        return "database not writable: the server is a read-only standby (in recovery)"
    if row is not None and row[1] == "on":
        return "database not writable: transactions are read-only (default_transaction_read_only)"
    return None
