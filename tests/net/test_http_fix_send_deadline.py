"""`sogni_net.serve_http` against clients that stop reading.

hypercorn's trio worker writes under a shielded cancel scope with no deadline: before the fix
a client that asked for a large answer and never read it held its connection task for ever,
and cancelling the server (a daemon's SIGTERM) never completed, so the daemons' `finally`
blocks (queued database writes) never ran.
"""

from __future__ import annotations

import socket
from functools import partial

import httpx
import trio
import trio.testing
from starlette.types import Receive, Scope, Send

from sogni_net.http import SHUTDOWN_GRACE, serve_http

BIG = 16 << 20  # far more than the kernel buffers of both ends hold


class App:
    """A raw ASGI app: `/big` answers BIG bytes in one write, `/small` a few."""

    def __init__(self) -> None:
        self.big_started = trio.Event()
        self.big_returned = trio.Event()
        self.small_served = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b"x" * BIG if scope["path"] == "/big" else b"small"
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["path"] == "/big":
            self.big_started.set()
            await send({"type": "http.response.body", "body": body})
            self.big_returned.set()  # the write ended (hypercorn drops sends to a lost client)
        else:
            self.small_served.set()
            await send({"type": "http.response.body", "body": body})


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _non_reader(port: int, path: str = "/big") -> trio.socket.SocketType:
    """A client that sends its request and then reads nothing (a tiny receive buffer)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    await sock.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def _read_to_end(sock: trio.socket.SocketType) -> int:
    """Bytes the client gets before the connection ends (EOF or reset)."""
    total = 0
    while True:
        try:
            chunk = await sock.recv(1 << 20)
        except ConnectionResetError:
            return total
        if not chunk:
            return total
        total += len(chunk)


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    app = App()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_http, app, "127.0.0.1:0", send_timeout=0.5))
        with await _non_reader(_port(url)) as client:
            with trio.fail_after(10):  # before the fix: never (the write waits for ever)
                await app.big_returned.wait()
                got = await _read_to_end(client)
        assert got < BIG  # cut off, not delivered
        nursery.cancel_scope.cancel()


async def test_a_slow_client_that_keeps_reading_gets_everything() -> None:
    """The deadline is on progress, not on the whole write: pauses shorter than it pass,
    although the answer takes longer than the deadline to read."""
    app = App()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_http, app, "127.0.0.1:0", send_timeout=1.0))
        with trio.socket.socket() as client:
            await client.connect(("127.0.0.1", _port(url)))
            await client.send(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            started = trio.current_time()
            received = bytearray()
            with trio.fail_after(30):
                while chunk := await client.recv(1 << 20):
                    received += chunk
                    if len(received) // (2 << 20) != (len(received) - len(chunk)) // (2 << 20):
                        await trio.sleep(0.2)  # a pause after every 2 MiB
        _head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert len(body) == BIG and app.big_returned.is_set()
        assert trio.current_time() - started > 1.0  # longer than the deadline in all
        nursery.cancel_scope.cancel()


async def test_shutdown_completes_with_a_client_that_never_reads() -> None:
    app = App()
    late = False
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as server:
            # the default send timeout (30 s): shutdown must not wait for it
            url = await server.start(serve_http, app, "127.0.0.1:0")
            client = await _non_reader(_port(url))
            await app.big_started.wait()
            await trio.testing.wait_all_tasks_blocked(0.1)  # the write is stuck now

            async def rescue() -> None:
                """Before the fix the cancel never completed (and no deadline reaches into
                hypercorn's shield): the client's reset ends the write, so the test fails
                instead of hanging."""
                nonlocal late
                await trio.sleep(SHUTDOWN_GRACE + 5)
                late = True
                client.close()

            outer.start_soon(rescue)
            server.cancel_scope.cancel()  # SIGTERM
        # here a daemon's `finally` flushes its queued database writes
        outer.cancel_scope.cancel()
    client.close()
    assert not late and not app.big_returned.is_set()


async def test_connections_past_the_cap_wait_until_one_closes() -> None:
    app = App()
    answers: list[httpx.Response] = []
    answered = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_http, app, "127.0.0.1:0", max_connections=1))
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:

            async def small() -> None:
                answers.append(await http.get("/small"))
                answered.set()

            with await _non_reader(_port(url)):  # takes the one slot
                with trio.fail_after(5):
                    await app.big_started.wait()
                nursery.start_soon(small)
                await trio.testing.wait_all_tasks_blocked(0.2)
                assert not app.small_served.is_set()  # waits in the backlog, not accepted
            # the holder is gone (reset): its connection ends and its slot frees
            with trio.fail_after(10):
                await answered.wait()
        assert answers[0].status_code == 200 and answers[0].content == b"small"
        nursery.cancel_scope.cancel()
