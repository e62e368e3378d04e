"""`sogni-node bench` measures each installed model against its catalog baseline."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_node.benchmark import FAST_MIN_SPEED, saved_speed
from sogni_node.cli import app
from sogni_node.hardware import probe


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
    # `device = auto`: whatever this machine has. Only CUDA at reference speed is fast.
    assert report["device"] == probe().device
    fast = report["device"] == "cuda" and report["speed"] >= FAST_MIN_SPEED
    assert report["tier"] == ("fast" if fast else "relaxed")
    assert saved_speed(tmp_path / "bench.json") == report["speed"] > 0
    assert report.pop("savedTo") == str(tmp_path / "bench.json")  # it says where it saved
    assert json.loads((tmp_path / "bench.json").read_text()) == report


@pytest.mark.skipif(probe().device == "cpu", reason="the test above already ran on the CPU")
def test_bench_on_cpu_is_relaxed_whatever_its_speed(tmp_path: Path) -> None:
    """Pinned to the CPU (config `device = cpu`), even on a GPU machine: never the fast tier."""
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_THREADS": "1",
        "SOGNI_NODE_TEST_MODEL": "true",
        "SOGNI_NODE_DEVICE": "cpu",
    }
    result = CliRunner().invoke(app, ["bench", "--runs", "1", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["tier"] == "relaxed"
