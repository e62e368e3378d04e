"""Season fixtures: one deployed in-process chain per session, reverted after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sogni_chain import connect
from tests.chain_rollback import rolled_back
from tests.settlement.settle_env import Net, make_net


@pytest.fixture(scope="session")
def _season_net() -> Net:
    return make_net("embedded", connect())


@pytest.fixture
def net(_season_net: Net) -> Iterator[Net]:
    with rolled_back(_season_net.chain):
        yield _season_net
