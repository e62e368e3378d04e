"""A node session that fell back to libp2p (the coordinator was too busy to answer the
direct-port query in time) moves to a direct channel later: it drains (Ready 0), finishes the
job it holds, waits for its ack, says goodbye, and the next session is direct.

The real pull loop (`pull_forever`) against the scripted coordinator of
`test_node_resilience`, here with a direct listener whose port query fails until the test
lets it answer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from eth_account import Account

from sogni_net import Channel, open_host
from sogni_net.direct import DIRECT_PROTOCOL
from sogni_node import pull
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, JOBS_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Goodbye,
    NodeHello,
    Ready,
    Result,
    ResultAck,
    Welcome,
)

from .test_node_resilience import DOMAIN, Coordinator, CountingBackend, Link, node


@asynccontextmanager
async def _coordinator(answer_port: trio.Event) -> AsyncIterator[Coordinator]:
    acct = Account.create()
    send, receive = trio.open_memory_channel[Link](math.inf)

    async def on_node(channel: Channel) -> None:
        hello = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(hello, NodeHello)
        await channel.send(
            Welcome(
                coordinator=acct.address,
                chain_id=DOMAIN.chain_id,
                verifying_contract=DOMAIN.verifying_contract,
                heartbeat_interval=0.5,
            )
        )
        link = Link(channel)
        await send.send(link)
        await link.done.wait()

    async with open_host(key_path=None, listen=["/ip4/127.0.0.1/tcp/0"], direct=True) as host:
        answer = host._answer_direct_port

        async def port_query(channel: Channel) -> None:
            if not answer_port.is_set():  # too busy: the query fails, the node uses libp2p
                await channel.reset()
                return
            await answer(channel)

        host.set_stream_handler(DIRECT_PROTOCOL, port_query)
        host.set_stream_handler(JOBS_PROTOCOL, on_node, direct=True)
        yield Coordinator(host.addrs[0], bytes(acct.key), acct.address, receive)


async def _next_ready(link: Link) -> Ready:
    while True:
        msg = await link.channel.receive(limit=RESULT_FRAME_LIMIT, timeout=20)
        if isinstance(msg, Ready):
            return msg


async def test_a_libp2p_session_moves_to_a_direct_channel_without_dropping_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull, "MOVE_CHECK_INTERVAL", 0.2)
    answer_port = trio.Event()
    backend = CountingBackend()
    backend.hold.clear()  # the job renders until the test lets it finish
    async with _coordinator(answer_port) as coord, node(tmp_path, coord, backend):
        first = await coord.link()
        assert not first.channel.direct  # the port query failed: libp2p
        offer = coord.offer(seed=1)
        await first.channel.send(offer)
        assert await trio.to_thread.run_sync(backend.started.wait, 20)
        answer_port.set()  # the coordinator answers now: the session drains
        with trio.fail_after(20):
            while (await _next_ready(first)).slots != 0:
                pass
        backend.hold.set()
        result = await first.next(Result)
        assert result.job_id == offer.offer.job_id  # the job held was finished here
        await first.channel.send(ResultAck(job_id=result.job_id, accepted=True))
        goodbye = await first.next(Goodbye)
        assert goodbye.reason == "moving to a direct channel"
        first.done.set()
        second = await coord.link()
        assert second.channel.direct
        second.done.set()
    assert backend.calls == 1
