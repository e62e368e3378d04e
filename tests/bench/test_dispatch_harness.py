"""A short run of the dispatch benchmark's in-process harness, free and paid, so the
benchmark keeps working against the dispatcher's public API (the full run: `python -m bench
dispatch`), and of its alternated comparison with another commit (`baseline_ab`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dispatch import baseline_ab
from bench.dispatch.baseline import run_baseline
from tests.bench._helpers import git_ok


@pytest.mark.parametrize("paid", [False, True], ids=["free", "paid"])
def test_baseline_harness_delivers_every_job(tmp_path: Path, paid: bool) -> None:
    result = run_baseline(2, 15, 4, tmp_path, paid=paid)
    assert result.jobs == 30 and result.seconds > 0
    assert result.matches > 0 and result.picks >= 30  # every job went through the router
    assert {"recover a receipt signer (EIP-712 digest + ECDSA recover + checksum)"} <= set(
        result.micro_us
    )
    # every receipt's image was stored by a staged group and its row committed by the writer
    disk = result.disk
    assert disk is not None and disk.staged == 30 and 1 <= disk.stages <= 30
    assert disk.writes >= 30 and 1 <= disk.groups <= disk.writes and disk.commit_s > 0


def test_alternated_baselines_of_two_trees_make_one_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not git_ok():
        pytest.skip("not a git checkout")
    baseline_ab.main(["--against", "HEAD", "--rounds", "2", "--jobs", "40", "--nodes", "4"])
    out = capsys.readouterr().out.splitlines()
    rounds = [line for line in out if line.startswith("round ")]
    assert len(rounds) == 2 and all("HEAD" in r and "this tree" in r for r in rounds)
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:5]]
        for cells in (line.split("|") for line in out if line.startswith("| "))
        if cells[1].strip() != "figure"
    }
    assert set(rows) == set(baseline_ab.FIGURES)
    for old, new, ratio in rows.values():  # HEAD's harness has every figure
        assert float(old.replace(",", "")) > 0 and float(new.replace(",", "")) > 0
        assert float(ratio) > 0


def test_a_bad_commit_stops_the_comparison_with_one_line() -> None:
    if not git_ok():
        pytest.skip("not a git checkout")
    with pytest.raises(SystemExit, match="git archive no-such-commit: "):
        baseline_ab.main(["--against", "no-such-commit", "--rounds", "1"])
