"""A hostile or broken peer: oversized frames, garbage, malformed messages.

In every case the receiving side gets a protocol error naming the problem, and the listening
host goes on serving new channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import pytest
import trio

from sogni_net import ChannelClosed, Host, open_host
from sogni_protocol.errors import FrameTooLarge, InvalidMessage
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, WIRE_VERSION
from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from tests.net.conftest import ChannelTo, Server


async def _still_serving(server: Server, client: Host) -> None:
    async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
        await channel.send(Heartbeat(seq=99))
        assert await channel.receive(timeout=5) == Heartbeat(seq=99)
    assert await server.next_event() == Heartbeat(seq=99)
    assert isinstance(await server.next_event(), ChannelClosed)


async def test_oversized_header_is_refused_before_the_body(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        channel = await client.open_channel(server.host.addrs[0], server.ECHO)
        # Only the 4-byte header of a 100 MB frame: a reader that waited for the body would
        # block until its deadline (10 s in the handler) instead of failing at once.
        await channel.send_unframed((100 * 1024 * 1024).to_bytes(4, "big"))
        started = trio.current_time()
        error = await server.next_event()
        assert isinstance(error, FrameTooLarge)
        assert error.size == 100 * 1024 * 1024 and error.limit == CONTROL_FRAME_LIMIT
        assert trio.current_time() - started < 2
        # The receiver reset the stream.
        with pytest.raises(ChannelClosed, match="reset by peer"):
            await channel.receive(timeout=5)
        await _still_serving(server, client)


async def test_oversized_frame_is_refused_on_the_client_side_too(client: Host) -> None:
    async def flood(channel) -> None:  # type: ignore[no-untyped-def]
        await channel.send_unframed((CONTROL_FRAME_LIMIT + 1).to_bytes(4, "big"))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with open_host(key_path=None, handlers={"/flood/1": flood}) as server:
            channel = await client.open_channel(server.addrs[0], "/flood/1")
            with pytest.raises(FrameTooLarge):
                await channel.receive(timeout=5)
            with pytest.raises(ChannelClosed):
                await channel.send(Heartbeat(seq=1))


async def test_bytes_that_are_not_msgpack(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send_raw(b"\xc1 definitely not msgpack")
            error = await server.next_event()
            assert isinstance(error, InvalidMessage)
            assert "MessagePack" in str(error)
        await _still_serving(server, client)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"type": "heartbeat", "v": WIRE_VERSION}, "seq"),  # missing field
        ({"type": "heartbeat", "v": WIRE_VERSION, "seq": "seven"}, "seq"),  # wrong type
        ({"type": "ready", "v": WIRE_VERSION, "slots": 10_000}, "slots"),  # out of range
        ({"type": "noSuchMessage", "v": WIRE_VERSION}, "noSuchMessage"),  # unknown type
    ],
)
async def test_malformed_message_names_the_field(
    server: Server, client: Host, fields: dict[str, object], named: str
) -> None:
    with trio.fail_after(10):
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send_raw(msgspec.msgpack.encode(fields))
            error = await server.next_event()
            assert isinstance(error, InvalidMessage)
            assert named in str(error)
        await _still_serving(server, client)


async def test_invalid_message_leaves_the_channel_in_sync(channel_to: ChannelTo) -> None:
    """A frame that fails to decode was still read whole: the next frame decodes fine."""

    async def two_frames(channel) -> None:  # type: ignore[no-untyped-def]
        await channel.send_raw(msgspec.msgpack.encode({"type": "heartbeat", "v": WIRE_VERSION}))
        await channel.send(Heartbeat(seq=2))
        await channel.receive(timeout=5)

    with trio.fail_after(10):
        async with channel_to(two_frames) as channel:
            with pytest.raises(InvalidMessage, match="seq"):
                await channel.receive(timeout=5)
            assert await channel.receive(timeout=5) == Heartbeat(seq=2)
