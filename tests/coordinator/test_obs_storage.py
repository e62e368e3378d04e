"""A coordinator whose storage fails says so: `/readyz` answers 503 while its writes fail
(the database writer publishes its last failure), or its volumes are read-only or nearly
full, and a render request it cannot store is refused in one line ("unavailable") instead
of a reset stream. A full disk is SQLite's own `max_page_count` limit (the same
"database or disk is full" error, no root nor small filesystem needed), or a connection
whose COMMIT fails; PostgreSQL readiness sees a server that refuses writes."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import trio

from sogni_coordinator.db import Database, DatabaseBusy, WriteFailure, storage_fault
from sogni_coordinator.metrics import (
    FAILURE_MEMORY,
    READY_MIN_FREE,
    database_writable,
    volume_fault,
    write_fault,
)
from sogni_coordinator.storage.postgres import probe_writable
from sogni_protocol.logs import configure_logging
from sogni_protocol.messages import RequestAccepted, RequestRefused, encode

from .conftest import request
from .test_obs_metrics import MeteredHarness, serve, view_of

SENTINEL = "qx-sentinel-disk-4410"


@pytest.fixture
async def metered_coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[MeteredHarness]:
    h = MeteredHarness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


def fill(h: MeteredHarness, full: bool) -> None:
    """The database can grow no more (as on a full disk), or again."""
    conn = h.store._shared.conn
    with h.store._shared.rlock:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages if full else 1_073_741_823}")


async def test_a_full_disk_refuses_requests_in_one_line_and_readyz_says_why(
    metered_coord: MeteredHarness, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", json=True, capture_warnings=False)
    h = metered_coord
    view = view_of(h, nursery)
    assert view.not_ready is not None
    h.node(0)
    assert await view.not_ready() is None

    fill(h, full=True)
    big = request(64, positive_prompt=f"a red circle {SENTINEL}")  # 64 job rows: new pages
    channel = await serve(h, encode(big))  # ends by itself: no exception, no reset
    (refused,) = channel.sent
    assert isinstance(refused, RequestRefused) and refused.code == "unavailable"
    assert "disk full" in refused.reason and "try again" in refused.reason
    assert "\n" not in refused.reason and SENTINEL not in refused.reason
    assert channel.closed
    assert h.value("requests_refused_total", code="unavailable") == 1
    assert h.value("requests_failed_total") == 0
    assert h.dispatcher.requests == {}  # nothing accepted, nothing reserved

    why = await view.not_ready()
    assert why is not None and why.startswith("database writes failing: disk full")
    assert "\n" not in why
    await h.dispatcher.durable()  # an empty commit succeeds on a full disk: proves nothing
    assert await view.not_ready() is not None

    fill(h, full=False)  # space freed: the next request is accepted and clears it
    channel = await serve(h, encode(request(64)))
    assert isinstance(channel.sent[0], RequestAccepted)
    assert await view.not_ready() is None

    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "client_request_unavailable" in names
    assert "handler_failed" not in names and "client_request_failed" not in names
    assert SENTINEL not in err


class CommitFails:
    """The shared connection, with every COMMIT failing as on a full disk while `failing`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failing = True

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_failing_commits_are_counted_and_keep_readyz_at_503(
    metered_coord: MeteredHarness, nursery: trio.Nursery
) -> None:
    h = metered_coord
    view = view_of(h, nursery)
    assert view.not_ready is not None
    shared = h.store._shared
    real = shared.conn
    broken = CommitFails(real)
    shared.conn = broken  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError, match="full"):
            await h.submit(request(1))
        assert h.store.write_stats().failed == 1
        why = await view.not_ready()
        assert why is not None and "database writes failing: disk full" in why
        assert h.value("db_commit_failures_total") == 1
        assert h.value("requests_refused_total", code="unavailable") == 1
        broken.failing = False
        await h.submit(request(1))  # a commit that wrote rows: writes work again
        assert h.store.write_failures() == []
        assert await view.not_ready() is None
    finally:
        shared.conn = real


def test_a_failure_is_forgotten_after_a_while_without_writes() -> None:
    """Nothing written since: `FAILURE_MEMORY` s later the volume checks decide alone."""
    now = time.monotonic()
    failure = WriteFailure("results", now - 30, now - 5, "disk full (OSError)")
    assert write_fault([failure], now) == (
        "result image writes failing: disk full (OSError), the last 5 s ago "
        "(failing since 30 s ago)"
    )
    assert write_fault([failure], now + FAILURE_MEMORY) is None


def test_storage_faults_are_told_from_a_writes_own_errors() -> None:
    assert storage_fault(sqlite3.OperationalError("database or disk is full")) == (
        "disk full (OperationalError)"
    )
    assert storage_fault(OSError(28, "No space left on device")) == "disk full (OSError)"
    assert storage_fault(OSError(30, "Read-only file system")) == "read-only (OSError)"
    assert storage_fault(DatabaseBusy("x")) == "locked by another process"
    assert storage_fault(sqlite3.IntegrityError("UNIQUE constraint failed")) is None
    assert storage_fault(ValueError("a bug")) is None
    secret = sqlite3.OperationalError(f"could not extend file: No space left ({SENTINEL})")
    assert SENTINEL not in (storage_fault(secret) or "")  # never the error's own text


def test_a_full_or_read_only_volume_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN IMMEDIATE and ROLLBACK need no free space: the volumes are asked too."""
    path = tmp_path / "c.db"
    sqlite3.connect(path).close()
    results = tmp_path / "results" / "not-made-yet"  # its nearest folder's volume is asked
    assert database_writable(path, timeout=0.1, results=results) is None
    real = os.statvfs(tmp_path)
    room = READY_MIN_FREE // real.f_frsize
    volumes = {tmp_path: [room - 1, real.f_flag]}  # the database's

    def statvfs(folder: Any) -> Any:
        free, flag = volumes.get(Path(folder), [room + 1, real.f_flag])
        return SimpleNamespace(f_bavail=free, f_frsize=real.f_frsize, f_flag=flag)

    monkeypatch.setattr(os, "statvfs", statvfs)
    why = database_writable(path, timeout=0.1)
    assert why is not None and why.startswith("disk full:") and "database volume" in why
    volumes[tmp_path] = [room + 1, real.f_flag | os.ST_RDONLY]
    assert database_writable(path, timeout=0.1) == "database volume is read-only"
    volumes[tmp_path] = [room + 1, real.f_flag]
    assert database_writable(path, timeout=0.1, results=results) is None
    (tmp_path / "results").mkdir()
    volumes[tmp_path / "results"] = [room - 1, real.f_flag]
    why = database_writable(path, timeout=0.1, results=results)
    assert why is not None and "result images volume" in why
    volumes[tmp_path / "results"] = [room + 1, real.f_flag | os.ST_RDONLY]
    assert volume_fault(results, "result images") == "result images volume is read-only"


def test_postgres_readiness_sees_a_database_that_refuses_writes(pg_url: str) -> None:
    """The advisory lock is granted by a server that refuses every write."""
    assert probe_writable(pg_url, 3.0) is None
    name = pg_url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        why = probe_writable(pg_url, 3.0)
        assert why is not None and "read-only" in why
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    assert probe_writable(pg_url, 3.0) is None


class Images:
    """A `GroupWriter` whose volume is full while `full` (as a results folder's would be)."""

    def __init__(self) -> None:
        self.full = True

    def write_group(self, items: list[Any]) -> list[BaseException | None]:
        return [OSError(errno.ENOSPC, "No space left on device") if self.full else None] * len(
            items
        )

    def joins(self, database: str) -> bool:
        return False

    def write_rows(self, conn: Any, items: list[Any]) -> None:
        raise AssertionError("not joined")

    def kept(self, items: list[Any]) -> None:
        pass


async def test_images_that_cannot_be_stored_are_failing_writes_too(tmp_path: Path) -> None:
    db = Database(tmp_path / "c.db", component="t", migrations=["CREATE TABLE t (x INTEGER)"])
    images = Images()

    def insert() -> None:
        with db._tx() as conn:
            conn.execute("INSERT INTO t VALUES (1)")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.run_writer)
            while not db.writer_running:  # images are staged by the writer's thread
                await trio.sleep(0.01)
            with pytest.raises(OSError, match="No space"):
                await db.call_staged((images, "image"), insert)
            (failure,) = db.write_failures()
            assert (failure.what, failure.error) == ("results", "disk full (OSError)")
            assert db.write_stats().stage_failed == 1
            why = write_fault(db.write_failures(), time.monotonic())
            assert why is not None and why.startswith("result image writes failing: disk full")
            images.full = False
            await db.call_staged((images, "image"), insert)
            assert db.write_failures() == []
            nursery.cancel_scope.cancel()
    finally:
        db.close()
