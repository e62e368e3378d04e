"""`make demo-cluster` as a user runs it: 3 coordinators on one real PostgreSQL, 4 nodes, the
first coordinator SIGKILLed mid-run; all 24 images arrive exactly once and every receipt in
`out-cluster/receipts.jsonl` verifies with eth-account."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sogni_devnet.demo_cluster import verify_receipts
from sogni_devnet.pg_cluster import REQUIRE_ENV, missing_reason


def test_the_cluster_demo_delivers_every_image_once_with_a_coordinator_killed(
    tmp_path: Path,
) -> None:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
        pytest.skip(reason)
    out = tmp_path / "out-cluster"
    cache = Path(os.environ.get("SOGNI_CACHE", ".cache")).resolve()
    proc = subprocess.run(
        [sys.executable, "-m", "sogni_devnet.demo_cluster", "--images", "24", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=420,  # the demo's own deadline (150 s) stops it first, processes and all
        cwd=tmp_path,
        env={**os.environ, "SOGNI_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "SIGKILL coordinator0 after " in proc.stdout
    assert "resumed: client0 at " in proc.stdout  # its client moved to another coordinator
    assert "24 of 24 images delivered, 0 duplicates, " in proc.stdout
    assert "every receipt verifies: yes" in proc.stdout
    lines, problems = verify_receipts(out)
    assert problems == []
    assert len(lines) == 24 and len({line["message"]["jobId"] for line in lines}) == 24
    signers = {line["message"]["coordinator"] for line in lines}
    assert 2 <= len(signers) <= 3  # the survivors at least; the killed one if it got that far
    assert "Traceback" not in proc.stdout + proc.stderr
