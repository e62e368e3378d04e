"""Channels between two real hosts on 127.0.0.1: typed frames, limits, deadlines, closing."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from sogni_net import Channel, ChannelClosed, Host, ReadTimeout, open_host
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Goodbye,
    Heartbeat,
    Ready,
    Receipt,
    RenderMeta,
    Result,
)

if TYPE_CHECKING:
    from tests.net.conftest import ChannelTo, Server


async def test_typed_messages_both_ways(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            assert channel.remote_peer_id == server.host.peer_id
            for message in (Heartbeat(seq=1), Ready(slots=3), Goodbye(reason="done")):
                await channel.send(message)
                assert await channel.receive(timeout=5) == message
                assert await server.next_event() == message
        # The client closed: the handler's next receive saw it.
        assert isinstance(await server.next_event(), ChannelClosed)


async def test_server_side_sees_the_dialer_peer_id(client: Host, channel_to: ChannelTo) -> None:
    seen: list[str] = []

    async def who(channel) -> None:  # type: ignore[no-untyped-def]
        seen.append(channel.remote_peer_id)
        await channel.send(Heartbeat(seq=7))

    with trio.fail_after(10):
        async with channel_to(who) as channel:
            assert await channel.receive(timeout=5) == Heartbeat(seq=7)
    assert seen == [client.peer_id]


def _result(image: bytes) -> Result:
    worker = "0x" + "11" * 20
    receipt = Receipt(
        job_id=b"\x01" * 32,
        offer_hash=b"\x02" * 32,
        worker=worker,
        coordinator="0x" + "22" * 20,
        model_id="sd15",
        result_hash=b"\x03" * 32,
        steps_done=20,
        work_units=1000,
        completed_at=1_700_000_000,
    )
    meta = RenderMeta(backend="cpu", device="test", dtype="fp32", threads=2)
    return Result(
        job_id=b"\x01" * 32, image=image, receipt=receipt, signature=b"\x04" * 65, meta=meta
    )


async def test_five_megabyte_frame_round_trips(server: Server, client: Host) -> None:
    image = os.urandom(5 * 1024 * 1024)
    with trio.fail_after(30):
        async with await client.open_channel(server.host.addrs[0], server.BIG) as channel:
            await channel.send(_result(image), limit=RESULT_FRAME_LIMIT)
            echoed = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=20)
    assert isinstance(echoed, Result)
    assert echoed.image == image


async def test_big_frame_needs_the_big_limit(client: Host, server: Server) -> None:
    with trio.fail_after(10), pytest.raises(Exception, match="exceeds"):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(_result(b"x" * (CONTROL_FRAME_LIMIT + 1)))


async def test_receive_on_a_silent_peer_times_out(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.SILENT) as channel:
            started = trio.current_time()
            with pytest.raises(ReadTimeout):
                await channel.receive(timeout=0.3)
            elapsed = trio.current_time() - started
            assert 0.3 <= elapsed < 1.0
            # A timeout loses nothing: the channel is still usable.
            await channel.send(Heartbeat(seq=1))


async def test_timeout_mid_frame_loses_no_bytes(channel_to: ChannelTo) -> None:
    """A deadline that fires with half a frame buffered leaves it for the next receive."""
    frame_sent = trio.Event()
    release = trio.Event()

    async def slow_writer(channel) -> None:  # type: ignore[no-untyped-def]
        payload = b"\x93" + b"x" * 10  # opaque bytes: receive_raw does not decode
        frame = len(payload).to_bytes(4, "big") + payload
        await channel.send_unframed(frame[:6])
        frame_sent.set()
        await release.wait()
        await channel.send_unframed(frame[6:])
        await channel.receive(timeout=5)  # wait for the client to finish

    with trio.fail_after(10):
        async with channel_to(slow_writer) as channel:
            await frame_sent.wait()
            with pytest.raises(ReadTimeout):
                await channel.receive_raw(timeout=0.2)
            release.set()
            assert await channel.receive_raw(timeout=5) == b"\x93" + b"x" * 10


async def test_a_big_frame_on_a_slow_link_gets_time_for_its_size(channel_to: ChannelTo) -> None:
    """The receive's timeout bounds the wait for a frame; a body that keeps arriving gets the
    time its size takes at `SLOWEST_LINK`, so a large result over a slow uplink is read,
    and a trickle is still cut off."""
    from sogni_net.channel import SLOWEST_LINK

    payload = b"\x93" + b"x" * (512 * 1024 - 1)  # 4 s at SLOWEST_LINK
    assert len(payload) / SLOWEST_LINK == 4.0
    frame = len(payload).to_bytes(4, "big") + payload

    async def slow_writer(channel) -> None:  # type: ignore[no-untyped-def]
        piece = len(frame) // 8
        for i in range(0, len(frame), piece):  # 8 pieces over ~1.4 s: longer than the timeout
            await channel.send_unframed(frame[i : i + piece])
            await trio.sleep(0.2)
        await channel.receive(timeout=10)  # wait for the client to finish

    with trio.fail_after(20):
        async with channel_to(slow_writer) as channel:
            started = trio.current_time()
            assert await channel.receive_raw(limit=len(payload), timeout=0.5) == payload
            assert trio.current_time() - started > 0.5  # it did outlast the timeout


async def test_peer_closing_mid_frame_gives_channel_closed(channel_to: ChannelTo) -> None:
    async def half_then_close(channel) -> None:  # type: ignore[no-untyped-def]
        await channel.send_unframed((1000).to_bytes(4, "big") + b"partial")
        await channel.close()

    with trio.fail_after(10):
        async with channel_to(half_then_close) as channel:
            with pytest.raises(ChannelClosed, match="mid-frame"):
                await channel.receive(timeout=5)


async def test_peer_reset_gives_channel_closed(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        channel = await client.open_channel(server.host.addrs[0], server.CRASH)
        await channel.send(Heartbeat(seq=1))
        with pytest.raises(ChannelClosed, match="reset by peer"):
            await channel.receive(timeout=5)
        with pytest.raises(ChannelClosed):
            await channel.send(Heartbeat(seq=1))


async def test_peer_host_going_away_gives_channel_closed(client: Host) -> None:
    outcome: list[ChannelClosed] = []

    async def receive_until_gone(channel: Channel) -> None:
        try:
            await channel.receive(timeout=10)
        except ChannelClosed as exc:
            outcome.append(exc)

    with trio.fail_after(15):
        async with (
            trio.open_nursery() as nursery,
            open_host(key_path=None, handlers={"/never/1": _never_answer}) as server,
        ):
            channel = await client.open_channel(server.addrs[0], "/never/1")
            nursery.start_soon(receive_until_gone, channel)
            await trio.testing.wait_all_tasks_blocked()
            # Leaving the block shuts the server host down while the client waits for a frame.
    assert len(outcome) == 1


async def test_handler_exception_keeps_host_serving(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        for _ in range(3):
            crashed = await client.open_channel(server.host.addrs[0], server.CRASH)
            await crashed.send(Heartbeat(seq=1))
            with pytest.raises(ChannelClosed):
                await crashed.receive(timeout=5)
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=42))
            assert await channel.receive(timeout=5) == Heartbeat(seq=42)


async def test_local_close_then_use_raises(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        channel = await client.open_channel(server.host.addrs[0], server.ECHO)
        await channel.close()
        await channel.close()  # idempotent
        with pytest.raises(ChannelClosed):
            await channel.send(Heartbeat(seq=1))
        with pytest.raises(ChannelClosed):
            await channel.receive(timeout=1)
        started = trio.current_time()
        await channel.reset()  # after close: nothing queued to wait for
        assert trio.current_time() - started < 0.5


async def test_half_close_still_receives(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        channel = await client.open_channel(server.host.addrs[0], server.ECHO)
        await channel.send(Heartbeat(seq=5))
        await channel.close_write()
        assert await channel.receive(timeout=5) == Heartbeat(seq=5)
        # The server saw our FIN, its handler ended and closed its side too.
        with pytest.raises(ChannelClosed, match="closed by peer"):
            await channel.receive(timeout=5)


async def test_concurrent_channels_on_one_connection(server: Server, client: Host) -> None:
    async def talk(index: int) -> None:
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            for seq in range(20):
                await channel.send(Heartbeat(seq=index * 1000 + seq))
                assert await channel.receive(timeout=5) == Heartbeat(seq=index * 1000 + seq)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(talk, index)
    assert client.connected_peers() == [server.host.peer_id]


def _all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        tasks.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


async def test_open_host_exits_cleanly_with_open_channels() -> None:
    before = _all_tasks()
    with trio.fail_after(15):
        async with (
            open_host(key_path=None, handlers={"/never/1": _never_answer}) as server,
            open_host(key_path=None) as client,
        ):
            port = int(server.addrs[0].split("/tcp/")[1].split("/")[0])
            channels = [await client.open_channel(server.addrs[0], "/never/1") for _ in range(3)]

            async def blocked_reader() -> None:
                await channels[0].receive(timeout=60)

            async with trio.open_nursery() as readers:
                readers.start_soon(blocked_reader)
                await trio.testing.wait_all_tasks_blocked()
                # Leave both hosts with channels open and a receive pending.
                readers.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    leaked = _all_tasks() - before
    assert not leaked, sorted(task.name for task in leaked)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def _never_answer(channel) -> None:  # type: ignore[no-untyped-def]
    await trio.sleep_forever()
