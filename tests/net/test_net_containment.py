"""No peer can stop a host: libp2p-level failures are contained per stream and per peer.

Before `sogni_net.containment`, four bytes that are not a pubsub RPC on /meshsub/1.1.0 ended
py-libp2p 0.8.1's swarm (docs/upstream/py-libp2p-pubsub-decodeerror-kills-swarm.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import libp2p
import pytest
import trio

from sogni_net import Channel, ChannelClosed, DialError, Host, ReadTimeout, open_host
from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from tests.net.conftest import Server

NOT_PROTOBUF = b"\x05\xff\xff\xff\xff\xff"  # varint length 5, then bytes protobuf refuses


async def _wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)  # polled state: py-libp2p offers no event for it


async def _answers(server: Server) -> None:
    """A fresh peer can ping the server and use one of its own channels."""
    async with open_host(key_path=None, listen=()) as probe:
        assert await probe.ping(server.host.addrs[0], timeout=5) < 2
        async with await probe.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=7))
            assert await channel.receive(timeout=5) == Heartbeat(seq=7)


async def _open(hostile: Host, addr: str, protocol: str) -> Channel:
    """Open a channel; a first DialError is the server dropping us for the last payload."""
    try:
        return await hostile.open_channel(addr, protocol)
    except DialError:
        await _wait_until(lambda: addr.rpartition("/p2p/")[2] not in hostile.connected_peers())
        return await hostile.open_channel(addr, protocol)


async def _send_and_wait_end(hostile: Host, addr: str, protocol: str, data: bytes) -> None:
    async with await _open(hostile, addr, protocol) as channel:
        await channel.send_unframed(data)
        await channel.close_write()
        try:
            await channel.drain(timeout=1)
        except (ChannelClosed, ReadTimeout):
            pass


async def test_every_registered_protocol_survives_bytes_that_break_it(server: Server) -> None:
    protocols = server.host.protocols()  # at run time: protocols added later are covered too
    assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/meshsub/1.1.0", server.ECHO} <= set(protocols)

    async def attack(protocol: str) -> None:
        # One hostile peer per protocol, all at once: being dropped for one payload does
        # not interfere with the other protocols' runs.
        async with open_host(key_path=None, listen=()) as hostile:
            for data in (NOT_PROTOBUF, b"\xff" * 10, b"\x00\x00\x00\x09abc", b""):
                await _send_and_wait_end(hostile, server.host.addrs[0], protocol, data)

    async with trio.open_nursery() as nursery:
        for protocol in protocols:
            nursery.start_soon(attack, protocol)
    await _answers(server)


async def test_a_peer_whose_bytes_break_pubsub_is_scored_down_and_disconnected(
    server: Server,
) -> None:
    async with (
        open_host(key_path=None, listen=()) as bystander,
        open_host(key_path=None, listen=()) as hostile,
    ):
        await bystander.connect(server.host.addrs[0])
        channel = await hostile.open_channel(server.host.addrs[0], "/meshsub/1.1.0")
        await channel.send_unframed(NOT_PROTOBUF)
        assert "reset" in await channel.drain(timeout=5)
        await _wait_until(lambda: server.host.strikes(hostile.peer_id) == 1)
        await _wait_until(lambda: hostile.peer_id not in server.host.connected_peers())
        await _wait_until(lambda: server.host.peer_id not in hostile.connected_peers())
        # Only the hostile peer lost its connection.
        assert bystander.peer_id in server.host.connected_peers()
        # It may come back (a fresh connection) and behave.
        assert await hostile.ping(server.host.addrs[0], timeout=5) < 2
    await _answers(server)


async def test_a_raising_libp2p_handler_resets_only_its_stream() -> None:
    """A handler registered straight on py-libp2p (as identify, ping and pubsub are) that
    raises: its stream is reset, the connection and the host carry on."""

    async def broken(stream: Any) -> None:
        await stream.read(1)
        raise RuntimeError("handler bug")

    async with open_host(key_path=None) as host, open_host(key_path=None) as peer:
        host._lp.set_stream_handler("/broken/1", broken)  # type: ignore[arg-type]
        await _send_and_wait_end(peer, host.addrs[0], "/broken/1", b"x")
        await _wait_until(lambda: host.strikes(peer.peer_id) == 1)
        await _wait_until(lambda: host.peer_id not in peer.connected_peers())
        assert await peer.ping(host.addrs[0], timeout=5) < 2  # reconnects; the host serves


async def test_another_libp2p_version_is_left_alone_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(libp2p, "__version__", "0.9.0")
    async with open_host(key_path=None) as host:
        assert host.strikes("anyone") == 0
    assert "libp2p_containment_disabled" in capsys.readouterr().out


async def test_one_peer_cannot_hold_more_than_its_share_of_streams(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-libp2p caps streams for the whole host only: one peer holding them all had every
    other peer's streams reset. Each peer's open inbound streams are capped now (its own
    pubsub and identify streams count too)."""
    from sogni_net import containment

    monkeypatch.setattr(containment, "MAX_STREAMS_PER_PEER", 8)
    addr = server.host.addrs[0]

    async def hold(host: Host, n: int) -> list[Channel]:
        held = []
        for _ in range(n):
            try:
                channel = await host.open_channel(addr, server.SILENT, timeout=5)
            except Exception:  # reset before the protocol was even agreed
                break
            held.append(channel)
        return held

    async with (
        open_host(key_path=None, listen=()) as greedy,
        open_host(key_path=None, listen=()) as bystander,
    ):
        held = await hold(greedy, 12)
        assert 4 <= len(held) < 8  # refused at its share, not before
        async with await bystander.open_channel(addr, server.ECHO) as channel:  # others: fine
            await channel.send(Heartbeat(seq=1))
            assert await channel.receive(timeout=5) == Heartbeat(seq=1)
        for channel in held:
            await channel.close()
