"""The committed artifacts are what the pinned compiler makes of the sources."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sogni_chain import CONTRACT_NAMES, load_artifact

REPO = Path(__file__).resolve().parents[2]


def test_artifacts_are_complete_and_target_cancun() -> None:
    for name in CONTRACT_NAMES:
        art = load_artifact(name)
        assert art.bytecode.startswith("0x") and len(art.deployed_bytecode) > 1000
        assert art.compiler["evmVersion"] == "cancun"
        assert art.compiler["optimizer"] == {"enabled": True, "runs": 200}
        assert art.compiler["solc"].startswith("0.8.")
        assert art.compiler["openzeppelin"].startswith("5.")
        assert any(item.get("type") == "constructor" for item in art.abi)
    dist = {i.get("name") for i in load_artifact("RewardDistributor").abi}
    assert {"postRoot", "claim", "eip712Domain", "pause", "NothingToClaim"} <= dist


def test_committed_artifacts_match_a_fresh_build() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot rebuild the contracts")
    assert (REPO / "contracts" / "node_modules" / "solc").is_dir(), (
        "run `npm ci --prefix contracts` to install the pinned solc"
    )
    out = subprocess.run(
        [node, "contracts/build.mjs", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr + out.stdout
