"""Queued frames leave a channel together: one py-libp2p stream write per batch, not per frame.

Each py-libp2p write costs a yamux frame, a Noise record, a lock round and a socket send
whatever its size; under load the coordinator's acks, offers and a client's images must ride
together. The writes are counted on the real stream (its `write` wrapped), between two real
hosts on 127.0.0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from sogni_net import Channel, Host
from sogni_net.errors import ChannelClosed
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from tests.net.conftest import Server


def count_writes(channel: Channel) -> list[int]:
    """Wrap the channel's stream: the sizes of the writes made to it, in order."""
    stream: Any = channel._stream
    sizes: list[int] = []
    write = stream.write

    async def counted(data: bytes) -> None:
        sizes.append(len(data))
        await write(data)

    stream.write = counted
    return sizes


async def test_frames_sent_together_leave_in_one_write(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=0))  # the stream is set up
            assert await channel.receive(timeout=5) == Heartbeat(seq=0)
            sizes = count_writes(channel)
            frames = [(Heartbeat(seq=i), CONTROL_FRAME_LIMIT) for i in range(1, 11)]
            await channel.send_many(frames)
            assert len(sizes) == 1 and channel.writes == 2  # ten frames, one write
            for i in range(1, 11):  # every frame arrived whole, in order
                assert await channel.receive(timeout=5) == Heartbeat(seq=i)
            assert [await server.next_event() for _ in range(11)] == [
                Heartbeat(seq=i) for i in range(11)
            ]


async def test_frames_queued_by_several_tasks_at_once_share_a_write(
    server: Server, client: Host
) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=0))
            assert await channel.receive(timeout=5) == Heartbeat(seq=0)
            sizes = count_writes(channel)
            async with trio.open_nursery() as nursery:
                for i in range(1, 21):  # twenty tasks, each awaiting its own frame
                    nursery.start_soon(channel.send, Heartbeat(seq=i))
            got = [await channel.receive(timeout=5) for _ in range(20)]
            assert sorted(m.seq for m in got if isinstance(m, Heartbeat)) == list(range(1, 21))
            assert 1 <= len(sizes) <= 2, sizes  # not twenty: the writer took what was queued


async def test_a_lone_frame_is_written_at_once(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            sizes = count_writes(channel)
            for i in range(3):  # each awaited: nothing to batch with, one write each
                await channel.send(Heartbeat(seq=i))
                assert await channel.receive(timeout=5) == Heartbeat(seq=i)
            assert len(sizes) == 3


async def test_a_failed_batch_write_fails_the_send_with_its_error(
    server: Server, client: Host
) -> None:
    """`send_many` waits once for its whole batch; every frame of a failed write carries the
    write's error, and the sender hears it (the channel cannot be used again)."""
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=0))
            assert await channel.receive(timeout=5) == Heartbeat(seq=0)
            stream: Any = channel._stream

            async def broken(data: bytes) -> None:
                raise OSError("disk on fire")

            stream.write = broken
            frames = [(Heartbeat(seq=i), CONTROL_FRAME_LIMIT) for i in range(1, 6)]
            with pytest.raises(ChannelClosed, match="disk on fire"):
                await channel.send_many(frames, timeout=5)
            with pytest.raises(ChannelClosed):
                await channel.send(Heartbeat(seq=9))
