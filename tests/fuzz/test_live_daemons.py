"""Malformed streams on every protocol a live coordinator and a live node serve.

The daemons run in-process (real libp2p on 127.0.0.1, real diffusers, real SQLite). The
protocol list comes from identify at run time, so a protocol registered later is fuzzed
without editing this file. Every payload kind goes to every protocol once (a short run;
`python -m bench fuzz` sends thousands). Afterwards both daemons answer ping, a render that
was accepted before the barrage has all its images, and a new render succeeds.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from bench.fuzz import KINDS, barrage, sample_messages, served_protocols
from sogni_app.api import RenderResult, render
from sogni_net import ChannelClosed, Host, open_host
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_protocol.ids import CLIENT_PROTOCOL, JOBS_PROTOCOL
from sogni_protocol.messages import NodeHello
from sogni_wallet.keystore import Wallet
from tests.e2e.conftest import MODEL, Net, rogue_node, start_net, tiny_request

LIBP2P_PROTOCOLS = {"/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0", "/meshsub/1.1.0"}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sogni_node.models.defaults import default_registry
    from sogni_node.render.diffusers_backend import DiffusersBackend

    registry = default_registry(tmp_path_factory.mktemp("models"), test_model=True)
    return DiffusersBackend(registry, device="cpu", threads=1)


@asynccontextmanager
async def live_pair(tmp: Path, backend: Any) -> AsyncIterator[tuple[Net, Host]]:
    """A coordinator and one node connected to it; yields the node's own libp2p host."""
    async with start_net(tmp, heartbeat_timeout=10.0) as net:
        acct = Account.create()
        config = NodeConfig(
            data_dir=tmp / "node",
            coordinators=[net.addr],
            trusted_coordinators=[net.signer.address],
            threads=1,
            heartbeat_interval=0.5,
            heartbeat_timeout=10.0,
            http_listen="off",
        )
        connected, stop = trio.Event(), trio.Event()

        def on_event(event: dict[str, object]) -> None:
            if event["event"] == "connected":
                connected.set()

        node_host: Host = await net.nursery.start(
            functools.partial(
                run_node,
                config,
                Wallet(acct.address, bytes(acct.key)),
                backend,
                [MODEL],
                stop=stop,
                on_event=on_event,
            )
        )
        with trio.fail_after(30):
            await connected.wait()
        try:
            yield net, node_host
        finally:
            stop.set()


async def test_every_protocol_of_both_daemons_survives_malformed_streams(
    tmp_path: Path, backend: Any
) -> None:
    async with live_pair(tmp_path, backend) as (net, node_host):
        earlier: list[RenderResult] = []

        async def render_in_flight() -> None:
            earlier.append(await render(net.addr, tiny_request(2, seed=7)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(render_in_flight)
            targets = {"coordinator": net.addr, "node": node_host.addrs[0]}
            async with open_host(key_path=None, listen=()) as hostile:
                for name, addr in targets.items():
                    protocols = await served_protocols(hostile, addr)
                    assert set(protocols) >= LIBP2P_PROTOCOLS, (name, protocols)
                    if name == "coordinator":
                        assert {JOBS_PROTOCOL, CLIENT_PROTOCOL} <= set(protocols)
                    for protocol in protocols:
                        tally = await barrage(
                            hostile, addr, protocol, len(KINDS), concurrency=4, wait=1.0
                        )
                        assert tally.streams == len(KINDS)
                        # No stream is left dangling by a failure: each one the daemon did not
                        # answer is one whose bytes form a valid prefix it is waiting past.
                        assert tally.outcomes["dial_failed"] == 0, (name, protocol, tally)
                        assert tally.refused + tally.outcomes["no_answer"] == tally.streams
                # The same payloads on the coordinator's direct channels (its hot protocols
                # without yamux): the same channel code, behind its own listener.
                for protocol in (JOBS_PROTOCOL, CLIENT_PROTOCOL):
                    tally = await barrage(
                        hostile, net.addr, protocol, len(KINDS), concurrency=4, wait=1.0,
                        direct=True,
                    )  # fmt: skip
                    assert tally.outcomes["dial_failed"] == 0, (protocol, tally)
                    assert tally.refused + tally.outcomes["no_answer"] == tally.streams
                # They did go direct: the coordinator's direct port is known and was used.
                assert net.addr.rpartition("/p2p/")[2] in hostile._direct_ports

            async with open_host(key_path=None, listen=()) as probe:
                for addr in targets.values():
                    assert await probe.ping(addr, timeout=10) < 5
            with trio.fail_after(60):
                fresh = await render(net.addr, tiny_request(1, seed=9))
            assert len(fresh.images) == 1 and not fresh.failed
        # The request accepted before the barrage lost nothing.
        assert len(earlier) == 1 and len(earlier[0].images) == 2 and not earlier[0].failed


async def test_wrong_message_at_each_step_of_the_jobs_protocol(tmp_path: Path) -> None:
    """After a valid hello, every message type a node must not send resets the stream; the
    coordinator keeps serving (checked by a second rogue node's handshake)."""
    wrong = [m for m in sample_messages() if not isinstance(m, NodeHello)][::3]
    async with start_net(tmp_path) as net:
        for message in wrong:
            async with rogue_node(net) as (channel, _):
                await channel.send(message)
                with trio.fail_after(10), pytest.raises(ChannelClosed):
                    while True:  # heartbeats may come first; the stream must then end
                        await channel.receive(timeout=10)
        async with rogue_node(net) as (channel, _):
            assert channel.remote_peer_id == net.coordinator.peer_id
