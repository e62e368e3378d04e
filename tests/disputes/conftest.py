"""Dispute fixtures: one embedded chain per session, reverted after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chain_rollback import rolled_back

from .dispute_env import Env, make_env


@pytest.fixture(scope="session")
def _env() -> Env:
    return make_env()


@pytest.fixture
def env(_env: Env) -> Iterator[Env]:
    with rolled_back(_env.chain):
        yield _env
