"""`python -m bench --json`: the last line of stdout is one JSON object with every headline
key (null when its section did not run); `--against` refuses a bad commit before measuring
and measures another commit's settlement figures from its own exported tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import _metrics
from tests.bench._helpers import REPO, git_ok


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_last_line_is_the_json_object_with_every_key() -> None:
    proc = _bench("governance", "--quick", "--no-write", "--json")  # the cheapest section
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    line = json.loads(last)
    assert list(line)[: len(_metrics.KEYS)] == list(_metrics.KEYS)
    assert all(line[k] is None for k in _metrics.KEYS)  # governance measures none of them
    assert set(line["section_s"]) == {"governance"} and line["elapsed_s"] > 0
    assert "## Governance gas" in proc.stdout  # the section itself still prints above it


def test_a_bad_against_commit_is_one_line_and_nothing_runs() -> None:
    if not git_ok():
        pytest.skip("not a git checkout")
    proc = _bench("governance", "--no-write", "--json", "--against", "no-such-commit")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"bench: --against no-such-commit: not a commit in {REPO}"


def test_against_measures_the_other_tree_and_the_line_carries_both() -> None:
    if not git_ok():
        pytest.skip("not a git checkout")
    old = _metrics.run_against(REPO, "HEAD", ["settlement", "governance"], quick=True)
    assert set(old) == set(_metrics.KEYS)
    gas = [old[k] for k in ("post_root_gas_first", "post_root_gas_next", "claim_gas_cold")]
    assert all(isinstance(g, float) and 21_000 < g < 500_000 for g in gas), old
    assert old["receipts_verified_per_s"] and old["merkle_100k_s"]
    assert old["overhead_ms"] is None and old["dispatch_jobs_per_s"] is None  # not run
    new = {**old, "claim_gas_warm": 1.0}
    table = _metrics.comparison_markdown(old, new, "HEAD")
    assert "| `claim_gas_warm` |" in table and "| `overhead_ms` |" not in table
    line = json.loads(_metrics.json_line(new, {"against_commit": "HEAD", "against": old}))
    assert line["claim_gas_warm"] == 1.0 and line["against"] == old
    assert json.loads(_metrics.json_line({"overhead_ms": float("nan")}))["overhead_ms"] is None
