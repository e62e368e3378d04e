"""Fixtures for transport tests: a server host whose handlers report what they saw."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

import pytest
import trio

from sogni_net import Channel, Handler, Host, open_host
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT


@dataclass
class Server:
    ECHO: ClassVar[str] = "/sogni-test/echo/1.0.0"
    """Echoes every typed message; reports each message or the error that ended the channel."""
    BIG: ClassVar[str] = "/sogni-test/big/1.0.0"
    """Like ECHO, with the 32 MiB result limit on receive and send."""
    SILENT: ClassVar[str] = "/sogni-test/silent/1.0.0"
    """Accepts the channel and never answers (until the peer goes away)."""
    CRASH: ClassVar[str] = "/sogni-test/crash/1.0.0"
    """Raises on the first message it receives."""

    host: Host
    events: trio.MemoryReceiveChannel[object]
    """Each message a handler received, then the exception (or None) that ended it."""

    async def next_event(self, timeout: float = 5.0) -> object:
        with trio.fail_after(timeout):
            return await self.events.receive()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    send, receive = trio.open_memory_channel[object](math.inf)

    def echo_with(limit: int) -> Handler:
        async def echo(channel: Channel) -> None:
            try:
                while True:
                    message = await channel.receive(limit=limit, timeout=10)
                    send.send_nowait(message)
                    await channel.send(message, limit=limit)
            except Exception as exc:
                send.send_nowait(exc)
                raise

        return echo

    async def silent(channel: Channel) -> None:
        await trio.sleep_forever()

    async def crash(channel: Channel) -> None:
        # Not at once: a reset that races stream negotiation fails the dial instead.
        await channel.receive(timeout=10)
        raise RuntimeError("handler bug")

    handlers = {
        Server.ECHO: echo_with(CONTROL_FRAME_LIMIT),
        Server.BIG: echo_with(RESULT_FRAME_LIMIT),
        Server.SILENT: silent,
        Server.CRASH: crash,
    }
    async with open_host(key_path=None, handlers=handlers) as host:
        yield Server(host, receive)


@pytest.fixture
async def client() -> AsyncIterator[Host]:
    async with open_host(key_path=None) as host:
        yield host


ChannelTo = Callable[[Handler], AbstractAsyncContextManager[Channel]]


@pytest.fixture
def channel_to(client: Host) -> ChannelTo:
    """`async with channel_to(handler) as channel`: a fresh server running `handler`."""

    @asynccontextmanager
    async def connect(handler: Handler) -> AsyncIterator[Channel]:
        async with (
            open_host(key_path=None, handlers={"/probe/1": handler}) as server,
            await client.open_channel(server.addrs[0], "/probe/1") as channel,
        ):
            yield channel

    return connect
