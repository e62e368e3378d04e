"""Two messages a newcomer reads literally: `chain deploy` without a chain url says its
contracts vanish and how to deploy to anvil instead; `leaderboard --help` describes --catalog
in full (rich markup once ate its `[seasons]`)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sogni_coordinator.cli import app

runner = CliRunner()


def test_an_embedded_deploy_says_the_contracts_vanish_and_how_to_keep_them(
    tmp_path: Path,
) -> None:
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_LOG_LEVEL": "error",
        "SOGNI_COORDINATOR_CHAIN_URL": None,
        "SOGNI_COORDINATOR_CONFIG": None,
    }
    result = runner.invoke(app, ["chain", "deploy"], env=env)
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())
    assert "vanished when it exited" in warning
    assert "`anvil`" in warning and "--chain-url http://127.0.0.1:8545" in warning


def test_the_catalog_option_help_reads_in_full() -> None:
    result = runner.invoke(app, ["leaderboard", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Catalog TOML whose seasons table dates the seasons" in text
    assert "with (default" not in text and "configs/catalog.toml" in text
