"""The coordinator's HTTP API (served by `sogni_net.serve_http` on `http_listen`).

`/healthz` (the process is up) and `/readyz` (writes not failing, room on the disk, database
lock takeable, libp2p listening) for probes,
`/metrics` for Prometheus (`sogni_coordinator.metrics`, docs/OPERATIONS.md); `GET /epochs`
(the index of published epochs) and `GET /epochs/{name}` (one published file:
`epoch-NNNNNN.json`, `epoch-NNNNNN.tree.json`, `receipts/0x<keccak>.json`; streamed, a few
at once, one per client address, at a minimum rate: anyone may ask) so nodes can fetch and
check their rewards from anywhere;
`POST /relay/claim` to have this coordinator submit a claim and pay its gas (the same checks
and limits as the `/sogni/relay/1.0.0` protocol, `claim_relay`); the status page; and the
gateway for apps written for Sogni's client SDKs (`sogni_coordinator.gateway`, REST and
WebSocket at the host root). starlette is imported when the app is built, so importing this
module needs no `http` extra.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec
import trio

from sogni_net import health_endpoint, require_http_extra
from sogni_net.admission import address_key
from sogni_net.http import SlowBody, read_body
from sogni_protocol import ids
from sogni_protocol.json_depth import check_depth
from sogni_protocol.logs import get_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute
    from starlette.types import Receive, Scope, Send

    from sogni_coordinator.claim_relay import ClaimRelay
    from sogni_coordinator.dispatch import Dispatcher
    from sogni_coordinator.epoch_serving import EpochFolder
    from sogni_coordinator.gateway import Gateway
    from sogni_coordinator.seasons.stakers import StakeChange

log = get_logger(__name__)

RELAY_BODY_LIMIT = ids.RELAY_FRAME_LIMIT
"""Largest `POST /relay/claim` body read (a claim with a 64-node proof is ~5 KB of JSON)."""

EPOCH_TRANSFERS = 4
"""`GET /epochs/{name}` answers sent at once (anyone may ask, unauthenticated). Counted apart
from libp2p's (`epoch_serving.CONCURRENT_TRANSFERS`), so neither transport starves the other."""
EPOCH_TRANSFERS_PER_ADDRESS = 1
"""`GET /epochs/{name}` answers one client address (an IPv4 address, an IPv6 /64:
`sogni_net.admission.address_key`) may be sent, or wait for, at once; another is answered
429 with Retry-After at once. libp2p allows one per peer (`EpochFolder.hold`): one address
opening many requests held every slot, and a node fetches its files one after another."""
EPOCH_TRANSFER_WAIT = 5.0
"""How long a request waits for a transfer slot before it is answered 503 (Retry-After)."""
EPOCH_CHUNK = 256 * 1024
"""Bytes read from a published file (off the loop) and sent per write: a file of up to
`ids.EPOCH_FILE_LIMIT` (64 MiB) is never held in memory whole."""


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
    """Cheap facts for `/healthz`: "ok" with a usable node connected, "degraded" (still 200)
    without.

    A coordinator without nodes still accepts and queues requests, so a probe must not
    restart it; "degraded" tells an operator that nothing will render until a node joins.
    `nodes` counts the usable ones; `nodesBarred` those connected but given no work
    (blacklisted or blocked), which render nothing either.
    """
    d = view.dispatcher
    links = list(d.nodes.values())
    nodes = sum(1 for link in links if d.usable(link))
    counts = d.job_counts()
    return {
        "status": "ok" if nodes else "degraded",
        "role": "coordinator",
        "peerId": view.peer_id,
        "signer": view.signer,
        "uptimeSeconds": round(time.monotonic() - view.started, 1),
        "nodes": nodes,
        "nodesBarred": len(links) - nodes,
        "queuedJobs": counts["queued"],
        "liveJobs": sum(counts.values()),
    }


def _error(status: int, code: str, reason: str) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": code, "reason": reason}, status_code=status)


_FILE_STATUS = {"bad_name": 400, "not_found": 404, "too_large": 413}


def _open_published(folder: EpochFolder, name: str) -> tuple[BinaryIO, int]:
    """Published file `name` opened for reading, and its size: the checks of
    `EpochFolder.read` (a strict name, a regular file inside the folder, never through a
    symlink, the size cap), without reading it. Blocking: run it in a worker thread."""
    from sogni_coordinator.epoch_serving import EpochFileError
    from sogni_protocol.relay_messages import check_file_name

    try:
        check_file_name(name)
    except ValueError as exc:
        raise EpochFileError("bad_name", str(exc)) from None
    path = folder.path / name
    missing = EpochFileError("not_found", f"no published file {path.name}")
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or not path.resolve().is_relative_to(folder.path.resolve()):
            raise missing
        # O_NOFOLLOW: a symlink put in its place since the check is refused, not followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:  # ELOOP: it became a symlink since the check
        if isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.errno == errno.ELOOP:
            raise missing from None
        raise
    f = os.fdopen(fd, "rb")
    size = os.fstat(fd).st_size
    if size > folder.file_limit:
        f.close()
        raise EpochFileError("too_large", f"{path.name} is {size} bytes, over {folder.file_limit}")
    return f, size


class _PublishedFiles:
    """`GET /epochs/{name}` (an ASGI app): at most `per_address` requests per client address
    at once (429 past it), then waits for one of `slots` (503 after `wait` seconds), then
    streams the file in `EPOCH_CHUNK`s read off the loop. The file must go at the libp2p
    path's minimum rate (`EpochFolder.transfer_deadline`: `epoch_serving.MIN_TRANSFER_RATE`
    after `TRANSFER_GRACE`): at its deadline the slot goes to the next request, even while a
    write to the slow client is still under way (hypercorn writes in a shielded scope), and
    the answer ends there, cut short (the connection closes after that write). The address's
    turn ends with its answer (a client that stops reading is dropped by the listener's send
    deadline)."""

    def __init__(
        self, view: CoordinatorView, slots: trio.Semaphore, wait: float, per_address: int
    ) -> None:
        self.view, self.slots, self.wait = view, slots, wait
        self.per_address = per_address
        self.fetching: dict[str, int] = {}
        """Requests per client address (`address_key`) being sent or waiting for a slot."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        folder = self.view.epochs
        if folder is None:
            await _error(404, "not_found", "this coordinator publishes no epochs")(
                scope, receive, send
            )
            return
        client = scope.get("client")
        who = address_key(str(client[0])) if client else ""
        if self.fetching.get(who, 0) >= self.per_address:
            busy = _error(
                429,
                "busy",
                f"at most {self.per_address} file(s) at a time per address: this address "
                "is fetching already",
            )
            busy.headers["Retry-After"] = "5"
            await busy(scope, receive, send)
            return
        self.fetching[who] = self.fetching.get(who, 0) + 1
        try:
            await self._answer(folder, str(scope["path_params"]["name"]), scope, receive, send)
        finally:
            left = self.fetching.pop(who) - 1
            if left > 0:
                self.fetching[who] = left

    async def _answer(
        self, folder: EpochFolder, name: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        from sogni_coordinator.epoch_serving import EpochFileError

        with trio.move_on_after(self.wait) as waited:
            await self.slots.acquire()
        if waited.cancelled_caught:
            busy = _error(503, "unavailable", "busy: try again shortly")
            busy.headers["Retry-After"] = "5"
            await busy(scope, receive, send)
            return
        slot = _Slot(self.slots)
        try:
            try:
                f, size = await trio.to_thread.run_sync(
                    _open_published, folder, name, limiter=folder.limiter
                )
            except EpochFileError as exc:
                await _error(_FILE_STATUS.get(exc.code, 400), exc.code, exc.reason)(
                    scope, receive, send
                )
                return
            with f:
                deadline = trio.current_time() + folder.transfer_deadline(size)
                streaming = trio.CancelScope(deadline=deadline)
                failed: Exception | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(slot.release_at, deadline)
                    try:
                        with streaming:
                            await _stream_file(f, size, folder.limiter, name, scope, send)
                    except Exception as exc:  # raised as it is, not in the nursery's group
                        failed = exc
                    nursery.cancel_scope.cancel()
                if failed is not None:
                    raise failed
                if streaming.cancelled_caught:  # too slow a reader: cut short
                    log.info("epoch_transfer_too_slow", file=name, bytes=size, via="http")
        finally:
            slot.release()


class _Slot:
    """A transfer slot taken from `slots`, given back once: at the transfer's deadline
    (`release_at`, from a task of its own: the transfer may be stuck in a shielded write) or
    when the answer ends, whichever comes first."""

    def __init__(self, slots: trio.Semaphore) -> None:
        self.slots = slots
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()

    async def release_at(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self.release()


async def _stream_file(
    f: BinaryIO, size: int, limiter: trio.CapacityLimiter, name: str, scope: Scope, send: Send
) -> None:
    # receipts batches are content-addressed (immutable); an epoch file is rewritten
    # (replaced: the open file stays whole) only while its root is not posted yet
    cache = b"public, max-age=31536000, immutable" if name.startswith("receipts/") else b"no-cache"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(size).encode()),
        (b"cache-control", cache),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if size == 0 or scope.get("method") == "HEAD":
        await send({"type": "http.response.body", "body": b""})
        return
    left = size
    while left > 0:
        chunk = await trio.to_thread.run_sync(f.read, min(EPOCH_CHUNK, left), limiter=limiter)
        if not chunk:  # truncated in place: the client gets a short body and fails its read
            return
        left -= len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})


def epoch_routes(
    view: CoordinatorView,
    *,
    transfers: int = EPOCH_TRANSFERS,
    wait: float = EPOCH_TRANSFER_WAIT,
    per_address: int = EPOCH_TRANSFERS_PER_ADDRESS,
) -> list[BaseRoute]:
    """`GET /epochs` and `GET /epochs/{name}` over `view.epochs`; at most `transfers` files
    are sent at once, and a request that waited `wait` seconds for its turn gets 503; at most
    `per_address` requests of one client address are served or waiting at once (429)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def index(request: Request) -> Response:
        if view.epochs is None:
            return _error(404, "not_found", "this coordinator publishes no epochs")
        after_text = request.query_params.get("after", "0")
        if not after_text.isdigit() or len(after_text) > 18:
            return _error(400, "bad_request", "after must be an epoch number")
        epochs, more = await view.epochs.index_async(int(after_text))
        body = {"epochs": msgspec.to_builtins(epochs), "more": more}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    files = _PublishedFiles(view, trio.Semaphore(transfers), wait, per_address)
    return [
        Route("/epochs", index, methods=["GET"]),
        Route("/epochs/{name:path}", files, methods=["GET"]),
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
