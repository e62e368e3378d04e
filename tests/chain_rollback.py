"""A session-deployed chain shared by many tests, each test's changes undone after it
(deploying takes seconds on py-evm; a snapshot and a revert take milliseconds)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sogni_chain import Chain


@contextmanager
def rolled_back(chain: Chain) -> Iterator[None]:
    """Run the block, then return ``chain`` to the state it had before it."""
    snap = chain.snapshot()
    try:
        yield
    finally:
        chain.revert(snap)
