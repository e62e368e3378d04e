"""`sogni-node bench` measures each installed model against its catalog baseline."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_node.benchmark import saved_speed
from sogni_node.cli import app


def test_bench_measures_saves_and_names_the_tier(tmp_path: Path) -> None:
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_THREADS": "1",
        "SOGNI_NODE_TEST_MODEL": "true",
    }
    result = CliRunner().invoke(app, ["bench", "--runs", "1", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tiny = next(m for m in report["models"] if m["model_id"] == "sogni-tiny-sd")
    assert tiny["measured_seconds"] > 0 and tiny["baseline_seconds"] > 0
    expected = tiny["baseline_seconds"] / tiny["measured_seconds"]  # of the rounded figures
    assert tiny["speed"] == pytest.approx(expected, rel=0.01)
    assert report["device"] == "cpu" and report["tier"] == "relaxed"  # no CUDA here
    assert saved_speed(tmp_path / "bench.json") == report["speed"] > 0
