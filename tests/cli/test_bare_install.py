"""A bare install (`pip install sogni-supernet`: no torch, diffusers, web3, EVM).

Each check runs in a fresh interpreter whose first meta-path finder refuses those modules, as
if they were not installed: `sogni-node` and `sogni-coordinator` must name their extra in one
line and exit 4; the client (`sogni_app.api`, `sogni --help`) must work and import none of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "diffusers", "web3", "eth_tester", "evm", "eth")  # py-evm imports as `eth`

_PRELUDE = f"""
import importlib.abc, json, sys

BLOCKED = {BLOCKED!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())


def loaded():
    return sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)


def call(main, *argv):
    sys.argv = ["prog", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _PRELUDE + body],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "command", "extra"),
    [
        ("sogni_node.__main__", "sogni-node", "node"),
        ("sogni_coordinator.__main__", "sogni-coordinator", "coordinator"),
    ],
)
def test_daemons_name_their_extra(module: str, command: str, extra: str) -> None:
    done = _run(
        f"from {module} import main\n"
        "code = call(main, 'start')\n"
        "print(json.dumps({'code': code, 'loaded': loaded()}))\n"
    )
    assert json.loads(done.stdout) == {"code": 4, "loaded": []}, done.stderr
    assert done.stderr == (
        f"error: {command} needs the {extra} extra (pip install 'sogni-supernet[{extra}]')\n"
    )


def test_client_api_and_help_need_no_torch_or_web3() -> None:
    done = _run(
        "import sogni_app.api\n"
        "from sogni_app.cli import main\n"
        "code = call(main, '--help')\n"
        "print(json.dumps({'code': code, 'loaded': loaded()}))\n"
    )
    last = done.stdout.strip().splitlines()[-1]
    assert json.loads(last) == {"code": 0, "loaded": []}, done.stderr
    assert "render" in done.stdout and "quote" in done.stdout


def test_entry_points_run_through_the_layer() -> None:
    """pyproject's scripts are the `main` functions that check extras and map errors."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "sogni-node": "sogni_node.__main__:main",
        "sogni-coordinator": "sogni_coordinator.__main__:main",
        "sogni": "sogni_app.cli:main",
    }
