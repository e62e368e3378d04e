"""Season fixtures: one deployed in-process chain per session, reverted after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sogni_chain import connect
from sogni_coordinator.store import Store
from tests.settlement.settle_env import Net, make_net


@pytest.fixture(scope="session")
def _season_net() -> Net:
    return make_net("embedded", connect())


@pytest.fixture
def net(_season_net: Net) -> Iterator[Net]:
    snap = _season_net.chain.snapshot()
    try:
        yield _season_net
    finally:
        _season_net.chain.revert(snap)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "coordinator.db")
    try:
        yield s
    finally:
        s.close()
