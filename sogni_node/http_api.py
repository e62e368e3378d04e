"""The node's HTTP API (served by `sogni_net.serve_http` on `http_listen`).

`/healthz` (the process is up) and `/readyz` (a trusted coordinator connected, a model to
serve) for probes, `/metrics` for Prometheus (`sogni_node.metrics`, docs/OPERATIONS.md);
later routes (a status page) go into `routes()`. starlette is imported when the app is built,
so importing this module needs no `http` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sogni_net import health_endpoint, require_http_extra

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
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
    models: Sequence[str] = ()
    """Models this node serves (advertised; the daemon's live list, which `models add`
    extends while it runs); none: not ready."""
    registry: CollectorRegistry | None = None
    """This node's metrics (`sogni_node.metrics`); None: `/metrics` is 404."""
    journal_fault: Callable[[], str | None] = lambda: None
    """Why the journal cannot be written now (`Journal.write_fault`), or None."""


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


def not_ready(view: NodeView) -> str | None:
    """Why the node cannot take work now (one line for `/readyz`), or None.

    Ready: not shutting down, a journal that can be written, a model to serve, and a
    welcomed session with at least one trusted coordinator (sessions are only welcomed by a
    trusted signer)."""
    if view.worker.draining:
        return "draining: the node is shutting down"
    fault = view.journal_fault()
    if fault is not None:
        return (
            f"journal not writable: {fault}; no job is taken until a write works again "
            f"(tried every {JOURNAL_PROBE_SECONDS:g} s)"
        )
    if not view.models:
        return "no model to serve"
    if view.coordinators() < 1:
        return f"no trusted coordinator connected (0 of {view.configured})"
    return None


JOURNAL_PROBE_SECONDS = 2.0
"""How often the daemon tries to write its journal while it cannot (`Journal.probe_write`)."""


def routes(view: NodeView) -> list[BaseRoute]:
    from starlette.routing import Route

    from sogni_protocol.metrics import metrics_endpoint, readiness_endpoint

    async def reason() -> str | None:
        return not_ready(view)

    out: list[BaseRoute] = [
        Route("/healthz", health_endpoint(lambda: health(view)), methods=["GET"]),
        Route("/readyz", readiness_endpoint(reason), methods=["GET"]),
    ]
    if view.registry is not None:
        out.append(Route("/metrics", metrics_endpoint(view.registry), methods=["GET"]))
    return out


def build_app(view: NodeView) -> Starlette:
    require_http_extra()
    from starlette.applications import Starlette

    return Starlette(routes=routes(view))
