"""Direct channels (`sogni_net.direct`): Noise straight on TCP between two real hosts on
127.0.0.1, the same `Channel` semantics as over libp2p, and a fallback to libp2p whenever the
direct path is missing, refused, or answers with the wrong identity."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from sogni_net import Channel, ChannelClosed, Host, ReadTimeout, TransportError, open_host
from sogni_net import direct as direct_mod
from sogni_net.direct import DirectStream
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import Heartbeat, Result

ECHO = "/sogni-test/echo/1.0.0"
LIBP2P_ONLY = "/sogni-test/libp2p-only/1.0.0"
RESET = "/sogni-test/reset/1.0.0"
CLOSE = "/sogni-test/close/1.0.0"
STALL = "/sogni-test/stall/1.0.0"


@dataclass
class Served:
    host: Host
    seen: trio.MemoryReceiveChannel[object]


async def _echo(channel: Channel) -> None:
    while True:
        message = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=10)
        await channel.send(message, limit=RESULT_FRAME_LIMIT)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    send, receive = trio.open_memory_channel[object](math.inf)

    async def reset(channel: Channel) -> None:
        await channel.receive(timeout=10)
        await channel.reset()

    async def stall(channel: Channel) -> None:  # never reads
        await trio.sleep_forever()

    async def close(channel: Channel) -> None:
        send.send_nowait(channel.remote_peer_id)
        send.send_nowait(type(channel._stream).__name__)
        await channel.send(Heartbeat(seq=1))

    async with open_host(key_path=None, direct=True) as host:
        host.set_stream_handler(ECHO, _echo, direct=True)
        host.set_stream_handler(LIBP2P_ONLY, _echo)
        host.set_stream_handler(RESET, reset, direct=True)
        host.set_stream_handler(CLOSE, close, direct=True)
        host.set_stream_handler(STALL, stall, direct=True)
        yield Served(host, receive)


@pytest.fixture
async def client() -> AsyncIterator[Host]:
    async with open_host(key_path=None, listen=()) as host:
        yield host


def _big_result() -> Result:
    from tests.net.test_net_channel import _result

    return _result(os.urandom(1 << 20))


async def test_direct_channel_carries_frames_both_ways(served: Served, client: Host) -> None:
    assert served.host.direct_port is not None
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
        async with channel:
            assert isinstance(channel._stream, DirectStream)
            assert channel.remote_peer_id == served.host.peer_id
            for seq in range(3):
                await channel.send(Heartbeat(seq=seq))
                assert await channel.receive(timeout=5) == Heartbeat(seq=seq)
            # An image of 1 MiB spans many Noise messages (at most 65,519 bytes each).
            big = _big_result()
            await channel.send(big, limit=RESULT_FRAME_LIMIT)
            assert await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=10) == big


async def test_listener_sees_the_dialer_identity_and_a_fin(served: Served, client: Host) -> None:
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], CLOSE, direct=True)
        async with channel:
            assert await channel.receive(timeout=5) == Heartbeat(seq=1)
            # The handler returned: its channel closed gracefully (FIN), not reset.
            with pytest.raises(ChannelClosed, match="closed by peer"):
                await channel.receive(timeout=5)
        assert await served.seen.receive() == client.peer_id
        assert await served.seen.receive() == "DirectStream"


async def test_reset_reaches_the_other_side(served: Served, client: Host) -> None:
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], RESET, direct=True)
        async with channel:
            assert isinstance(channel._stream, DirectStream)
            await channel.send(Heartbeat(seq=1))
            with pytest.raises(ChannelClosed, match="reset"):
                await channel.receive(timeout=5)


async def test_a_write_stuck_on_a_peer_that_stopped_reading_ends_with_the_reset(
    served: Served, client: Host
) -> None:
    """After a write timeout the channel's reset was queued behind the stuck socket send,
    which never returned: its task and socket leaked until the host stopped (one per
    reconnect to a hung coordinator). The reset closes a direct channel's socket now."""
    with trio.fail_after(30):
        channel = await client.open_channel(served.host.addrs[0], STALL, direct=True)
        assert isinstance(channel._stream, DirectStream)
        big = _big_result()
        with pytest.raises(TransportError):
            for _ in range(1000):  # until the kernel's buffers are full and a write times out
                await channel.send(big, limit=RESULT_FRAME_LIMIT, timeout=1.0)
        await channel.reset()
        await channel._finished.wait()  # the writer task ended
        assert channel._stream._sock.socket.fileno() == -1  # and the socket is closed


async def test_read_deadline_holds_on_a_direct_channel(served: Served, client: Host) -> None:
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], CLOSE, direct=True)
        async with channel:
            assert await channel.receive(timeout=5) == Heartbeat(seq=1)
        channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
        async with channel:
            with pytest.raises(ReadTimeout):
                await channel.receive(timeout=0.3)


async def test_protocol_not_served_directly_falls_back_to_libp2p(
    served: Served, client: Host
) -> None:
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], LIBP2P_ONLY, direct=True)
        async with channel:
            assert not isinstance(channel._stream, DirectStream)
            await channel.send(Heartbeat(seq=5))
            assert await channel.receive(timeout=5) == Heartbeat(seq=5)


async def test_peer_without_a_direct_listener_gets_libp2p(client: Host) -> None:
    async with open_host(key_path=None) as plain:
        plain.set_stream_handler(ECHO, _echo, direct=True)  # served, but no direct listener
        assert plain.direct_port is None
        with trio.fail_after(20):
            channel = await client.open_channel(plain.addrs[0], ECHO, direct=True)
            async with channel:
                assert not isinstance(channel._stream, DirectStream)
                await channel.send(Heartbeat(seq=2))
                assert await channel.receive(timeout=5) == Heartbeat(seq=2)


async def test_a_listener_with_another_identity_is_never_used(served: Served, client: Host) -> None:
    """Point the client at an impostor's direct port for the served host: Noise proves the
    impostor's identity, the client refuses it and reaches the real peer over libp2p."""
    async with open_host(key_path=None, direct=True) as impostor:
        seen: list[str] = []

        async def record(channel: Channel) -> None:
            seen.append(channel.remote_peer_id)

        impostor.set_stream_handler(ECHO, record, direct=True)
        assert impostor.direct_port is not None
        client._direct_ports[served.host.peer_id] = impostor.direct_port
        with trio.fail_after(20):
            channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
            async with channel:
                assert channel.remote_peer_id == served.host.peer_id
                assert not isinstance(channel._stream, DirectStream)
                await channel.send(Heartbeat(seq=3))
                assert await channel.receive(timeout=5) == Heartbeat(seq=3)
        assert seen == []
        # The stale port was forgotten: the next channel asks again and goes direct.
        with trio.fail_after(20):
            channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
            async with channel:
                assert isinstance(channel._stream, DirectStream)


async def _raw_until_closed(port: int, data: bytes) -> bytes:
    """Send `data` to the direct port and read until the listener closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    async with stream:
        if data:
            await stream.send_all(data)
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            got += chunk
    return got


async def test_garbage_and_silence_are_dropped_and_the_listener_carries_on(
    served: Served, client: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = served.host.direct_port
    assert port is not None
    monkeypatch.setattr(direct_mod, "HANDSHAKE_TIMEOUT", 0.5)
    with trio.fail_after(20):
        # Not a Noise handshake: closed, nothing answered beyond the handshake's own bytes.
        await _raw_until_closed(port, b"\xff\xff" + b"junk" * 100)
        await _raw_until_closed(port, b"\x00\x05hello")
        # A connection that never speaks is closed at the handshake deadline.
        await _raw_until_closed(port, b"")
        channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
        async with channel:
            assert isinstance(channel._stream, DirectStream)
            await channel.send(Heartbeat(seq=9))
            assert await channel.receive(timeout=5) == Heartbeat(seq=9)


def test_endpoint_answer_is_checked() -> None:
    assert direct_mod.decode_endpoint(direct_mod.encode_endpoint(4001)) == 4001
    for bad in (b"", b"\x01\x0f", b"\x02\x0f\xa1", b"\x01\x00\x00", b"\x01\x0f\xa1\x00"):
        with pytest.raises(direct_mod.DialError):
            direct_mod.decode_endpoint(bad)


async def test_an_unreachable_direct_port_falls_back_and_is_not_retried_at_once(
    served: Served, client: Host
) -> None:
    """A firewalled or closed port costs one failed dial, then a minute of plain libp2p."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client._direct_ports[served.host.peer_id] = closed_port
    with trio.fail_after(20):
        for seq in (1, 2):
            channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
            async with channel:
                assert not isinstance(channel._stream, DirectStream)
                await channel.send(Heartbeat(seq=seq))
                assert await channel.receive(timeout=5) == Heartbeat(seq=seq)
            assert served.host.peer_id in client._direct_down
            assert served.host.peer_id not in client._direct_ports


async def test_a_slow_port_answer_still_gets_a_direct_channel(
    served: Served, client: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port query rides libp2p, like the fallback: when it is slow (a coordinator that
    many nodes dial at once) the dialer waits for it rather than settle for libp2p for the
    whole session. Only the direct dial has the short budget."""
    monkeypatch.setattr(direct_mod, "DIRECT_BUDGET", 0.2)
    answer = served.host._answer_direct_port

    async def slow_answer(channel: Channel) -> None:
        await trio.sleep(0.6)  # three times the dial budget
        await answer(channel)

    served.host.set_stream_handler(direct_mod.DIRECT_PROTOCOL, slow_answer)
    with trio.fail_after(20):
        channel = await client.open_channel(served.host.addrs[0], ECHO, timeout=10, direct=True)
        async with channel:
            assert isinstance(channel._stream, DirectStream)
            await channel.send(Heartbeat(seq=7))
            assert await channel.receive(timeout=5) == Heartbeat(seq=7)
    assert served.host.peer_id not in client._direct_down


async def test_one_address_gets_a_bounded_number_of_handshakes(
    served: Served, client: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent connections from one IP hold at most `HANDSHAKES_PER_IP` handshake slots; the
    next is closed at once, and the slots come back when those connections go."""
    port = served.host.direct_port
    assert port is not None
    monkeypatch.setattr(direct_mod, "HANDSHAKES_PER_IP", 2)
    with trio.fail_after(20):
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        while sum(served.host._handshaking.values()) < 2:
            await trio.sleep(0.01)  # both accepted and waiting for their handshake
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):  # well before the 5 s handshake deadline
            assert await extra.receive_some(1024) == b""
        await extra.aclose()
        for stream in silent:
            await stream.aclose()
        while served.host._handshaking:
            await trio.sleep(0.01)
        channel = await client.open_channel(served.host.addrs[0], ECHO, direct=True)
        async with channel:
            assert isinstance(channel._stream, DirectStream)
            await channel.send(Heartbeat(seq=3))
            assert await channel.receive(timeout=5) == Heartbeat(seq=3)


async def test_one_address_holds_a_bounded_number_of_direct_connections(
    served: Served, client: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `CONNECTIONS_PER_IP` open direct connections from one address, its next ones are
    closed on accept (the dialer falls back to libp2p); they come back as those close."""
    monkeypatch.setattr(direct_mod, "CONNECTIONS_PER_IP", 2)
    addr = served.host.addrs[0]
    with trio.fail_after(30):
        held = [await client.open_channel(addr, ECHO, direct=True) for _ in range(2)]
        assert all(isinstance(channel._stream, DirectStream) for channel in held)
        extra = await client.open_channel(addr, ECHO, direct=True)
        async with extra:
            assert not isinstance(extra._stream, DirectStream)  # refused: over libp2p
            await extra.send(Heartbeat(seq=4))
            assert await extra.receive(timeout=5) == Heartbeat(seq=4)
        for channel in held:
            await channel.reset()
        while served.host._direct_open:
            await trio.sleep(0.01)
        client._direct_down.clear()  # the refusal marked the port down for a minute
        again = await client.open_channel(addr, ECHO, direct=True)
        async with again:
            assert isinstance(again._stream, DirectStream)
