"""The coordinator store's PostgreSQL connection after the server drops it (issue #18).

Against the session's real server: a backend is ended with `pg_terminate_backend` (what a
restart, a failover or an idle kill does to a connection), then the next statement is run.
Outside a transaction it works on a new connection; inside one it fails with a clear error
(the server rolled the transaction back) and nothing of the transaction runs outside it.
The result store's and the shared rate limits' own connections (`storage.lazy`) too.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import time
from collections.abc import Iterator

import psycopg
import pytest

from sogni_coordinator.gateway.limits import LimitsUnavailable, SharedLimits
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.results.base import StoreError
from sogni_coordinator.results.postgres import PostgresResults
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


@pytest.fixture
def conn(pg_url: str) -> Iterator[PgConnection]:
    """A store connection (lock timeout 5 s) to the test's database, with an empty table t."""
    conn = PgConnection(pg_url, lock_timeout_s=5)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        yield conn
    finally:
        conn.close()


def _lost_mid_transaction(conn: PgConnection, url: str) -> None:
    """Begin a write transaction, insert 1 into t, then have the server drop the connection."""
    conn.begin_write()
    conn.execute("INSERT INTO t VALUES (1)")
    _terminate(url, _pid(conn))


def test_outside_a_transaction_the_next_statement_reconnects(
    conn: PgConnection, pg_url: str
) -> None:
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


def test_inside_a_transaction_the_loss_is_an_error_until_rollback(
    conn: PgConnection, pg_url: str
) -> None:
    _lost_mid_transaction(conn, pg_url)
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


def test_a_lost_commit_says_its_outcome_is_unknown(conn: PgConnection, pg_url: str) -> None:
    _lost_mid_transaction(conn, pg_url)
    with pytest.raises(sqlite3.OperationalError, match="may or may not have committed"):
        conn.execute("COMMIT")
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)


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


def test_a_connection_on_a_descriptor_above_1023_is_kept(pg_url: str) -> None:
    """A busy coordinator (many node streams) opens PostgreSQL sockets on descriptors of
    1024 and more, which `select()` refuses: the idle-drop check must still tell a live
    connection (kept) from a dropped one (opened again), not reconnect before every
    statement."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    assert hard == resource.RLIM_INFINITY or hard >= want, f"RLIMIT_NOFILE hard limit {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:  # the lowest free descriptors, taken
            held.append(os.open(os.devnull, os.O_RDONLY))
        conn = PgConnection(pg_url, lock_timeout_s=5)
        try:
            assert conn._conn.pgconn.socket >= 1024
            for _ in range(3):
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.reconnects == 0  # live: kept
            _terminate(pg_url, _pid(conn))
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.reconnects == 1  # dropped: opened again, once
        finally:
            conn.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _drop_all(url: str) -> int:
    """End every other backend on the test's database (a restart, to the components); how
    many there were."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    for (pid,) in rows:
        _terminate(url, pid)
    return len(rows)


def test_the_result_store_and_the_shared_limits_open_their_connection_again(
    pg_url: str,
) -> None:
    """After a drop, the result store runs a read again on a new connection (no error) but
    not a write (it may have committed: `StoreError`), the shared limits refuse the check
    (the gateway then counts in memory) without spending a token, and the next call of
    each works on a new connection. A closed store opens again; closed limits do not."""
    store = PostgresResults(pg_url)
    limits = SharedLimits(pg_url, clock=lambda: 1000.0)
    try:
        store.open()
        limits.open()
        assert _drop_all(pg_url) == 2
        assert store.count() == 0  # a read: run again
        with pytest.raises(LimitsUnavailable) as lost:
            limits.take("requests", "k", 60, 2)
        assert "\n" not in str(lost.value)
        assert [limits.take("requests", "k", 60, 2) for _ in range(3)] == [True, True, False]
        assert _drop_all(pg_url) == 2
        with pytest.raises(StoreError, match=r"^result store: "):  # a write: not run again
            store.save_named("img", "image/png", b"png")
        assert store.named("img", data=False) is None  # nothing written, connected again
        store.close()
        store.save_named("img", "image/png", b"png")
        assert store.named("img", data=True) == (
            "image/png",
            pytest.approx(time.time(), abs=60),
            b"png",
        )
        limits.close()
        with pytest.raises(LimitsUnavailable, match="closed"):
            limits.take("requests", "k2", 60, 2)
    finally:
        store.close()
        limits.close()
