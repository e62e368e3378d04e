"""Versioned schema migrations: a database of the release before versioning opens and
migrates with its data, a failed migration changes nothing, a newer database is refused."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import msgspec
import pytest

from sogni_coordinator.db import Database, SchemaTooNew, schema_version
from sogni_coordinator.job_state import JobState
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.store import MIGRATIONS, Store
from sogni_protocol.messages import JobParams, Receipt

# Frozen copy of the previous release's SQL (sogni_coordinator/store.py before versioning).
OLD_STORE_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS epochs (
    epoch         INTEGER PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('planned', 'posted')),
    root          BLOB NOT NULL,
    total         TEXT NOT NULL,
    receipts_hash BLOB NOT NULL,
    plan          BLOB NOT NULL,
    planned_at    REAL NOT NULL,
    posted_at     REAL,
    tx_hash       TEXT
);
CREATE TABLE IF NOT EXISTS settled_receipts (
    job_id       BLOB PRIMARY KEY REFERENCES receipts(job_id),
    epoch        INTEGER REFERENCES epochs(epoch),
    status       TEXT NOT NULL CHECK (status IN ('paid', 'refused')),
    detail       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS settled_receipts_epoch ON settled_receipts(epoch);
"""

OLD_REPUTATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS reputation (
    wallet TEXT PRIMARY KEY,
    speed REAL NOT NULL, success REAL NOT NULL, acceptance REAL NOT NULL,
    jobs INTEGER NOT NULL, failures INTEGER NOT NULL, strikes TEXT NOT NULL,
    first_seen REAL NOT NULL, connected_seconds REAL NOT NULL,
    blacklisted_until REAL NOT NULL, earned_units INTEGER NOT NULL
);
"""
WALLET = "0x" + "ab" * 20
PARAMS = JobParams(
    model_id="m", positive_prompt="p", steps=4, guidance=1.0, width=64, height=64, seed=1
)


def _old_database(path: Path) -> list[bytes]:
    """What the previous release left: a request, three jobs (queued, done, failed), the done
    one's receipt, a reputation row, `user_version` 1. Returns the job ids."""
    db = sqlite3.connect(path)
    db.executescript(OLD_STORE_SCHEMA + OLD_REPUTATION_SCHEMA)
    db.execute("PRAGMA user_version=1")
    rid, jobs = b"r" * 32, [bytes([i]) * 32 for i in range(3)]
    db.execute("INSERT INTO requests VALUES (?, 'm', 3, 'fast', 'spark', 'peer', 1.0)", (rid,))
    for i, (job_id, state) in enumerate(zip(jobs, ("queued", "done", "failed"), strict=True)):
        db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, 100, ?, ?, 1.0)",
            (job_id, rid, i, msgspec.msgpack.encode(PARAMS), state, i + 1),
        )
    receipt = Receipt(
        job_id=jobs[1],
        offer_hash=b"o" * 32,
        worker=WALLET,
        coordinator=WALLET,
        model_id="m",
        result_hash=hashlib.sha256(b"img").digest(),
        steps_done=4,
        work_units=100,
        completed_at=1,
    )
    db.execute(
        "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, 4, 100, 1, ?, ?, 1.0)",
        (
            jobs[1],
            rid,
            WALLET,
            b"o" * 32,
            receipt.result_hash,
            msgspec.msgpack.encode(receipt),
            b"s" * 65,
        ),
    )
    db.execute(
        "INSERT INTO reputation VALUES (?, 1.5, 0.9, 1.0, 7, 1, '', 1.0, 10.0, 0.0, 700)",
        (WALLET,),
    )
    db.commit()
    db.close()
    return jobs


def test_a_database_of_the_previous_release_migrates_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    queued, done, failed = _old_database(path)
    store = Store(path)
    ledger = Ledger(path)
    reputation = Reputation(path)
    try:
        assert (store.schema_version, ledger.schema_version, reputation.schema_version) == (
            len(MIGRATIONS),
            5,  # + the payer's authorization evidence, referrals, stake discount, entries by tx
            2,  # + work_rate, for bounding partial pay
        )
        (live,) = store.live_jobs()
        assert (live.job_id, live.state, live.attempts, live.params) == (
            queued,
            JobState.QUEUED,
            1,
            PARAMS,
        )
        assert store.job_state(done) is JobState.DONE
        assert store.job_state(failed) is JobState.FAILED
        (kept,) = store.receipts()
        assert kept.receipt.job_id == done and kept.signature == b"s" * 65
        assert reputation.get(WALLET).jobs == 7 and reputation.get(WALLET).earned_units == 700
        assert reputation.get(WALLET).work_rate == 0  # not measured yet: the newcomer bound
        # the new states are accepted now, and ended jobs stay ended
        store.save_job_states([(queued, JobState.CANCELLING, 1), (done, JobState.FAILED, 0)])
        assert store.job_state(queued) is JobState.CANCELLING
        assert store.job_state(done) is JobState.DONE
        assert store.store_receipt(kept.receipt, kept.signature, kept.request_id) is False
    finally:
        store.close()
        ledger.close()
        reputation.close()
    db = sqlite3.connect(path)
    versions = dict(db.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions == {"store": len(MIGRATIONS), "ledger": 5, "reputation": 2}
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    # the old plaintext parameters: sealed for the live job, dropped for the ended ones
    plain = msgspec.msgpack.encode(PARAMS)
    rows = dict(db.execute("SELECT job_id, params FROM jobs").fetchall())
    assert all(plain not in bytes(blob) for blob in rows.values())
    assert rows[done] == b"" and rows[failed] == b"" and len(rows[queued]) > len(plain)
    assert db.execute("SELECT SUM(delivered) FROM jobs").fetchone()[0] == 3  # old: delivered
    db.close()
    Store(path).close()  # opening again migrates nothing


def test_a_newer_database_is_refused_naming_both_versions(database: str) -> None:
    """On each engine (tests/conftest.py's `database`)."""
    store = Store(database)
    newer = len(MIGRATIONS) + 1
    with store._tx() as db:
        db.execute(f"UPDATE schema_versions SET version={newer} WHERE component='store'")
    store.close()
    with pytest.raises(SchemaTooNew) as info:
        Store(database)
    assert f"store schema is version {newer}" in str(info.value)
    assert f"this code's version {len(MIGRATIONS)}" in str(info.value)
    Ledger(database).close()  # the other components are unaffected


class _Broken(Database):
    def __init__(self, path: Path | str, migrations: tuple[str, ...]) -> None:
        super().__init__(path, component="broken", migrations=migrations)


def test_a_failed_migration_leaves_the_previous_version(database: str) -> None:
    v1 = "CREATE TABLE a (x INTEGER)"
    _Broken(database, (v1,)).close()
    with pytest.raises(sqlite3.OperationalError):
        _Broken(database, (v1, "CREATE TABLE b (y INTEGER); INSERT INTO nope VALUES (1)"))
    again = _Broken(database, (v1,))
    try:
        assert again.schema_version == 1
        with again._lock:
            assert schema_version(again._db, "broken") == 1
            assert again._has_table("a") and not again._has_table("b")  # all of 2 rolled back
    finally:
        again.close()
