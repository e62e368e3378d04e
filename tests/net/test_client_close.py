"""A client host (no listeners: `render`, `collect`) leaves its block without py-libp2p's
fixed pauses: its close sleeps 0.1 s twice per connection (`Yamux.close`, `SwarmConn`), for
stream handlers a leaving host has already cancelled; `sogni_net.host._close` stops waiting
once every connection's socket is closed. Before, every render paid 0.2 s at its end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from sogni_net import open_host
from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from tests.net.conftest import Server


async def test_a_client_host_closes_without_the_libp2p_pauses(server: Server) -> None:
    with trio.fail_after(20):
        async with open_host(key_path=None, listen=()) as client:
            async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
                await channel.send(Heartbeat(seq=1))
                assert await channel.receive(timeout=5) == Heartbeat(seq=1)
            started = time.perf_counter()
        assert time.perf_counter() - started < 0.19  # py-libp2p's own close: >= 0.2 s
        assert await server.next_event() == Heartbeat(seq=1)
        assert await server.next_event() is not None  # the server's handler ended
        # and the server host serves the next client as before
        async with (
            open_host(key_path=None, listen=()) as again,
            await again.open_channel(server.host.addrs[0], server.ECHO) as channel,
        ):
            await channel.send(Heartbeat(seq=2))
            assert await channel.receive(timeout=5) == Heartbeat(seq=2)
