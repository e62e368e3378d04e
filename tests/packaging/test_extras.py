"""The distribution's extras: the bare install is a client (no torch, no EVM); each daemon's
extra brings what it imports. Read from pyproject.toml, the file pip installs from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "diffusers", "transformers", "web3", "eth-tester", "py-evm", "coremltools"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]


def _names(requirements: list[str], extras: dict[str, list[str]]) -> set[str]:
    """Distribution names, following self-references like `sogni-supernet[chain,http]`."""
    out: set[str] = set()
    for req in requirements:
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]+)\])?", req)
        assert m, req
        name, inner = m.group(1).lower(), m.group(2)
        if name == "sogni-supernet":
            for extra in (inner or "").split(","):
                out |= _names(extras[extra.strip()], extras)
        else:
            out.add(name)
    return out


def test_bare_install_is_a_client_without_torch_or_an_evm() -> None:
    project = _project()
    base = _names(project["dependencies"], project["optional-dependencies"])
    assert not base & HEAVY, f"the bare install pulls {sorted(base & HEAVY)}"
    assert {"libp2p", "msgspec", "trio", "eth-account", "typer"} <= base


def test_each_daemon_extra_brings_what_it_imports() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    node = _names(extras["node"], extras)
    coordinator = _names(extras["coordinator"], extras)
    assert {"torch", "diffusers", "transformers", "web3", "hypercorn", "starlette"} <= node
    assert {"web3", "eth-tester", "py-evm", "hypercorn", "starlette"} <= coordinator
    assert not coordinator & {"torch", "diffusers"}


def test_make_install_installs_every_extra() -> None:
    makefile = (ROOT / "Makefile").read_text("utf-8")
    m = re.search(r"pip install -q -e '\.\[([^\]]+)\]'", makefile)
    assert m, "make install no longer installs the project with its extras"
    assert set(m.group(1).split(",")) >= {"node", "coordinator", "dev"}


def test_every_package_is_in_the_distribution() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    packages.discard("bench")
    assert {f"{p}*" for p in packages} <= set(include), "a package is missing from the wheel"
    assert "sogni_client*" not in include  # the official Sogni SDK's import name
