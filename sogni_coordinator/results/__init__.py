"""Where receipted images wait for their clients: one interface (`base.ResultStore`), one
module per store: `folder` (the default: files in `results_dir`), `postgres` (rows in
the network's PostgreSQL, `result_store = "database"`; psycopg is imported only then) and
`sqlite` (rows in the coordinator's SQLite file, `result_store = "database"` there)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sogni_coordinator.results.base import ResultKey, ResultStore, StoreError
from sogni_coordinator.results.folder import FolderResults
from sogni_coordinator.results.sqlite import SqliteResults
from sogni_coordinator.storage import is_postgres

__all__ = [
    "FolderResults",
    "ResultKey",
    "ResultStore",
    "SqliteResults",
    "StoreError",
    "open_results",
]


class _Settings(Protocol):
    """The `CoordinatorConfig` keys this reads (named structurally: importing the config here
    would close an import cycle through billing and routing)."""

    @property
    def result_store(self) -> str: ...
    @property
    def result_retention(self) -> float | None: ...
    @property
    def database(self) -> Path | str: ...
    @property
    def results_dir(self) -> Path | None: ...
    @property
    def data_dir(self) -> Path: ...


def open_results(config: _Settings) -> ResultStore:
    """The store `config` names (blocking for "database": connects and migrates, so a bad
    URL fails at start). `run()` it in the coordinator's nursery: it sweeps expired images
    and closes the store when the coordinator stops."""
    if config.result_store == "database" and not is_postgres(config.database):
        return SqliteResults(config.database, retention=config.result_retention)
    if config.result_store == "database":
        from sogni_coordinator.results.postgres import PostgresResults
        from sogni_coordinator.storage import location

        store = PostgresResults(location(config.database), retention=config.result_retention)
        store.open()
        return store
    return FolderResults(
        config.results_dir or config.data_dir / "results", retention=config.result_retention
    )
