"""`GET /status` is public (it shares the gateway's listener) and each snapshot runs the
season boards and the stake history: a burst of requests made one snapshot each, in the
thread pool image checks use. Now one snapshot serves every request for `CACHE_SECONDS`."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sogni_coordinator import status_page


async def test_a_burst_of_status_requests_makes_one_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []

    def slow_snapshot(*_args: Any) -> Any:
        made.append(1)
        import time

        time.sleep(0.05)  # a database read, in the worker thread
        return object()

    monkeypatch.setattr(status_page, "snapshot", slow_snapshot)
    monkeypatch.setattr(status_page, "render", lambda _s: f"<p>{len(made)}</p>")
    monkeypatch.setattr(status_page, "CACHE_SECONDS", 0.3, raising=False)
    (route,) = status_page.status_routes(view=None)  # type: ignore[arg-type]
    bodies: list[bytes] = []

    async def get() -> None:
        response = await route.endpoint(None)  # type: ignore[attr-defined]
        bodies.append(response.body)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(get)
    assert len(made) == 1 and set(bodies) == {b"<p>1</p>"}
    await trio.sleep(status_page.CACHE_SECONDS)
    await get()  # stale: read again
    assert len(made) == 2 and bodies[-1] == b"<p>2</p>"
