"""`sogni-coordinator season close N`: refusals are one clear line (the close itself is
tested through `SeasonCloser` in test_airdrop.py and test_season_end_to_end.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from typer.testing import CliRunner

from sogni_coordinator.cli import app
from sogni_protocol.catalog import load_catalog


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n')
    result = CliRunner().invoke(app, ["season", "close", *args, "--config", str(cfg)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_refused_before_the_season_ends(tmp_path: Path) -> None:
    current = load_catalog().season_at(dt.datetime.now(dt.UTC)).number
    code, out = _run(tmp_path, str(current))
    assert code == 3 and f"season {current} ends at" in out and "after it ends" in out


def test_an_ended_season_needs_a_shared_chain(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "1")
    assert code == 2 and "needs a shared chain" in out


def test_a_season_that_does_not_exist(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "0")
    assert code == 2 and "season" in out.lower()
