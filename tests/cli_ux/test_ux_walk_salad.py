"""`deploy/salad/build.py` checks the node's settings with the node's own config checks
before anything is deployed (a bad coordinator or payout address used to be refused only by
every replica at start), and a missing `--keystore` is one line naming the path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "salad" / "build.py"
GOOD = {
    "SOGNI_NODE_IMAGE": "ghcr.io/example/sogni-node:0.1.0",
    "SOGNI_NODE_COORDINATORS": (
        "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
    ),
    "SOGNI_NODE_TRUSTED_COORDINATORS": "0x" + "11" * 20,
    "SOGNI_NODE_PAYOUT_ADDRESS": "0x" + "22" * 20,
    "SALAD_GPU_CLASS": "ed563892-aacd-40f5-80b7-90c9be6c759b",
}


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("salad_build_walk", BUILD)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env},
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("SOGNI_NODE_COORDINATORS", "/ip4/1.2.3.4/tcp/4001/p2p/bad", "is not a multiaddr"),
        ("SOGNI_NODE_PAYOUT_ADDRESS", "0xdead", "SOGNI_NODE_PAYOUT_ADDRESS: expected an Ethereum"),
        ("SOGNI_NODE_TRUSTED_COORDINATORS", "nobody", "SOGNI_NODE_TRUSTED_COORDINATORS"),
    ],
)
def test_salad_build_refuses_what_the_node_would_refuse_at_start(
    key: str, value: str, said: str
) -> None:
    salad = _builder()
    with pytest.raises(salad.BuildError, match=said):
        salad.build({**GOOD, key: value})
    proc = _run({**GOOD, key: value})
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert _run(GOOD).returncode == 0  # and the good values build


def test_salad_build_with_a_missing_keystore_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    proc = _run(GOOD, "--keystore", str(missing))
    assert proc.returncode == 4
    assert proc.stderr == (
        f"error: no keystore at {missing}; create one with `sogni-node keys create`\n"
    )
    assert "Errno" not in proc.stderr
