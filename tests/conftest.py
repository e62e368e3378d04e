"""Tests call `configure_logging` (directly or via the `sogni*` CLIs in-process); undo it after
each test so every test sees the logging setup it expects."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog

if TYPE_CHECKING:
    from sogni_coordinator.store import Store


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours = {name: logging.getLogger(name).level for name in ("sogni_node", "sogni_coordinator")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in ours.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The session's real PostgreSQL (`sogni_devnet.pg_cluster`); skipped only when the
    binaries are absent, a failure then under SOGNI_REQUIRE_POSTGRES=1 (CI)."""
    from sogni_devnet.pg_cluster import (
        REQUIRE_ENV,
        missing_reason,
        release_shared_cluster,
        shared_cluster,
    )

    reason = missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
        pytest.skip(reason)
    yield shared_cluster()
    release_shared_cluster()


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """A URL to a PostgreSQL database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url: str = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A coordinator `Store` in this test's own SQLite file, closed after the test."""
    from sogni_coordinator.store import Store

    s = Store(tmp_path / "coordinator.db")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A coordinator database on each engine: a SQLite file, then a PostgreSQL URL (the
    same tests run on both; `db.Database` picks the engine from the location)."""
    if request.param == "sqlite":
        return str(tmp_path / "coordinator.db")
    url: str = request.getfixturevalue("pg_url")
    return url
