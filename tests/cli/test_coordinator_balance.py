"""`sogni-coordinator balance`: an address is checked like `credit` checks it; readable by
default, JSON with --json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app

runner = CliRunner()


def test_balance_refuses_a_non_address_and_prints_readable_or_json(tmp_path: Path) -> None:
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_LOG_LEVEL": "warning"}
    bad = runner.invoke(coordinator_app, ["balance", "nothex"], env=env)
    assert bad.exit_code == 2 and "'nothex' is not an Ethereum address" in bad.output
    payer = "0x" + "ab" * 20
    assert runner.invoke(coordinator_app, ["credit", payer, "3"], env=env).exit_code == 0
    text = runner.invoke(coordinator_app, ["balance", payer], env=env).stdout
    assert "paid Spark  3.000000" in text
    data = json.loads(runner.invoke(coordinator_app, ["balance", payer, "--json"], env=env).stdout)
    assert data["balance"]["spark_paid"] == 3_000_000
