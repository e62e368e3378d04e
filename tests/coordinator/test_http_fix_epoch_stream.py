"""`GET /epochs/{name}`: anyone may ask (no authentication), so a file of up to 64 MiB is
streamed in chunks, never read whole into memory, and only a few are sent at once: before the
fix every request read its whole file, and twenty clients that never read their answers held
twenty copies (a 16 MiB batch: the coordinator grew by over 300 MB)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from starlette.applications import Starlette

from sogni_coordinator.epoch_serving import EpochFolder
from sogni_coordinator.http_api import EPOCH_CHUNK, epoch_routes

from .epoch_http import Answer, get, published

NAME = "receipts/0x" + "ab" * 32 + ".json"
SIZE = 32 << 20


def _published(tmp_path: Path) -> tuple[EpochFolder, bytes]:
    return published(tmp_path, NAME, SIZE)


async def _get(app: Starlette, path: str, answer: Answer, method: str = "GET") -> None:
    await get(app, path, answer, method=method)


async def test_a_published_file_is_streamed_not_read_whole(tmp_path: Path) -> None:
    folder, digest = _published(tmp_path)
    view: Any = SimpleNamespace(epochs=folder)
    app = Starlette(routes=epoch_routes(view))
    answer = Answer()
    tracemalloc.start()
    try:
        with trio.fail_after(30):
            await _get(app, "/epochs/" + NAME, answer)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 200 and answer.headers[b"content-length"] == str(SIZE).encode()
    assert answer.size == SIZE and answer.digest.digest() == digest
    assert answer.largest <= EPOCH_CHUNK
    assert peak < 8 << 20, f"{peak} bytes held for a {SIZE}-byte file"  # before: over SIZE

    head = Answer()
    await _get(app, "/epochs/" + NAME, head, method="HEAD")
    assert head.status == 200 and head.headers[b"content-length"] == str(SIZE).encode()
    assert head.size == 0
    missing = Answer()
    await _get(app, "/epochs/epoch-000009.json", missing)
    assert missing.status == 404 and b"not_found" in missing.body


async def test_transfers_past_the_cap_are_answered_503_with_retry_after(tmp_path: Path) -> None:
    folder, digest = _published(tmp_path)
    view: Any = SimpleNamespace(epochs=folder)
    # both from 127.0.0.1: the per-address cap (its own test: test_leftovers_epochs.py) set apart
    app = Starlette(routes=epoch_routes(view, transfers=1, wait=0.2, per_address=2))
    release = trio.Event()
    first = Answer(hold=release)  # a client that takes its time: it holds the one slot
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_get, app, "/epochs/" + NAME, first)
        with trio.fail_after(10):
            await first.started.wait()
            busy = Answer()
            await _get(app, "/epochs/" + NAME, busy)
        assert busy.status == 503 and busy.headers[b"retry-after"] == b"5"
        assert b"unavailable" in busy.body
        release.set()
    assert first.size == SIZE and first.digest.digest() == digest
    after = Answer()  # the slot is free again
    with trio.fail_after(30):
        await _get(app, "/epochs/" + NAME, after)
    assert after.status == 200 and after.size == SIZE
