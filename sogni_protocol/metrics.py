"""Prometheus metrics shared by both daemons: the registry, event-loop lag, bounded labels,
and the `/metrics` and `/readyz` endpoints (docs/OPERATIONS.md, "Health" and "Metrics").

Each daemon owns its own `CollectorRegistry` (never prometheus_client's global one), so
several daemons in one process (the tests) keep separate numbers. Labels come only from
bounded sets: known model ids (anything else is "other"), tiers, and fixed categories that
free-text reasons are mapped to; a prompt, an image, a key or an error text never becomes a
label or a value. Importing this module needs the `http` extra (prometheus_client), so the
daemons import it only when their HTTP listener is on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = [
    "OTHER",
    "RENDER_BUCKETS",
    "LoopLag",
    "ModelLabels",
    "category",
    "metrics_endpoint",
    "new_registry",
    "readiness_endpoint",
]

OTHER = "other"
"""The label of anything outside a bounded set."""

RENDER_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
"""Seconds: a tiny CPU render takes ~1 s, a large GPU render a minute, a deadline 10."""

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

MAX_MODEL_LABELS = 256
"""At most this many distinct model labels per daemon, whatever the allowed set holds."""


def new_registry() -> CollectorRegistry:
    """A registry for one daemon (auto_describe: collectors must describe themselves)."""
    return CollectorRegistry(auto_describe=True)


class ModelLabels:
    """Model ids as labels: only those of a fixed allowed set, the rest are "other"."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(sorted(allowed)[:MAX_MODEL_LABELS])

    def __call__(self, model_id: str) -> str:
        return model_id if model_id in self.allowed else OTHER


def category(text: str, table: Iterable[tuple[str, tuple[str, ...]]]) -> str:
    """The first category whose keyword occurs in `text` (lower-cased), else "other".

    Maps free-text reasons (which may quote anything) onto a small fixed label set."""
    low = text.lower()
    for name, words in table:
        if any(w in low for w in words):
            return name
    return OTHER


class LoopLag:
    """How late the event loop wakes a sleeping task: a blocked trio thread shows here first.

    `run` belongs in the daemon's nursery; it sleeps `interval` and records the overshoot.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str, interval: float = 0.25) -> None:
        self.interval = interval
        self.last = Gauge(
            f"{prefix}_event_loop_lag_last_seconds",
            "Overshoot of the last timed sleep on the event loop",
            registry=registry,
        )
        self.histogram = Histogram(
            f"{prefix}_event_loop_lag_seconds",
            "Overshoot of timed sleeps on the event loop",
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    async def run(self) -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(self.interval)
            lag = max(0.0, trio.current_time() - before - self.interval)
            self.last.set(lag)
            self.histogram.observe(lag)


def metrics_endpoint(
    registry: CollectorRegistry, refresh: Callable[[], Awaitable[None]] | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """`GET /metrics`: the registry in Prometheus text format. `refresh` runs first (e.g. to
    read database-backed gauges off the event loop); collectors run on the trio thread and
    must read memory only."""
    from starlette.responses import Response

    async def metrics(_request: Request) -> Response:
        if refresh is not None:
            await refresh()
        return Response(
            generate_latest(registry),
            media_type=CONTENT_TYPE_LATEST,
            headers={"Cache-Control": "no-store"},
        )

    return metrics


def readiness_endpoint(
    reason: Callable[[], Awaitable[str | None]],
) -> Callable[[Request], Awaitable[Response]]:
    """`GET /readyz`: 200 `{"status": "ready"}`, or 503 with `reason()` as a one-line JSON
    reason. `reason` returns None when ready; it must bound its own time."""
    from starlette.responses import JSONResponse

    async def readyz(_request: Request) -> Response:
        why = await reason()
        body = {"status": "ready"} if why is None else {"status": "not_ready", "reason": why}
        return JSONResponse(
            body, status_code=200 if why is None else 503, headers={"Cache-Control": "no-store"}
        )

    return readyz
