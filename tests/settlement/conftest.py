"""Settlement fixtures: a deployed chain per kind (once per session), reverted after each test.

Most tests run on the embedded EVM only (CPU is shared); the end-to-end close-and-claim and
the crash tests also run on anvil when its binary is installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from sogni_chain import connect
from sogni_chain.anvil import Anvil, find_anvil

from .settle_env import Net, make_net


@pytest.fixture(scope="session")
def _nets() -> dict[str, Net]:
    return {}


@pytest.fixture(scope="session")
def _anvil() -> Iterator[Anvil]:
    if find_anvil() is None:
        reason = "anvil binary not installed (npm ci --prefix contracts); anvil runs skipped"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    with Anvil() as node:
        yield node


def _net(kind: str, request: pytest.FixtureRequest, nets: dict[str, Net]) -> Iterator[Net]:
    if kind not in nets:
        if kind == "anvil":
            node: Anvil = request.getfixturevalue("_anvil")
            nets[kind] = make_net(kind, connect(node.url))
        else:
            nets[kind] = make_net(kind, connect())
    net = nets[kind]
    snap = net.chain.snapshot()
    try:
        yield net
    finally:
        net.chain.revert(snap)


@pytest.fixture
def net(request: pytest.FixtureRequest, _nets: dict[str, Net]) -> Iterator[Net]:
    """The embedded chain."""
    yield from _net("embedded", request, _nets)


@pytest.fixture(params=["embedded", "anvil"])
def any_net(request: pytest.FixtureRequest, _nets: dict[str, Net]) -> Iterator[Net]:
    """Embedded, then anvil."""
    yield from _net(request.param, request, _nets)
