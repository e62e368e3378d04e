"""The daemons' HTTP listener: an ASGI app served by hypercorn's trio worker.

Why here: the listener is transport, like the libp2p host, and both daemons need the same
bind, report and shutdown behaviour; each daemon builds its own app (routes) on top.
hypercorn and starlette (the `http` extra) are imported only when a listener starts, so
`import sogni_net` works without them.

`listen` is `host:port`, `[ipv6]:port` or `off`; port 0 picks a free port, and the bound URL
(with the real port) is what `serve_http` reports. We bind the socket ourselves and hand it
to hypercorn as `fd://N`, so a taken port fails here with a plain error, before any task
starts, and IPv6 literals need no guessing by hypercorn's bind parser.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from sogni_net._log import log_event
from sogni_net.errors import ListenError, TransportError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp
    from trio_typing import TaskStatus  # trio-typing's stubs shadow trio's own types

__all__ = [
    "HEALTHY",
    "LISTEN_OFF",
    "Endpoint",
    "SlowBody",
    "health_endpoint",
    "parse_listen",
    "read_body",
    "require_http_extra",
    "serve_http",
]

LISTEN_OFF = "off"
"""The `http_listen` value that disables the listener (the caller skips `serve_http`)."""

HEALTHY = frozenset({"ok", "degraded"})
"""`/healthz` statuses answered with 200; anything else (e.g. "draining") gets 503."""

Endpoint = Callable[["Request"], Awaitable["Response"]]

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_BACKLOG = 128
_NO_EXTRA = (
    "the HTTP listener needs hypercorn and starlette: install the `http` extra "
    "(pip install 'sogni-supernet[http]') or set http_listen = off"
)


def parse_listen(text: str) -> tuple[str, int] | None:
    """`host:port` -> (host, port); `[v6]:port` -> (v6, port); `off` -> None.

    Raises ValueError saying what is wrong; config classes prefix it with the field name.
    """
    value = text.strip()
    if value.lower() == LISTEN_OFF:
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port, [ipv6]:port or off")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: port must be 0-65535 (0 picks a free port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    return host, int(port_text)


def require_http_extra() -> None:
    """Raise a TransportError that says what to install when hypercorn or starlette is missing.

    Daemons call it before building their app, so the operator reads the fix, not a bare
    ModuleNotFoundError.
    """
    try:
        import hypercorn.trio  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise TransportError(_NO_EXTRA) from None


async def _bind(host: str, port: int, listen: str) -> socket.socket:
    """A listening TCP socket on (host, port); resolves a host name to its first address."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(f"cannot listen for HTTP on {listen}: {exc}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen for HTTP on {listen}: {exc.strerror or exc}") from None
    return sock


async def serve_http(
    app: ASGIApp,
    listen: str,
    *,
    task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listen` until cancelled; `task_status.started(url)` gives the bound URL.

    Start it with `nursery.start` in the daemon's nursery: it binds before reporting started,
    so a URL in hand is already accepting connections, and cancelling the nursery stops it.
    """
    where = parse_listen(listen)
    if where is None:
        raise ValueError("http_listen is off: the caller should not start the listener")
    require_http_extra()
    from hypercorn.config import Config
    from hypercorn.trio import serve

    sock = await _bind(*where, listen)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here on
    config.accesslog = None
    # Through the application's logging (JSON, redaction), not hypercorn's own stderr handler.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = 1.0
    config.websocket_max_message_size = 1 << 20  # the SDK gateway's own frame limit is lower
    config.websocket_ping_interval = 20.0  # dead sockets are noticed, not kept forever
    # No `read_timeout`: hypercorn applies it to every read, so a download longer than it
    # (the client sends nothing meanwhile) would be cut; bodies have `read_body`'s deadline.
    asgi = cast(Any, app)  # hypercorn's ASGI types are narrower than starlette's
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, asgi, config, mode="asgi"))
        url = binds[0]
        log_event(logging.INFO, "http_started", url=url)
        task_status.started(url)


def health_endpoint(facts: Callable[[], Mapping[str, object]]) -> Endpoint:
    """A `/healthz` endpoint: `facts()` as JSON, 200 if its `status` is in HEALTHY, else 503.

    `facts` runs on the trio thread per request: keep it to counters already in memory.
    """
    from starlette.responses import JSONResponse

    async def healthz(_request: Request) -> Response:
        body = dict(facts())
        code = 200 if body.get("status") in HEALTHY else 503
        return JSONResponse(body, status_code=code, headers={"Cache-Control": "no-store"})

    return healthz


class SlowBody(Exception):
    """A request body did not arrive within its deadline (`read_body`): a client trickling
    bytes would otherwise hold its connection, and a worker, for as long as it likes."""


BODY_SECONDS = 10.0
"""How long a request body (a few KiB at most here) may take to arrive."""


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes | None:
    """The request's body, or None as soon as it is known to exceed `limit` bytes (its
    declared length, or what arrived): starlette's own `body()` and `json()` read a body of
    any size into memory. `SlowBody` if it takes over `timeout` (`BODY_SECONDS`) seconds."""
    timeout = BODY_SECONDS if timeout is None else timeout
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    with trio.move_on_after(timeout) as deadline:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
    if deadline.cancelled_caught:
        raise SlowBody(f"the request body did not arrive within {timeout:g} s")
    return bytes(body)
