"""`GET /epochs/{name}` (unauthenticated) has the libp2p path's limits: one transfer per client
address at once (an IPv6 /64 counts as one address; another request is answered 429 at once),
and a file must go at `epoch_serving.MIN_TRANSFER_RATE` on average after its grace, or the
answer is cut short and its slot goes to the next request, even while a write to the slow
client is stuck (hypercorn writes in a shielded scope). Before, one address could take every
slot, and readers trickling a byte before each send deadline held them for ever."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from starlette.applications import Starlette
from structlog.testing import capture_logs

import sogni_coordinator.epoch_serving as epoch_serving
from sogni_coordinator.epoch_serving import EpochFolder
from sogni_coordinator.http_api import EPOCH_CHUNK, epoch_routes

from . import epoch_http
from .epoch_http import get, published

NAME = "receipts/0x" + "cd" * 32 + ".json"
SIZE = 4 << 20


def _published(tmp_path: Path) -> tuple[EpochFolder, bytes]:
    return published(tmp_path, NAME, SIZE)


class Answer(epoch_http.Answer):
    """Its writes shielded, as hypercorn's socket writes are."""

    def __init__(self, hold: trio.Event | None = None, pause: float = 0.0) -> None:
        super().__init__(hold, pause=pause, shield=True)


async def _get(app: Starlette, client: str, answer: Answer) -> None:
    await get(app, "/epochs/" + NAME, answer, client=client)


def _app(folder: EpochFolder, **kw: Any) -> Starlette:
    view: Any = SimpleNamespace(epochs=folder)
    return Starlette(routes=epoch_routes(view, **kw))


@pytest.mark.parametrize(
    ("first", "same", "other"),
    [("10.0.0.1", "10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2", "2001:db8:0:1::1")],
)
async def test_one_transfer_per_address_at_once(
    tmp_path: Path, first: str, same: str, other: str
) -> None:
    folder, digest = _published(tmp_path)
    app = _app(folder)  # four slots: the address's own cap refuses, not the slots
    release = trio.Event()
    held = Answer(hold=release)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_get, app, first, held)
        try:  # released however the test ends: the held write ignores cancellation
            with trio.fail_after(10):
                await held.started.wait()
                again = Answer()
                await _get(app, same, again)  # answered at once, not after a wait
            assert again.status == 429 and again.headers[b"retry-after"] == b"5"
            assert b"busy" in again.body and b"per address" in again.body
            elsewhere = Answer()
            with trio.fail_after(30):
                await _get(app, other, elsewhere)
            assert elsewhere.status == 200 and elsewhere.digest.digest() == digest
        finally:
            release.set()
    assert held.size == SIZE and held.digest.digest() == digest
    after = Answer()  # its turn ended with its answer
    with trio.fail_after(30):
        await _get(app, same, after)
    assert after.status == 200 and after.size == SIZE


async def test_a_reader_under_the_minimum_rate_is_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, digest = _published(tmp_path)
    monkeypatch.setattr(epoch_serving, "TRANSFER_GRACE", 0.3)
    monkeypatch.setattr(epoch_serving, "MIN_TRANSFER_RATE", 4 * SIZE)  # 4 MiB in 0.3 + 0.25 s
    app = _app(folder)
    slow = Answer(pause=0.1)  # 16 chunks, 1.6 s
    with capture_logs() as logs, trio.fail_after(10):
        await _get(app, "10.0.0.1", slow)
    assert slow.status == 200 and EPOCH_CHUNK <= slow.size < SIZE
    assert slow.size <= 7 * EPOCH_CHUNK  # ~0.55 s of 0.1 s writes
    (cut,) = [e for e in logs if e["event"] == "epoch_transfer_too_slow"]
    assert cut["file"] == NAME and cut["bytes"] == SIZE
    fast = Answer()  # the same rule lets a reader keeping up have all of it
    with trio.fail_after(10):
        await _get(app, "10.0.0.1", fast)
    assert fast.size == SIZE and fast.digest.digest() == digest


async def test_a_stuck_write_gives_its_slot_up_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, digest = _published(tmp_path)
    monkeypatch.setattr(epoch_serving, "TRANSFER_GRACE", 0.3)
    monkeypatch.setattr(epoch_serving, "MIN_TRANSFER_RATE", 4 * SIZE)
    app = _app(folder, transfers=1, wait=5.0)
    release = trio.Event()
    stuck = Answer(hold=release)  # its first write never ends until released
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_get, app, "10.0.0.1", stuck)
        try:  # released however the test ends: the stuck write ignores cancellation
            with trio.fail_after(10):
                await stuck.started.wait()
                next_one = Answer()
                start = trio.current_time()
                await _get(app, "10.0.0.2", next_one)  # waits for the slot: freed at 0.55 s
            assert next_one.status == 200 and next_one.digest.digest() == digest
            assert trio.current_time() - start < 4.0
            assert not stuck.ended.is_set()  # still in its write
        finally:
            release.set()
        with trio.fail_after(5):
            await stuck.ended.wait()
    assert stuck.size == EPOCH_CHUNK  # the write under way, then cut short
    again = Answer()  # the address's turn ended with its (short) answer
    with trio.fail_after(10):
        await _get(app, "10.0.0.1", again)
    assert again.status == 200 and again.size == SIZE
