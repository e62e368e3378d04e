"""Governance fixtures: one embedded chain with the contracts and governance deployed once per
session, reverted to a snapshot after each test (deploying takes seconds on py-evm)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sogni_chain import connect
from sogni_coordinator.store import Store

from .gov_env import GovNet, make_gov_net


@pytest.fixture(scope="session")
def _gov_nets() -> dict[str, GovNet]:
    return {}


@pytest.fixture
def gnet(_gov_nets: dict[str, GovNet]) -> Iterator[GovNet]:
    if "embedded" not in _gov_nets:
        _gov_nets["embedded"] = make_gov_net(connect())
    g = _gov_nets["embedded"]
    snap = g.chain.snapshot()
    try:
        yield g
    finally:
        g.chain.revert(snap)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "coordinator.db")
    try:
        yield s
    finally:
        s.close()
