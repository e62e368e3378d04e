"""The queue tests run once per engine: a SQLite file and a real PostgreSQL database.

`engine.open()` is one more coordinator's handle on the same queue. The PostgreSQL server is
the session's one (`sogni_devnet.pg_cluster.shared_cluster`, also used by tests/postgres);
each test gets a database of its own. Skipped only when the binaries are absent, a failure
then under SOGNI_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sogni_coordinator.queue import JobQueue, open_queue
from sogni_devnet.pg_cluster import (
    PgCluster,
)


@dataclass
class Engine:
    name: str
    database: str
    handles: list[JobQueue] = field(default_factory=list)

    async def open(self) -> JobQueue:
        """Another coordinator's handle on the one queue."""
        handle = await open_queue(self.database)
        self.handles.append(handle)
        return handle

    @property
    def integrity_error(self) -> type[Exception]:
        if self.name == "sqlite":
            return sqlite3.IntegrityError
        import psycopg

        return psycopg.errors.UniqueViolation

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Raw SQL on a connection of its own, bypassing the queue's code (`?` params)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.database) as db:
                db.execute(sql, params)
            return
        import psycopg

        with psycopg.connect(self.database, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s").encode(), params)


@pytest.fixture(params=["sqlite", "postgres"])
def engine_target(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "coordinator.sqlite")
        return
    server: PgCluster = request.getfixturevalue("pg_server")  # tests/conftest.py
    name = f"q_{uuid.uuid4().hex[:16]}"
    yield "postgres", server.create_database(name)
    server.drop_database(name)


@pytest.fixture
async def engine(engine_target: tuple[str, str]) -> AsyncIterator[Engine]:
    eng = Engine(*engine_target)
    yield eng
    for handle in eng.handles:
        await handle.aclose()
