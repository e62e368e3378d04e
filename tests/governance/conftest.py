"""Governance fixtures: one embedded chain with the contracts and governance deployed once per
session, reverted to a snapshot after each test (deploying takes seconds on py-evm)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sogni_chain import connect
from tests.chain_rollback import rolled_back

from .gov_env import GovNet, make_gov_net


@pytest.fixture(scope="session")
def _gov_nets() -> dict[str, GovNet]:
    return {}


@pytest.fixture
def gnet(_gov_nets: dict[str, GovNet]) -> Iterator[GovNet]:
    if "embedded" not in _gov_nets:
        _gov_nets["embedded"] = make_gov_net(connect())
    g = _gov_nets["embedded"]
    with rolled_back(g.chain):
        yield g
