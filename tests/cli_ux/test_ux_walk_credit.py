"""`sogni-coordinator credit ACCOUNT AMOUNT` parses its amount like `stake` does
(`cli_errors.parse_amount`): a negative, non-finite or too-precise amount is one line
(exit 2), and a decimal one is credited exactly (the ledger counts micro units)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from tests.cli_ux.one_line import one_line

runner = CliRunner()
PAYER = "0x1111111111111111111111111111111111111111"


@pytest.mark.parametrize(
    ("amount", "what"),
    [
        ("-5", "amount must be positive, not '-5'"),
        ("0", "amount must be positive, not '0'"),
        ("inf", "not an amount of Spark: 'inf'"),
        ("nan", "not an amount of Spark: 'nan'"),
        ("abc", "not an amount of Spark: 'abc'"),
        ("0.0000001", "amount '0.0000001' has more than 6 decimals"),
        ("1e30", "not an amount of Spark: '1e30' is more than the ledger holds"),
    ],
)
def test_credit_refuses_a_bad_amount_in_one_line(amount: str, what: str) -> None:
    line = one_line(runner.invoke(coordinator_app, ["credit", PAYER, amount]), 2)
    assert line.startswith(f"error: {what}"), line


def test_credit_takes_decimals(tmp_path: Path) -> None:
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
        "SOGNI_DEBUG": None,
    }
    spark = runner.invoke(coordinator_app, ["credit", PAYER, "2.5"], env=env)
    assert spark.exit_code == 0, spark.output
    assert json.loads(spark.stdout)["balance"]["spark_paid"] == 2_500_000
    sogni = runner.invoke(coordinator_app, ["credit", PAYER, "0.25", "--sogni"], env=env)
    assert sogni.exit_code == 0, sogni.output
    assert json.loads(sogni.stdout)["balance"]["sogni"] == 250_000
    line = one_line(runner.invoke(coordinator_app, ["credit", PAYER, "-1", "--sogni"]), 2)
    assert "amount must be positive" in line and "SOGNI" in line
