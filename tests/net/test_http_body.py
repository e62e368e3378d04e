"""`sogni_net.http.read_body`, what every POST route of the daemons reads its body with: a
size cap, and a deadline (a client trickling bytes held its connection for as long as it
liked; hypercorn has no per-body deadline of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sogni_net.http import SlowBody, read_body


async def _echo(request: Request) -> Response:
    try:
        body = await read_body(request, 100, timeout=0.3)
    except SlowBody as exc:
        return PlainTextResponse(str(exc), status_code=408)
    if body is None:
        return PlainTextResponse("too large", status_code=413)
    return PlainTextResponse(body.decode())


async def test_a_body_is_read_whole_capped_and_within_its_deadline() -> None:
    app = Starlette(routes=[Route("/", _echo, methods=["POST"])])

    async def trickled() -> AsyncIterator[bytes]:
        yield b"a"
        await trio.sleep(5)  # cancelled by the deadline: the test never waits this long
        yield b"b"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert (await client.post("/", content=b"abc")).text == "abc"
        assert (await client.post("/", content=b"x" * 101)).status_code == 413
        with trio.fail_after(3):
            slow = await client.post("/", content=trickled())
        assert slow.status_code == 408 and "within 0.3 s" in slow.text
