"""Dispute fixtures: one embedded chain per session, reverted after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .dispute_env import Env, make_env


@pytest.fixture(scope="session")
def _env() -> Env:
    return make_env()


@pytest.fixture
def env(_env: Env) -> Iterator[Env]:
    snap = _env.chain.snapshot()
    try:
        yield _env
    finally:
        _env.chain.revert(snap)
