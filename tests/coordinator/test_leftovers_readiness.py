"""`/readyz` is unauthenticated and each full check takes the database's write lock: its
volume and lock checks answer from one verdict for `READY_CACHE` seconds, and probes that
arrive during a check share it (before, every probe took the lock: a flood of probes queued
the writer behind them). A write that fails is still seen at the next probe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import sogni_coordinator.metrics as metrics
from sogni_coordinator.http_api import build_app

from .test_obs_metrics import MeteredHarness, view_of


@pytest.fixture
async def metered_coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[MeteredHarness]:
    h = MeteredHarness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


def count_checks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full check (`database_writable`: the volumes, then the write lock), recorded."""
    checked: list[Path] = []
    real = metrics.database_writable

    def counting(path: Path, *args: Any, **kwargs: Any) -> str | None:
        checked.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(metrics, "database_writable", counting)
    return checked


async def test_a_flood_of_probes_takes_the_write_lock_once_per_second(
    metered_coord: MeteredHarness, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = count_checks(monkeypatch)
    view = view_of(metered_coord, nursery)
    transport = httpx.ASGITransport(app=build_app(view))
    async with httpx.AsyncClient(transport=transport, base_url="http://coordinator") as client:
        answers: list[httpx.Response] = []

        async def probe() -> None:
            answers.append(await client.get("/readyz"))

        async with trio.open_nursery() as probes:  # at once: they share the one check
            for _ in range(20):
                probes.start_soon(probe)
        for _ in range(20):  # one after another, within the second
            await probe()
        assert [a.status_code for a in answers] == [200] * 40
        assert answers[0].json() == {"status": "ready"}
        assert len(checked) == 1, f"{len(checked)} checks took the write lock for 40 probes"

        await trio.sleep(metrics.READY_CACHE + 0.1)  # the verdict has aged: checked again
        assert (await client.get("/readyz")).status_code == 200
        assert len(checked) == 2


async def test_a_failing_write_is_seen_at_once_despite_a_cached_verdict(
    metered_coord: MeteredHarness, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = metered_coord
    checked = count_checks(monkeypatch)
    view = view_of(h, nursery)
    assert view.not_ready is not None
    assert await view.not_ready() is None  # ready, and cached
    h.store._shared.failed("database", "disk full (OperationalError)")  # what the writer does
    why = await view.not_ready()
    assert why is not None and why.startswith("database writes failing: disk full")
    h.store._shared.succeeded("database")
    assert await view.not_ready() is None
    assert len(checked) == 1


async def test_a_not_ready_verdict_is_cached_too_and_a_cut_check_is_not() -> None:
    now = [0.0]
    verdicts = iter(["database volume is read-only", None])
    calls = 0
    hold = trio.Event()

    async def check() -> str | None:
        nonlocal calls
        calls += 1
        await hold.wait()
        return next(verdicts)

    cache = metrics.ReadinessCache(check, ttl=1.0, clock=lambda: now[0])
    with trio.move_on_after(0.05):  # the prober went away mid-check: nothing is kept
        await cache()
    hold.set()
    assert await cache() == "database volume is read-only"
    now[0] = 0.9
    assert await cache() == "database volume is read-only"
    assert calls == 2
    now[0] = 2.0
    assert await cache() is None
    assert calls == 3
