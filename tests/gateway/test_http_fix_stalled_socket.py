"""An SDK socket whose app stops reading ends its gateway session.

The gateway's writer wraps `ws.send_text` in `fail_after(SEND_TIMEOUT)`, but hypercorn
writes under a shielded cancel scope, so that deadline never reached a stuck write: before
the fix the session (its projects, its slot in `gateway.sockets`) lived for ever. Now the
listener's send deadline (`serve_http(send_timeout=...)`) drops the connection and the
session ends.
"""

from __future__ import annotations

import base64
import os
import socket
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import trio
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from sogni_coordinator.gateway.socket import serve_socket
from sogni_net.http import serve_http

MODELS = 200_000  # a swarmModels frame of several MB: more than the kernel buffers hold


class StubGateway:
    """What `serve_socket` and `Session` read of a gateway, with a huge swarm to send."""

    def __init__(self) -> None:
        self.sockets: dict[tuple[str, str], Any] = {}
        self.config = SimpleNamespace(
            frame_limit_bytes=256 * 1024,
            max_projects_per_socket=32,
            max_sockets_per_key=64,
            default_network="fast",
            public_url=None,
        )
        self.failed_auth = SimpleNamespace(blocked_async=self._not_blocked)
        self.round = 0
        self.ended = trio.Event()

    async def _not_blocked(self, _address: str) -> bool:
        return False

    async def authenticate(self, _secret: str | None, _address: str) -> Any:
        record = SimpleNamespace(key_id="k1", name="app", account="0x" + "11" * 20)
        return SimpleNamespace(key_id="k1", record=record, secret="sk")

    def swarm(self) -> dict[str, int]:
        self.round += 1  # a new frame every SWARM_POLL
        return {f"model-{i:06d}": self.round for i in range(MODELS)}

    async def balances(self, _account: str) -> dict[str, Any]:
        return {}

    async def untold(self, _key: Any, _app_id: str) -> list[Any]:
        return []


async def test_an_app_that_stops_reading_loses_its_session() -> None:
    gateway = StubGateway()

    async def endpoint(ws: WebSocket) -> None:
        try:
            await serve_socket(ws, cast(Any, gateway))
        finally:
            gateway.ended.set()

    app = Starlette(routes=[WebSocketRoute("/", endpoint)])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_http, app, "127.0.0.1:0", send_timeout=0.5))
        with trio.socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await client.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            key = base64.b64encode(os.urandom(16)).decode()
            await client.send(
                (
                    "GET /?appId=app HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\napi-key: sk\r\n\r\n"
                ).encode()
            )
            head = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await client.recv(1024)
            assert head.startswith(b"HTTP/1.1 101")
            # the app reads nothing more; its session must end, and free its slot
            with trio.fail_after(15):  # before the fix: never
                await gateway.ended.wait()
            assert gateway.sockets == {}
        nursery.cancel_scope.cancel()
