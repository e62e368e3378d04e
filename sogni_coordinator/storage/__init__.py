"""Where the coordinator's tables live: a SQLite file (default) or a PostgreSQL database.

`db.Database` is the one interface components use; `dialect` turns the SQLite SQL they
are written in into PostgreSQL's, and `postgres.PgConnection` runs it through psycopg with
the subset of `sqlite3.Connection`'s behaviour components rely on. `lazy.LazyConnection` is
the connection of a component that keeps its own (result store, shared rate limits).
"""

from __future__ import annotations

from pathlib import Path

_SCHEMES = ("postgresql://", "postgres://")


def location(database: Path | str) -> str:
    """`database` as text: a file path, or a PostgreSQL URL. A URL that went through
    `pathlib.Path` (the config's `database` field is a Path) lost one slash of `//`: put
    back."""
    text = str(database)
    for scheme in _SCHEMES:
        single = scheme[:-1]
        if text.startswith(single) and not text.startswith(scheme):
            return scheme + text[len(single) :]
    return text


def is_postgres(database: Path | str) -> bool:
    """A PostgreSQL URL (`postgresql://...`), not a SQLite file path."""
    return location(database).startswith(_SCHEMES)
