"""Inbound libp2p connections: a slot per open connection, caps per remote IP.

py-libp2p 0.8.1 held each inbound slot until the swarm stopped, so a host accepted 250
inbound connections in its life and then none (250 `sogni render` runs locked a coordinator
out); and 250 silent TCP sockets from one address held every slot for 10 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader

from sogni_net import Host, InboundLimits, open_host

OTHER_IP = "127.0.0.2"
"""Another source address on the loopback interface (Linux routes all of 127/8 there)."""


class Dialer:
    """A bare libp2p dialer with a fresh identity: TCP, Noise, yamux, nothing else (a whole
    client host per connection would take 4x as long)."""

    def __init__(self, server: Host) -> None:
        addr = multiaddr.Multiaddr(server.addrs[0])
        self.addr = addr.decapsulate_code(multiaddr.protocols.P_P2P)
        self.peer = ID.from_base58(server.peer_id)

    async def connect(self, source: str | None = None) -> Yamux:
        noise = NoiseTransport(
            create_new_key_pair(), noise_privkey=create_x25519_key_pair().private_key
        )
        upgrader = TransportUpgrader(
            {TProtocol(NOISE_PROTOCOL): noise}, {TProtocol(YAMUX_PROTOCOL): Yamux}
        )
        tcp = TCP()
        if source is None:
            raw = await tcp.dial(self.addr)
        else:
            raw = await tcp.dial_with_source(self.addr, (source, 0))
        try:
            secured = await upgrader.upgrade_security(raw, True, self.peer)
            muxed = await upgrader.upgrade_connection(secured, self.peer)
        except BaseException:
            await raw.close()
            raise
        assert isinstance(muxed, Yamux)
        return muxed


async def _silent_socket(port: int, source: str) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _answers(server: Host) -> None:
    async with open_host(key_path=None, listen=()) as probe:
        assert await probe.ping(server.addrs[0], timeout=5) < 2


async def _wait_until_alone(server: Host) -> None:
    with trio.fail_after(20):
        while server.connected_peers():
            await trio.sleep(0.05)


@asynccontextmanager
async def _server(limits: InboundLimits | None = None) -> AsyncIterator[Host]:
    async with open_host(key_path=None, inbound_limits=limits) as server:
        yield server


async def test_connections_that_come_and_go_give_their_slots_back() -> None:
    """300 connections, one after the other (more than py-libp2p's 250 inbound slots), each
    closed as a `sogni render` client closes its own: every one is served, and so is the
    next client."""
    async with open_host(key_path=None) as server:
        dialer = Dialer(server)
        for cycle in range(300):
            try:
                muxed = await dialer.connect()
            except Exception as exc:
                pytest.fail(f"connection {cycle} refused: {exc!r}")
            await muxed.secured_conn.close()
        await _wait_until_alone(server)
        await _answers(server)


async def test_silent_sockets_from_one_address_leave_room_for_others() -> None:
    """260 TCP sockets from one address that never start Noise: those over its handshake cap
    are closed at once; a client from another address connects meanwhile."""
    async with open_host(key_path=None) as server:
        port = int(multiaddr.Multiaddr(server.addrs[0]).value_for_protocol("tcp"))
        silent = [await _silent_socket(port, OTHER_IP) for _ in range(260)]
        try:
            with trio.fail_after(5):  # well before py-libp2p's 10 s upgrade timeout
                await _answers(server)
            closed = 0
            with trio.move_on_after(3):
                for sock in silent:
                    if await sock.receive_some(1) == b"":
                        closed += 1
            assert closed >= 260 - InboundLimits().handshakes_per_ip
        finally:
            for sock in silent:
                await sock.aclose()


async def test_one_address_holds_at_most_its_share_of_connections() -> None:
    limits = InboundLimits(connections_per_ip=4)
    async with _server(limits) as server:
        assert server.inbound is not None
        dialer = Dialer(server)
        held = [await dialer.connect(OTHER_IP) for _ in range(4)]
        with trio.fail_after(5):
            while server.inbound.established.get(OTHER_IP, 0) < 4:
                await trio.sleep(0.01)
        with pytest.raises(Exception):  # noqa: B017 (closed before Noise: py-libp2p says so variously)
            await dialer.connect(OTHER_IP)
        assert server.inbound.refused >= 1
        await _answers(server)  # another address: served
        for muxed in held:
            await muxed.secured_conn.close()
        with trio.fail_after(10):
            while server.inbound.established.get(OTHER_IP, 0):
                await trio.sleep(0.01)
        held.append(await dialer.connect(OTHER_IP))  # room again once they went
        await held[-1].secured_conn.close()


async def test_slots_are_counted_while_connections_are_open() -> None:
    limits = InboundLimits(connections=3)
    async with _server(limits) as server:
        assert server.inbound is not None
        dialer = Dialer(server)
        held = [await dialer.connect() for _ in range(3)]
        with trio.fail_after(5):
            while server.inbound.slots.borrowed_tokens < 3:
                await trio.sleep(0.01)
        with pytest.raises(Exception):  # noqa: B017
            await dialer.connect()
        for muxed in held:
            await muxed.secured_conn.close()
        with trio.fail_after(10):
            while server.inbound.slots.borrowed_tokens:
                await trio.sleep(0.01)
        assert not server.inbound.established and not server.inbound.handshaking
        await _answers(server)
