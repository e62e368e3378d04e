"""The daemons' HTTP listener: an ASGI app served by hypercorn's trio worker.

Why here: the listener is transport, like the libp2p host, and both daemons need the same
bind, report and shutdown behaviour; each daemon builds its own app (routes) on top.
hypercorn and starlette (the `http` extra) are imported only when a listener starts, so
`import sogni_net` works without them.

`listen` is `host:port`, `[ipv6]:port` or `off`; port 0 picks a free port, and the bound URL
(with the real port) is what `serve_http` reports. We bind the socket ourselves, so a taken
port fails here with a plain error, before any task starts, and IPv6 literals need no
guessing by hypercorn's bind parser.

We also accept the connections ourselves and hand each to hypercorn's own connection handler
(`hypercorn.trio.tcp_server.TCPServer`, hypercorn pinned at 0.18.0), because its trio worker
writes to a socket under a shielded cancel scope with no deadline: a client that stops reading
would hold its connection task, and the server's shutdown (so the daemon's `finally` blocks
that flush queued database writes), for ever. Here every write gives up after `SEND_TIMEOUT`
seconds without progress, shutdown closes what is still open after `SHUTDOWN_GRACE`, and at
most `max_connections` are served at once (hypercorn has no such setting).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
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
    "SEND_TIMEOUT",
    "SHUTDOWN_GRACE",
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

SEND_TIMEOUT = 30.0
"""Seconds a write to a client may go without the client taking a byte (it stopped reading,
or its network died) before its connection is closed. Progress resets it, so a long download
to a slow but live client is never cut."""

SHUTDOWN_GRACE = 2.0
"""On shutdown, how long the apps' last words (the gateway's 1012 close) may take before the
connections still open are closed under them."""

MAX_CONNECTIONS = 4096
"""Upper bound of the default connection cap (`default_max_connections`)."""

_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() failures that pass (out of descriptors or memory): wait a moment and go on."""

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


def default_max_connections() -> int:
    """Half the process's open-file limit (libp2p and the database need the rest), at most
    `MAX_CONNECTIONS`: past the limit accept() fails anyway, and so would everything else."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no rlimits (Windows)
        return 1024
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class _SendDeadline(trio.abc.HalfCloseableStream):
    """A client connection whose writes give up after `timeout` seconds without progress.

    hypercorn calls `send_all` inside `CancelScope(shield=True)`: a deadline outside it (the
    server's cancellation, an app's `fail_after`) never reaches the write, but a deadline set
    in here does. On a stall the socket is closed, which also wakes the connection's reader;
    hypercorn takes the BrokenResourceError as a client that went away (an app's later sends
    are dropped, a WebSocket app receives `websocket.disconnect`).
    """

    def __init__(self, stream: trio.SocketStream, timeout: float) -> None:
        self.stream = stream
        self.socket = stream.socket  # hypercorn reads the addresses from it (and no SSL)
        self.timeout = timeout

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            if not view:
                await self.stream.send_all(b"")
                return
            sent = 0
            while sent < len(view):
                with trio.move_on_after(self.timeout) as stalled:
                    try:
                        with view[sent:] as rest:
                            sent += await self.socket.send(rest)
                    except OSError as exc:
                        if exc.errno == errno.EBADF:  # closed under us (shutdown, the reader)
                            raise trio.ClosedResourceError("the connection was closed") from None
                        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
                if stalled.cancelled_caught:
                    self.socket.close()
                    log_event(logging.INFO, "http_client_stalled", seconds=self.timeout)
                    raise trio.BrokenResourceError(
                        f"the client took no data for {self.timeout:g} s"
                    )

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Connections:
    """The open client connections, so shutdown can wait for them and close the rest."""

    def __init__(self, limit: int) -> None:
        self.slots = trio.Semaphore(limit)
        self.open: set[trio.SocketStream] = set()
        self._changed = trio.lowlevel.ParkingLot()

    def add(self, stream: trio.SocketStream) -> None:
        self.open.add(stream)

    def discard(self, stream: trio.SocketStream) -> None:
        stream.socket.close()
        self.open.discard(stream)
        self.slots.release()
        self._changed.unpark_all()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for the connections to end, then close the rest (a
        shielded write wakes with ClosedResourceError). Runs while being cancelled."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + grace
            while self.open:
                await self._changed.park()
        for stream in list(self.open):
            stream.socket.close()


async def serve_http(
    app: ASGIApp,
    listen: str,
    *,
    send_timeout: float = SEND_TIMEOUT,
    max_connections: int | None = None,
    task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listen` until cancelled; `task_status.started(url)` gives the bound URL.

    Start it with `nursery.start` in the daemon's nursery: it binds before reporting started,
    so a URL in hand is already accepting connections, and cancelling the nursery stops it
    within `SHUTDOWN_GRACE` seconds whatever the clients do. A write that makes no progress
    for `send_timeout` seconds drops its connection; past `max_connections` open connections
    (default `default_max_connections()`) new ones wait in the listen backlog.
    """
    where = parse_listen(listen)
    if where is None:
        raise ValueError("http_listen is off: the caller should not start the listener")
    require_http_extra()
    from hypercorn.config import Config
    from hypercorn.trio.lifespan import Lifespan
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState
    from hypercorn.utils import repr_socket_addr, wrap_app

    limit = default_max_connections() if max_connections is None else max_connections
    if limit < 1 or send_timeout <= 0:
        raise ValueError("max_connections and send_timeout must be positive")
    sock = await _bind(*where, listen)
    url = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    config = Config()
    config.accesslog = None
    # Through the application's logging (JSON, redaction), not hypercorn's own stderr handler.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.websocket_max_message_size = 1 << 20  # the SDK gateway's own frame limit is lower
    config.websocket_ping_interval = 20.0  # dead sockets are noticed, not kept forever
    # No `read_timeout`: hypercorn applies it to every read, so a download longer than it
    # (the client sends nothing meanwhile) would be cut; bodies have `read_body`'s deadline,
    # idle connections hypercorn's `keep_alive_timeout`, writes `send_timeout`.
    asgi = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    state: dict[str, Any] = {}
    conns = _Connections(limit)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            guarded = cast(Any, _SendDeadline(stream, send_timeout))
            await TCPServer(asgi, config, context, ConnectionState(state.copy()), guarded).run()
        finally:
            conns.discard(stream)

    async def accept(nursery: trio.Nursery) -> None:
        try:
            while True:
                await conns.slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    conns.slots.release()
                    if exc.errno not in _ACCEPT_RETRY:
                        raise
                    log_event(logging.WARNING, "http_accept_failed", error=exc.strerror)
                    await trio.sleep(0.1)
                    continue
                conns.add(stream)
                nursery.start_soon(connection, stream)
        finally:
            listener.socket.close()
            await conns.drain(SHUTDOWN_GRACE)

    try:
        async with trio.open_nursery() as nursery:
            lifespan = Lifespan(asgi, config, state)
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            nursery.start_soon(accept, nursery)
            log_event(logging.INFO, "http_started", url=url)
            task_status.started(url)
    finally:
        listener.socket.close()


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
