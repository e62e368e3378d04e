"""Chain test fixtures: every chain test runs on the embedded EVM and on anvil.

Deployment is done once per chain per session; each test runs between a snapshot and a revert,
so tests stay independent without redeploying (py-evm deploys take about a second).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from sogni_chain import connect
from sogni_chain.anvil import Anvil

from .chain_env import CHAINS, Env, anvil_missing_reason, make_env


@pytest.fixture(scope="session")
def anvil_node() -> Iterator[Anvil]:
    reason = anvil_missing_reason()
    if reason:
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    with Anvil() as node:
        yield node


@pytest.fixture(scope="session")
def _envs() -> dict[str, Env]:
    return {}


@pytest.fixture(params=CHAINS)
def env(request: pytest.FixtureRequest, _envs: dict[str, Env]) -> Iterator[Env]:
    kind: str = request.param
    if kind not in _envs:
        if kind == "anvil":
            node: Anvil = request.getfixturevalue("anvil_node")
            chain = connect(node.url)
        else:
            chain = connect("embedded")
        _envs[kind] = make_env(kind, chain)
    current = _envs[kind]
    snap = current.chain.snapshot()
    try:
        yield current
    finally:
        current.chain.revert(snap)
