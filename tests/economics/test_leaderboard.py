"""Leaderboard points (seed 003) and seasons."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_app.quote import quote
from sogni_coordinator.cli import app
from sogni_coordinator.leaderboard import (
    artist_points_micro,
    leaderboard,
    worker_points_micro,
)
from sogni_coordinator.ledger import Ledger
from sogni_protocol.catalog import load_catalog, parse_catalog

M = 1_000_000
FREE_ARTIST, PAID_ARTIST = "0x" + "f" * 40, "0x" + "e" * 40
W1, W2 = "0x" + "1" * 40, "0x" + "2" * 40


def test_point_rules() -> None:
    assert worker_points_micro(free=10 * M, paid=0, sogni_as_spark=0) == M  # 1/10
    assert worker_points_micro(free=0, paid=2 * M, sogni_as_spark=3 * M) == 5 * M
    assert artist_points_micro(free=M, paid=0, sogni_as_spark=0) == M  # 1 per free Spark
    assert artist_points_micro(free=0, paid=M, sogni_as_spark=0) == 10 * M
    assert artist_points_micro(free=0, paid=0, sogni_as_spark=M) == 10 * M


def test_seasons() -> None:
    cat = parse_catalog({"seasons": {"first_start": "2025-01-06", "length_days": 42}})
    s2 = cat.season(2)
    assert s2.start == dt.datetime(2025, 2, 17, tzinfo=dt.UTC)
    assert s2.end - s2.start == dt.timedelta(weeks=6)
    assert cat.season_at(s2.start + dt.timedelta(days=1)).number == 2
    fixed = parse_catalog(
        {"seasons": {"fixed": [{"number": 7, "start": "2025-06-02", "end": "2025-07-14"}]}}
    )
    assert fixed.season(7).start.date() == dt.date(2025, 6, 2)


def _fill(path: Path, when: float) -> None:
    ledger = Ledger(path)
    ledger.claim_daily_boost(FREE_ARTIST, when)
    ledger.credit_purchase(PAID_ARTIST, 10)
    ledger.reserve("free", FREE_ARTIST, quote("sdxl-base-1.0", images=10))
    ledger.reserve("paid", PAID_ARTIST, quote("sdxl-base-1.0", images=10))
    for i in range(10):
        ledger.settle("free", M, W1, 3000, 0, now=when)
        ledger.settle("paid", M, W2, 3000, 0, now=when, job_id=f"p{i}")
    ledger.close()


def test_leaderboard_ranks(tmp_path: Path) -> None:
    season = load_catalog().season(3)
    _fill(tmp_path / "db", season.start.timestamp() + 60)
    ledger = Ledger(tmp_path / "db")
    workers = leaderboard(ledger, "workers", season)
    assert [(r.address, r.points) for r in workers] == [(W2, 10.0), (W1, 1.0)]
    artists = leaderboard(ledger, "artists", season)
    assert [(r.address, r.points) for r in artists] == [(PAID_ARTIST, 100.0), (FREE_ARTIST, 10.0)]
    assert leaderboard(ledger, "workers", load_catalog().season(4)) == []


def test_leaderboard_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "coordinator.db"
    season = load_catalog().season(2)
    _fill(db, season.start.timestamp() + 60)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\ndatabase = "{db}"\n')
    result = CliRunner().invoke(
        app, ["leaderboard", "artists", "--season", "2", "--json", "--config", str(cfg)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["season"] == 2 and data["rows"][0]["points"] == 100.0
