"""A component's own psycopg connection, opened at first use and again after a drop.

Why: the gateway's shared rate limits (`gateway.limits.SharedLimits`) and the result store
(`results.postgres.PostgresResults`) each keep a connection apart from the store's (so
they never wait for its write lock), migrate their tables on the first connect, and must
survive the server dropping it. One copy of that here, so both keep the same semantics:

- psycopg runs only in worker threads: a call on the trio thread is a `RuntimeError`.
- One call at a time (a psycopg connection serves one statement at a time).
- A connection found broken or closed before a call is opened again; the migrations run on
  the first connect only.
- A call that met a lost connection in flight is run once more on a new one only when the
  caller says it may run twice (`retry`: a read, a delete); a write is not (it may have
  committed before the connection went).

The caller turns the errors into its own (one line, the URL's password never in it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio

from sogni_coordinator.queue.postgres import connect_migrated, error_line

__all__ = ["Closed", "LazyConnection", "Unreachable"]

T = TypeVar("T")


class Unreachable(Exception):
    """Connecting (or migrating) failed; the text is psycopg's first line, password out."""


class Closed(Exception):
    """`close(final=True)` was called: no connection is opened again."""


class LazyConnection:
    """The connection of one component (`component`'s `migrations` applied at first
    connect); see the module docstring. `blocks` is the `RuntimeError`'s text on the trio
    thread."""

    def __init__(self, url: str, component: str, migrations: Sequence[str], *, blocks: str) -> None:
        self.url = url
        self._component = component
        self._migrations = migrations
        self._blocks = blocks
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._migrated = False
        self._closed = False

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.broken and not conn.closed:
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        migrations = None if self._migrated else self._migrations
        try:
            conn = connect_migrated(self.url, self._component, migrations)
        except psycopg.Error as exc:
            raise Unreachable(error_line(exc, self.url)) from exc
        self._migrated = True
        self._conn = conn
        return conn

    def call(self, fn: Callable[[psycopg.Connection[Any]], T], *, retry: bool = False) -> T:
        """`fn` on the connection (worker threads only). `retry`: `fn` may run twice, so a
        connection lost under it is opened again once. Raises `Unreachable`, `Closed`, or
        `fn`'s psycopg error."""
        if _on_event_loop():
            raise RuntimeError(self._blocks)
        with self._lock:
            if self._closed:
                raise Closed(f"{self._component}: closed")
            for attempt in (0, 1):
                conn = self._connection()
                try:
                    return fn(conn)
                except psycopg.OperationalError:
                    if not (retry and attempt == 0 and conn.broken):
                        raise
        raise AssertionError("unreachable")

    def close(self, *, final: bool = False) -> None:
        """Close the connection; a later call opens it again unless `final`."""
        with self._lock:
            self._closed = self._closed or final
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _on_event_loop() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True
