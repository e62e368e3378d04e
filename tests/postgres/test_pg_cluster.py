"""The throwaway PostgreSQL server the project starts itself (`sogni_devnet.pg_cluster`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.queue_leases import measure
from sogni_coordinator.queue import QueueError, open_queue
from sogni_coordinator.queue.postgres import redact
from sogni_devnet.pg_cluster import (
    REQUIRE_ENV,
    PgCluster,
    main,
    missing_reason,
    reap_orphans,
    start_cluster,
)


def test_the_session_server_listens_on_loopback_with_test_settings(pg_server: PgCluster) -> None:
    assert pg_server.ready()
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync',"
                " 'synchronous_commit', 'listen_addresses', 'unix_socket_directories')"
            ).fetchall()
        )
    assert settings["fsync"] == "off" and settings["synchronous_commit"] == "off"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == str(pg_server.socket_dir)
    assert pg_server.socket_dir.is_relative_to(pg_server.root)
    if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres
        assert pg_server.data.stat().st_uid != 0


def test_each_test_gets_a_database_of_its_own(pg_server: PgCluster, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mine (x INTEGER)")
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None and name[0] != "postgres"
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        missing = conn.execute("SELECT to_regclass('public.mine')").fetchone()
    assert missing == (None,)


def test_cli_starts_and_stops_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sogni-pg-cli-")) / "pg"
    folder.parent.chmod(0o755)  # reachable by the postgres user
    assert main(["start", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    url = next(line[4:] for line in out.splitlines() if line.startswith("url="))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert main(["start", "--dir", str(folder)]) == 1  # refuses a folder in use
        assert "already holds a cluster" in capsys.readouterr().err
    finally:
        assert main(["stop", "--dir", str(folder)]) == 0
    assert not folder.exists()
    folder.parent.rmdir()
    assert main(["stop", "--dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the folder to postgres")
def test_a_folder_postgres_cannot_reach_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.chmod(0o700)
    assert main(["start", "--dir", str(tmp_path / "pg")]) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Traceback" not in err


async def test_queue_refuses_an_unreachable_server_naming_it_without_password(
    pg_server: PgCluster,
) -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{pg_server.port}/no_such_db"
    with pytest.raises(QueueError) as caught:
        await open_queue(url)
    message = str(caught.value)
    assert "no_such_db" in message and "hunter2" not in message
    assert redact(url) == f"postgresql://postgres:***@127.0.0.1:{pg_server.port}/no_such_db"


def test_missing_binaries_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOGNI_PG_BINDIR", str(tmp_path))
    reason = missing_reason()
    assert reason is not None and str(tmp_path) in reason


def test_missing_binaries_fail_instead_of_skipping_under_the_ci_switch(tmp_path: Path) -> None:
    env = dict(os.environ, SOGNI_PG_BINDIR=str(tmp_path), **{REQUIRE_ENV: "1"})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"tests/postgres/{Path(__file__).name}::test_each_test_gets_a_database_of_its_own",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "1 error" in done.stdout, done.stdout[-2000:]
    assert "PostgreSQL binaries (initdb, pg_ctl, postgres) not found" in done.stdout


def test_leaser_processes_share_the_queue_without_taking_a_job_twice(pg_url: str) -> None:
    """Three coordinator processes (own interpreter, own connections) on one database: the
    benchmark's worker, which fails if any job is leased twice or left behind."""
    rate, twice = measure(pg_url, leasers=3, jobs=150, complete=True)
    assert twice == 0 and rate > 0


async def test_psycopg_never_runs_on_the_trio_thread(pg_url: str) -> None:
    from sogni_coordinator.queue import NewJob
    from sogni_coordinator.queue.postgres import PostgresQueue

    q = await PostgresQueue.open(pg_url)
    trio_thread = threading.get_ident()
    threads: list[int] = []
    real = q._conn

    class Spy:
        def __getattr__(self, name: str) -> Any:
            threads.append(threading.get_ident())
            return getattr(real, name)

    q._conn = Spy()  # type: ignore[assignment]
    try:
        await q.enqueue([NewJob(b"job", b"req", b"params")])
        [lease] = await q.lease("coord-a", 1, 60)
        await q.renew(lease, 60)
        await q.complete(b"job", b"receipt", "coord-a")
        await q.counts()
    finally:
        q._conn = real
        await q.aclose()
    assert threads and trio_thread not in threads


def test_a_server_whose_test_process_died_is_reaped() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sogni-reap-"))
    parent.chmod(0o755)
    try:
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid that no longer runs: the "killed test run"
        orphan = start_cluster(parent / "sogni-pg-orphan", owner_pid=gone.pid)
        live = PgCluster(
            parent / "sogni-pg-live", port=1, bindir=orphan.bindir, owner_pid=os.getpid()
        )
        live.root.mkdir()
        live.save()
        assert orphan.ready()
        assert reap_orphans(parent) == [orphan.root]
        assert not orphan.root.exists() and not orphan.ready()
        assert live.root.exists()  # its owner runs: left alone
    finally:
        shutil.rmtree(parent, ignore_errors=True)
