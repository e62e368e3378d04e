"""A short run of the dispatch benchmark's in-process harness, free and paid, so the
benchmark keeps working against the dispatcher's public API (the full run: `python -m bench
dispatch`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dispatch.baseline import run_baseline


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
