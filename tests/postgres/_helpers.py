"""Helpers for tests of several coordinators on one PostgreSQL (tests/postgres, tests/cluster)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def as_coordinator(url: str, who: str) -> str:
    """Another coordinator's connection to the same database (its own registry entry)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={who}"


def together(n: int, fn: Callable[[int], T]) -> list[T]:
    """`fn(i)` for i < n in n threads released at once."""
    start = threading.Barrier(n)

    def run(i: int) -> T:
        start.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))
