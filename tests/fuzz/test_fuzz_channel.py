"""Property-based fuzzing of `Channel`'s frame reassembly, on an in-memory stream.

Whatever the bytes and however the transport splits them, `receive_raw` yields exactly the
frames a reference parser finds, then `FrameTooLarge` (announced size over the limit) or
`ChannelClosed` (end of stream, possibly mid-frame); `receive` adds only `InvalidMessage`.
The stream here is a stand-in for py-libp2p's (the live daemons are fuzzed in test_live.py).
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
from dataclasses import dataclass, field

import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import sample_messages
from sogni_net.channel import Channel
from sogni_net.errors import ChannelClosed
from sogni_protocol import messages
from sogni_protocol.errors import FrameTooLarge, InvalidMessage
from sogni_protocol.framing import HEADER_SIZE, encode_frame
from sogni_protocol.ids import WIRE_VERSION

EXAMPLES = int(os.environ.get("SOGNI_FUZZ_EXAMPLES", "300")) // 3
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = 1024


@dataclass
class _PeerId:
    def to_base58(self) -> str:
        return "12D3KooWFuzzPeer"


@dataclass
class _Conn:
    peer_id: _PeerId = field(default_factory=_PeerId)


class ScriptedStream:
    """Delivers `chunks` to `read`, then EOF; records what the channel wrote."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self.muxed_conn = _Conn()
        self.written: list[bytes] = []
        self.reset_called = False

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._chunks:
            return b""
        chunk = self._chunks.pop(0)
        if n is not None and len(chunk) > n:
            self._chunks.insert(0, chunk[n:])
            chunk = chunk[:n]
        return chunk

    async def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    async def close_write(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        self.reset_called = True


def reference_parse(data: bytes, limit: int) -> tuple[list[bytes], str]:
    """Frames in `data`, and how the stream ends: 'too_large', 'eof' or 'eof_mid_frame'."""
    frames: list[bytes] = []
    at = 0
    while True:
        if at == len(data):
            return frames, "eof"
        if len(data) - at < HEADER_SIZE:
            return frames, "eof_mid_frame"
        (size,) = struct.unpack(">I", data[at : at + HEADER_SIZE])
        if size > limit:
            return frames, "too_large"
        if len(data) - at - HEADER_SIZE < size:
            return frames, "eof_mid_frame"
        frames.append(data[at + HEADER_SIZE : at + HEADER_SIZE + size])
        at += HEADER_SIZE + size


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def drain(chunks: list[bytes], *, typed: bool) -> tuple[list[object], BaseException]:
    """Receive until the channel refuses; returns what came out and the final error."""
    stream = ScriptedStream(chunks)
    out: list[object] = []
    async with trio.open_nursery() as nursery:
        channel = Channel(stream, protocol="/fuzz/1", linger=0.1)  # type: ignore[arg-type]
        channel._start(nursery)
        with trio.fail_after(5):
            while True:
                try:
                    if typed:
                        out.append(await channel.receive(limit=LIMIT, timeout=5))
                    else:
                        out.append(await channel.receive_raw(limit=LIMIT, timeout=5))
                except InvalidMessage as exc:
                    out.append(exc)
                except (FrameTooLarge, ChannelClosed) as exc:
                    final: BaseException = exc
                    break
        await channel.reset()
        nursery.cancel_scope.cancel()
    return out, final


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=12))
def test_random_bytes_any_chunking(data: bytes, cuts: list[int]) -> None:
    frames, end = reference_parse(data, LIMIT)
    out, final = trio.run(functools.partial(drain, split(data, cuts), typed=False))
    assert out == frames
    if end == "too_large":
        assert isinstance(final, FrameTooLarge)
    else:
        assert isinstance(final, ChannelClosed)
        assert ("mid-frame" in str(final)) == (end == "eof_mid_frame")


frame_payloads = st.one_of(
    st.sampled_from(sample_messages()).map(messages.encode),
    st.binary(max_size=200),
    st.builds(
        lambda m, cut: messages.encode(m)[: max(1, cut)],
        st.sampled_from(sample_messages()),
        st.integers(min_value=1, max_value=60),
    ),
    st.dictionaries(
        st.text(max_size=8),
        st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=8),
        max_size=4,
    ).map(lambda d: msgspec.msgpack.encode({"type": "heartbeat", "v": WIRE_VERSION, **d})),
)


@FUZZ
@given(st.lists(frame_payloads, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_well_framed_garbage_stays_in_sync(payloads: list[bytes], cuts: list[int]) -> None:
    """Each bad frame is refused alone; the frames after it still decode (the channel stays
    in sync), and every good one comes out equal to what a direct decode gives."""
    data = b"".join(encode_frame(p, LIMIT) for p in payloads if len(p) <= LIMIT)
    kept = [p for p in payloads if len(p) <= LIMIT]
    out, final = trio.run(functools.partial(drain, split(data, cuts), typed=True))
    assert isinstance(final, ChannelClosed) and "mid-frame" not in str(final)
    assert len(out) == len(kept)
    for payload, got in zip(kept, out, strict=True):
        try:
            expected: object = messages.decode(payload)
        except (InvalidMessage, UnicodeDecodeError):
            assert isinstance(got, InvalidMessage)
        else:
            assert got == expected
