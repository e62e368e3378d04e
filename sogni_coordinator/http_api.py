"""The coordinator's HTTP API (served by `sogni_net.serve_http` on `http_listen`).

`/healthz` for probes and operators. Later routes (the HTTP gateway for apps, metrics, a
status page) go into `routes()`. starlette is imported when the app is built, so importing
this module needs no `http` extra.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sogni_net import health_endpoint, require_http_extra

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute

    from sogni_coordinator.dispatch import Dispatcher


@dataclass(frozen=True)
class CoordinatorView:
    """What the HTTP routes may read: in-memory state owned by the running coordinator."""

    peer_id: str
    signer: str
    dispatcher: Dispatcher
    started: float = field(default_factory=time.monotonic)


def health(view: CoordinatorView) -> dict[str, object]:
    """Cheap facts for `/healthz`: "ok" with a node connected, "degraded" (still 200) without.

    A coordinator without nodes still accepts and queues requests, so a probe must not
    restart it; "degraded" tells an operator that nothing will render until a node joins.
    """
    d = view.dispatcher
    nodes = len(d.nodes)
    counts = d.job_counts()
    return {
        "status": "ok" if nodes else "degraded",
        "role": "coordinator",
        "peerId": view.peer_id,
        "signer": view.signer,
        "uptimeSeconds": round(time.monotonic() - view.started, 1),
        "nodes": nodes,
        "queuedJobs": counts["queued"],
        "liveJobs": sum(counts.values()),
    }


def routes(view: CoordinatorView) -> list[BaseRoute]:
    from starlette.routing import Route

    return [Route("/healthz", health_endpoint(lambda: health(view)), methods=["GET"])]


def build_app(view: CoordinatorView) -> Starlette:
    require_http_extra()
    from starlette.applications import Starlette

    return Starlette(routes=routes(view))
