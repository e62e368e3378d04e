"""A write of several 64 KB yamux frames reaches the connection as one write, intact.

py-libp2p's own stream write awaits four locks and a checkpoint per 64 KB frame, so a batch
of images to a client crawled on a busy loop (BENCHMARKS.md, Dispatch). The channel hands
what the send window allows to the connection at once; this counts the connection's writes
on real hosts on 127.0.0.1 and checks the bytes that come back.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from sogni_net import Host
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import Heartbeat, Result
from tests.net.test_net_channel import _result

if TYPE_CHECKING:
    from tests.net.conftest import Server


async def test_frames_within_the_window_leave_in_one_connection_write(
    server: Server, client: Host
) -> None:
    image = os.urandom(200 * 1024)  # four yamux frames, inside the 256 KB window
    with trio.fail_after(20):
        async with await client.open_channel(server.host.addrs[0], server.BIG) as channel:
            await channel.send(Heartbeat(seq=0))
            assert await channel.receive(timeout=5) == Heartbeat(seq=0)
            conn: Any = channel._stream.muxed_stream.conn  # type: ignore[attr-defined]
            sizes: list[int] = []
            write_frame = conn._write_frame

            async def counted(data: bytes) -> None:
                sizes.append(len(data))
                await write_frame(data)

            conn._write_frame = counted
            await channel.send(_result(image), limit=RESULT_FRAME_LIMIT)
            echoed = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=10)
            conn._write_frame = write_frame
    assert isinstance(echoed, Result) and echoed.image == image
    big = [s for s in sizes if s > 64 * 1024]
    assert len(big) == 1 and big[0] > 200 * 1024, sizes  # not one write per 64 KB frame
