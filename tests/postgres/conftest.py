"""One real PostgreSQL server per test session (started by the project, see
`sogni_devnet.pg_cluster`), and a fresh database per test, copied from template1.

Skipped only when the binaries are absent; SOGNI_REQUIRE_POSTGRES=1 (set by CI) makes that
a failure, so CI cannot pass without having run these tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from sogni_devnet.pg_cluster import (
    REQUIRE_ENV,
    PgCluster,
    missing_reason,
    release_shared_cluster,
    shared_cluster,
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgCluster]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
        pytest.skip(reason)
    yield shared_cluster()
    release_shared_cluster()


@pytest.fixture
def pg_url(pg_server: PgCluster) -> Iterator[str]:
    """A URL to a database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)
