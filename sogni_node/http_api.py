"""The node's HTTP API (served by `sogni_net.serve_http` on `http_listen`).

`/healthz` for probes and operators; later routes (metrics, a status page) go into
`routes()`. starlette is imported when the app is built, so importing this module needs no
`http` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sogni_net import health_endpoint, require_http_extra

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute

    from sogni_node.worker import Worker


@dataclass(frozen=True)
class NodeView:
    """What the HTTP routes may read: in-memory state owned by the running node daemon."""

    peer_id: str
    wallet: str
    worker: Worker
    coordinators: Callable[[], int]
    """Coordinators with a live, welcomed pull session."""
    configured: int
    started: float = field(default_factory=time.monotonic)


def health(view: NodeView) -> dict[str, object]:
    """Cheap facts for `/healthz`.

    "ok": at least one coordinator connected. "degraded" (still 200): none yet, e.g. the
    coordinator is down; restarting the node would not help, it reconnects by itself.
    "draining" (503): shutting down, take no new work here.
    """
    worker = view.worker
    connected = view.coordinators()
    status = "draining" if worker.draining else "ok" if connected else "degraded"
    return {
        "status": status,
        "role": "node",
        "peerId": view.peer_id,
        "wallet": view.wallet,
        "uptimeSeconds": round(time.monotonic() - view.started, 1),
        "coordinators": connected,
        "configuredCoordinators": view.configured,
        "slots": worker.slots,
        "runningJobs": len(worker.running),
    }


def routes(view: NodeView) -> list[BaseRoute]:
    from starlette.routing import Route

    return [Route("/healthz", health_endpoint(lambda: health(view)), methods=["GET"])]


def build_app(view: NodeView) -> Starlette:
    require_http_extra()
    from starlette.applications import Starlette

    return Starlette(routes=routes(view))
