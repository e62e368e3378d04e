"""Ordered forward migrations for the SQLite files the daemons keep (standard library only).

Why: a node's journal and a coordinator's database outlive the code that wrote them. Each
schema change is a numbered migration; opening a file applies the ones it lacks, in order, in
one `BEGIN IMMEDIATE` transaction (two processes opening one file: one migrates, the other
waits and finds it done), and records the version in `PRAGMA user_version`. A file newer than
the code is refused, naming both versions, because old code would misread it.

Migration 1 creates the first schema from an empty file; never edit a released migration,
add the next one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Migration", "SchemaTooNew", "migrate", "split_statements"]


@dataclass(frozen=True)
class Migration:
    """Schema `version` is reached by running `sql` (statements) or `apply` (a function)."""

    version: int
    why: str
    sql: str = ""
    apply: Callable[[sqlite3.Connection], None] | None = None


class SchemaTooNew(Exception):
    """The file was written by newer code; this code must not touch it."""

    def __init__(self, what: str, found: int, known: int, upgrade: str) -> None:
        super().__init__(
            f"{what} has schema version {found}, newer than this code's {known}; {upgrade}"
        )
        self.found = found
        self.known = known


def split_statements(sql: str) -> list[str]:
    """Complete SQL statements of `sql`, split where SQLite itself would end them.

    (`executescript` would do it, but it commits first: it cannot run inside our transaction.)
    """
    statements, buffer = [], ""
    for piece in sql.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                statements.append(buffer.strip())
            buffer = ""
    return statements


def migrate(
    db: sqlite3.Connection,
    migrations: Sequence[Migration],
    *,
    what: str,
    upgrade: str = "upgrade the software",
) -> int:
    """Bring `db` (opened with `isolation_level=None`) to the last migration's version.

    Returns the version the file had before. Raises `SchemaTooNew` for a newer file, and
    `ValueError` if `migrations` are not numbered 1, 2, 3, ...
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations must be numbered 1..n in order, got {versions}")
    latest = len(migrations)
    db.execute("BEGIN IMMEDIATE")
    try:
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > latest:
            raise SchemaTooNew(what, found, latest, upgrade)
        for m in migrations[found:]:
            for statement in split_statements(m.sql):
                db.execute(statement)
            if m.apply is not None:
                m.apply(db)
        if found != latest:
            db.execute(f"PRAGMA user_version = {latest}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
