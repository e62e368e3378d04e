"""The gateway's project records (real SQLite file): one row per (key, jobID), sealed tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.key_projects import ImageOutcome, KeyProjects, seal_token


def test_a_project_is_recorded_once_and_survives_reopening(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.sqlite"
    records = KeyProjects(db)
    try:
        assert records.begin("key_a", "JOB", ["I0", "I1"], now=100.0)
        assert not records.begin("key_a", "JOB", ["X", "Y"], now=101.0)  # never twice
        assert records.begin("key_b", "JOB", ["J0"], now=100.0)  # another key's own project
        assert records.in_flight("key_a") == []  # not accepted yet
        records.accepted("key_a", "JOB", b"r" * 32, b"s" * 32)
        records.record_outcome("key_a", "JOB", 0, ImageOutcome(True, seed=7, steps=4))
        records.record_outcome("key_a", "JOB", 0, ImageOutcome(False, error="late copy"))
    finally:
        records.close()
    records = KeyProjects(db)  # a restart
    try:
        got = records.get("key_a", "JOB")
        assert got is not None and got.img_ids == ["I0", "I1"]
        assert (got.request_id, got.token_sealed) == (b"r" * 32, b"s" * 32)
        assert got.outcomes == {0: ImageOutcome(True, seed=7, steps=4)}  # the first wins
        assert records.in_flight("key_a") == ["JOB"] and records.in_flight("key_c") == []
        records.cancel("key_a", "JOB")
        assert records.in_flight("key_a") == []
        cancelled = records.get("key_a", "JOB")
        assert cancelled is not None and cancelled.cancelled

        records.ended("key_b", "JOB", at=150.0)
        assert records.prune(retention=60, now=200.0) == 1  # key_a's, cancelled: 100 < 140
        assert records.get("key_a", "JOB") is None and records.get("key_b", "JOB") is not None
        assert records.prune(retention=60, now=211.0) == 1
        records.forget("key_b", "JOB")
        assert records.begin("key_a", "JOB", ["I0"])  # the jobID is free again
    finally:
        records.close()


def test_resume_tokens_are_sealed_with_the_api_key(tmp_path: Path) -> None:
    token, request = os.urandom(32), os.urandom(32)
    sealed = seal_token(token, "sk-sogni-one", request)
    assert sealed != token and seal_token(sealed, "sk-sogni-one", request) == token
    # the database alone, or another key, or another request: not the token
    assert seal_token(sealed, "sk-sogni-two", request) != token
    assert seal_token(sealed, "sk-sogni-one", os.urandom(32)) != token
    with pytest.raises(ValueError):
        seal_token(b"short", "sk-sogni-one", request)


def test_the_key_store_opens_and_closes_the_project_records(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "coordinator.sqlite")
    try:
        assert keys.projects.begin("key_a", "JOB", ["I0"])
    finally:
        keys.close()
    keys = ApiKeys(tmp_path / "coordinator.sqlite")
    try:
        assert keys.projects.get("key_a", "JOB") is not None
    finally:
        keys.close()


def test_a_project_still_in_flight_is_not_pruned_at_the_retention(tmp_path: Path) -> None:
    """A project running longer than `retention_seconds` (a long queue, a slow network) was
    deleted: an SDK re-sending its jobRequest after a reconnect then passed `begin` and was
    submitted and charged a second time."""
    from sogni_coordinator.key_projects import IN_FLIGHT_KEEP

    records = KeyProjects(tmp_path / "coordinator.sqlite")
    try:
        assert records.begin("key", "RUNNING", ["I0"], now=100.0)
        records.accepted("key", "RUNNING", b"r" * 32, b"s" * 32)
        assert records.begin("key", "NEVER", ["I0"], now=100.0)  # not accepted (a crash)
        assert records.prune(retention=60, now=1000.0) == 1  # only the one never accepted
        assert not records.begin("key", "RUNNING", ["I0"], now=1001.0)  # a re-send: refused
        assert records.prune(retention=60, now=100.0 + IN_FLIGHT_KEEP + 1) == 1
    finally:
        records.close()
