"""`GET /disputes/refusals/...` and `/disputes/bundles/...` read off the event loop.

Anyone may call them; before the fix their SQLite reads (and the bundle's `read_bytes`) ran
on the trio thread, so a read waiting behind the database writer's lock (up to 30 s) stalled
every task of the coordinator. Here the book's reads block until the event loop itself
releases them: that can only happen if the loop is free while they wait.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import trio
from starlette.applications import Starlette

from sogni_coordinator.disputes import dispute_routes

JOB = "0x" + "33" * 32
CASE = "0x" + "44" * 32


class BlockedBook:
    """A DisputeBook whose reads wait (at most 5 s) for `gate`, as behind a held write lock."""

    def __init__(self, bundle: Path) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.released_in_time: list[bool] = []
        self.bundle = bundle

    def _wait(self) -> None:
        self.entered.set()
        self.released_in_time.append(self.gate.wait(5))

    def refusals(self, _job_id: bytes) -> list[Any]:
        self._wait()
        return []

    def by_case(self, _case_id: bytes) -> Any:
        self._wait()
        return SimpleNamespace(bundle_path=str(self.bundle))


async def _while_blocked(client: httpx.AsyncClient, book: BlockedBook, path: str) -> int:
    """GET `path`; once the book's read has started, release it from the event loop."""
    book.gate.clear()
    book.entered.clear()
    status: list[int] = []

    async def get() -> None:
        status.append((await client.get(path)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get)
        with trio.fail_after(10):
            while not book.entered.is_set():  # the loop runs while the read waits
                await trio.sleep(0.01)
        book.gate.set()
    return status[0]


async def test_dispute_reads_leave_the_event_loop_free(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text('{"rechecks": []}')
    book = BlockedBook(bundle)
    app = Starlette(routes=dispute_routes(SimpleNamespace(refusals=SimpleNamespace(book=book))))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        assert await _while_blocked(client, book, f"/disputes/refusals/{JOB}") == 404
        assert await _while_blocked(client, book, f"/disputes/bundles/{CASE}.json") == 200
    # before the fix each read held the loop until its 5 s wait ran out
    assert book.released_in_time == [True, True]
