"""The coordinator's HTTP API (served by `sogni_net.serve_http` on `http_listen`).

`/healthz` (the process is up) and `/readyz` (database writable, libp2p listening) for probes,
`/metrics` for Prometheus (`sogni_coordinator.metrics`, docs/OPERATIONS.md); `GET /epochs`
(the index of published epochs) and `GET /epochs/{name}` (one published file:
`epoch-NNNNNN.json`, `epoch-NNNNNN.tree.json`, `receipts/0x<keccak>.json`) so nodes can
fetch and check their rewards from anywhere; `POST /relay/claim` to have this coordinator
submit a claim and pay its gas (the same checks and limits as the `/sogni/relay/1.0.0`
protocol, `claim_relay`); the status page; and the gateway for apps written for Sogni's
client SDKs (`sogni_coordinator.gateway`, REST and WebSocket at the host root). starlette is
imported when the app is built, so importing this module needs no `http` extra.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from sogni_net import health_endpoint, require_http_extra
from sogni_net.http import SlowBody, read_body
from sogni_protocol import ids
from sogni_protocol.json_depth import check_depth

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from sogni_coordinator.claim_relay import ClaimRelay
    from sogni_coordinator.dispatch import Dispatcher
    from sogni_coordinator.epoch_serving import EpochFolder
    from sogni_coordinator.gateway import Gateway
    from sogni_coordinator.seasons.stakers import StakeChange

RELAY_BODY_LIMIT = ids.RELAY_FRAME_LIMIT
"""Largest `POST /relay/claim` body read (a claim with a 64-node proof is ~5 KB of JSON)."""


@dataclass(frozen=True)
class CoordinatorView:
    """What the HTTP routes may read: in-memory state owned by the running coordinator."""

    peer_id: str
    signer: str
    dispatcher: Dispatcher
    started: float = field(default_factory=time.monotonic)
    epochs: EpochFolder | None = None
    """The published epochs folder (`chain_link.publish_dir`); None: `/epochs` is 404."""
    relay: ClaimRelay | None = None
    """Submits claims for nodes; None (no settlement chain): `/relay/claim` answers 503."""
    stakes: Callable[[], Sequence[StakeChange]] | None = None
    """The Staking contract's history (`seasons.stakers.StakeHistory.changes`) for the status
    page's Stakers board; None (no settlement chain): the board says it needs the chain."""
    registry: CollectorRegistry | None = None
    """This coordinator's metrics (`sogni_coordinator.metrics`); None: `/metrics` is 404."""
    refresh: Callable[[], Awaitable[None]] | None = None
    """Run before each scrape: the gauges that need the database, read off the loop."""
    not_ready: Callable[[], Awaitable[str | None]] | None = None
    """Why `/readyz` is 503 (one line), or None when ready; None here: ready while up."""
    gateway: Gateway | None = None
    """The SDK gateway (`sogni_coordinator.gateway`): its REST routes and the WebSocket at
    `/`; None: not served."""
    signer_set: Path | None = None
    """The network signer set file served at `/v1/network/signers`
    (`sogni_coordinator.network_signers`); None: 404."""


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


def _error(status: int, code: str, reason: str) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": code, "reason": reason}, status_code=status)


_FILE_STATUS = {"bad_name": 400, "not_found": 404, "too_large": 413}


def epoch_routes(view: CoordinatorView) -> list[BaseRoute]:
    """`GET /epochs` and `GET /epochs/{name}` over `view.epochs`."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from sogni_coordinator.epoch_serving import EpochFileError

    async def index(request: Request) -> Response:
        if view.epochs is None:
            return _error(404, "not_found", "this coordinator publishes no epochs")
        after_text = request.query_params.get("after", "0")
        if not after_text.isdigit() or len(after_text) > 18:
            return _error(400, "bad_request", "after must be an epoch number")
        epochs, more = await view.epochs.index_async(int(after_text))
        body = {"epochs": msgspec.to_builtins(epochs), "more": more}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def file(request: Request) -> Response:
        if view.epochs is None:
            return _error(404, "not_found", "this coordinator publishes no epochs")
        name = str(request.path_params["name"])
        try:
            data = await view.epochs.read_async(name)
        except EpochFileError as exc:
            return _error(_FILE_STATUS.get(exc.code, 400), exc.code, exc.reason)
        # receipts batches are content-addressed (immutable); an epoch file is rewritten
        # only while its root is not posted yet
        cache = (
            "public, max-age=31536000, immutable" if name.startswith("receipts/") else "no-cache"
        )
        return Response(data, media_type="application/json", headers={"Cache-Control": cache})

    return [
        Route("/epochs", index, methods=["GET"]),
        Route("/epochs/{name:path}", file, methods=["GET"]),
    ]


def relay_routes(view: CoordinatorView) -> list[BaseRoute]:
    """`POST /relay/claim`: a JSON `RelayClaim` (camelCase; proof and signature as 0x-hex)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sogni_coordinator.claim_relay import RelayRefusal
    from sogni_protocol.relay_messages import RelayClaim

    status = {
        "rate_limited": 429,
        "busy": 429,
        "no_chain": 503,
        "unavailable": 503,
        "relayer_unfunded": 503,
        "paused": 503,
        "not_matured": 409,
        "nothing_to_claim": 409,
    }

    async def relay_claim(request: Request) -> Response:
        if view.relay is None:
            return _error(503, "no_chain", "this coordinator has no settlement chain")
        try:
            body = await read_body(request, RELAY_BODY_LIMIT)
        except SlowBody as exc:
            return _error(408, "too_slow", str(exc))
        if body is None:
            return _error(413, "too_large", f"the body is over {RELAY_BODY_LIMIT} bytes")
        try:
            check_depth(body)  # an untyped decode of deep nesting crashes, not raises
            claim = msgspec.convert(_claim_fields(msgspec.json.decode(body)), RelayClaim)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
            return _error(400, "bad_request", str(exc)[:500])
        try:
            done = await view.relay.relay(claim)
        except RelayRefusal as exc:
            return _error(status.get(exc.code, 422), exc.code, exc.reason)
        return JSONResponse(
            {
                "txHash": "0x" + done.tx_hash.hex(),
                "account": done.account,
                "epoch": done.epoch,
                "amount": done.amount,
                "staked": done.staked,
                "paid": done.paid,
            }
        )

    return [Route("/relay/claim", relay_claim, methods=["POST"])]


def _claim_fields(raw: Any) -> dict[str, Any]:
    """The JSON body (camelCase, 0x-hex bytes) with its bytes decoded, for `msgspec.convert`."""
    if not isinstance(raw, dict):
        raise ValueError("the body must be a JSON object")
    out = dict(raw)
    proof = out.get("proof", [])
    if not isinstance(proof, list) or len(proof) > ids.MAX_PROOF_NODES:
        raise ValueError(f"proof must be a list of at most {ids.MAX_PROOF_NODES} 0x-hex hashes")
    out["proof"] = [_hex(p, "proof") for p in proof]
    if "signature" in out:
        out["signature"] = _hex(out["signature"], "signature")
    return out


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"{what} must be 0x-hex")
    return bytes.fromhex(value[2:])


def probe_routes(view: CoordinatorView) -> list[BaseRoute]:
    """`/readyz`, and `/metrics` when the coordinator keeps metrics."""
    from starlette.routing import Route

    from sogni_protocol.metrics import metrics_endpoint, readiness_endpoint

    async def not_ready() -> str | None:
        return None if view.not_ready is None else await view.not_ready()

    out: list[BaseRoute] = [Route("/readyz", readiness_endpoint(not_ready), methods=["GET"])]
    if view.registry is not None:
        endpoint = metrics_endpoint(view.registry, view.refresh)
        out.append(Route("/metrics", endpoint, methods=["GET"]))
    return out


def routes(view: CoordinatorView) -> list[BaseRoute]:
    from starlette.routing import Route

    from sogni_coordinator.disputes import dispute_routes
    from sogni_coordinator.network_signers import signer_set_routes
    from sogni_coordinator.status_page import status_routes

    return [
        Route("/healthz", health_endpoint(lambda: health(view)), methods=["GET"]),
        *probe_routes(view),
        *epoch_routes(view),
        *relay_routes(view),
        *signer_set_routes(view.signer_set),
        *dispute_routes(view.dispatcher),
        *status_routes(view, view.stakes),
        *_gateway_routes(view),
    ]


def _gateway_routes(view: CoordinatorView) -> list[BaseRoute]:
    if view.gateway is None:
        return []
    from sogni_coordinator.gateway import gateway_routes

    return gateway_routes(view.gateway)


def build_app(view: CoordinatorView) -> Starlette:
    require_http_extra()
    from starlette.applications import Starlette

    return Starlette(routes=routes(view))
