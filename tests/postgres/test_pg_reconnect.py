"""The coordinator store's PostgreSQL connection after the server drops it (issue #18).

Against the session's real server: a backend is ended with `pg_terminate_backend` (what a
restart, a failover or an idle kill does to a connection), then the next statement is run.
Outside a transaction it works on a new connection; inside one it fails with a clear error
(the server rolled the transaction back) and nothing of the transaction runs outside it.
"""

from __future__ import annotations

import sqlite3
import time

import psycopg
import pytest

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.storage.postgres import LOST_IN_TRANSACTION, PgConnection

M = 1_000_000
ALICE = "0x" + "a1" * 20


def _terminate(url: str, pid: int) -> None:
    """End backend `pid` and wait until it is gone (its goodbye is then on the socket)."""
    with psycopg.connect(url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.01)


def _pid(conn: PgConnection) -> int:
    return conn._conn.info.backend_pid


def test_outside_a_transaction_the_next_statement_reconnects(pg_url: str) -> None:
    conn = PgConnection(pg_url, lock_timeout_s=5)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        old = _pid(conn)
        _terminate(pg_url, old)
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)  # no error
        assert conn.reconnects == 1 and _pid(conn) != old
        _terminate(pg_url, _pid(conn))  # a write outside a transaction: the same
        conn.execute("INSERT INTO t VALUES (2)")
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (2,)
        assert conn.reconnects == 2
        # the session settings are set again on the new connection
        assert conn.execute("SHOW lock_timeout").fetchone() == ("5s",)
    finally:
        conn.close()


def test_inside_a_transaction_the_loss_is_an_error_until_rollback(pg_url: str) -> None:
    conn = PgConnection(pg_url, lock_timeout_s=5)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.begin_write()
        conn.execute("INSERT INTO t VALUES (1)")
        _terminate(pg_url, _pid(conn))
        with pytest.raises(sqlite3.OperationalError) as lost:
            conn.execute("INSERT INTO t VALUES (2)")
        assert str(lost.value) == LOST_IN_TRANSACTION
        assert conn.in_transaction  # the caller must roll back: nothing runs outside it
        for sql in ("INSERT INTO t VALUES (3)", "SELECT 1", "COMMIT", "ROLLBACK TO x"):
            with pytest.raises(sqlite3.OperationalError, match="inside a transaction"):
                conn.execute(sql)
        with pytest.raises(sqlite3.OperationalError, match="inside a transaction"):
            conn.executemany("INSERT INTO t VALUES (?)", [(4,)])
        conn.execute("ROLLBACK")
        assert not conn.in_transaction
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)  # none of it ran
        conn.begin_write()  # and a new transaction works
        conn.execute("INSERT INTO t VALUES (5)")
        conn.execute("COMMIT")
        assert conn.execute("SELECT v FROM t").fetchall() == [(5,)]
    finally:
        conn.close()


def test_a_lost_commit_says_its_outcome_is_unknown(pg_url: str) -> None:
    conn = PgConnection(pg_url, lock_timeout_s=5)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.begin_write()
        conn.execute("INSERT INTO t VALUES (1)")
        _terminate(pg_url, _pid(conn))
        with pytest.raises(sqlite3.OperationalError, match="may or may not have committed"):
            conn.execute("COMMIT")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    finally:
        conn.close()


def test_a_component_keeps_working_after_the_server_drops_its_connection(pg_url: str) -> None:
    """Through `db.Database` (the ledger): reads and queued-write transactions after the drop."""
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(ALICE, 2)
        pg = ledger._shared.conn
        assert isinstance(pg, PgConnection)
        _terminate(pg_url, _pid(pg))
        assert ledger.balance(ALICE)["spark_paid"] == 2 * M  # reconnected, nothing lost
        _terminate(pg_url, _pid(pg))
        ledger.credit_purchase(ALICE, 1)  # a write transaction on a fresh connection
        assert ledger.balance(ALICE)["spark_paid"] == 3 * M
        assert pg.reconnects == 2
    finally:
        ledger.close()
