"""What one small frame costs through py-libp2p, against raw trio TCP with Noise's cipher.

Run: `.venv/bin/python -m bench.dispatch.transport_floor` (about 20 s). Not part of
`python -m bench`: it answers one question for BENCHMARKS.md ("dispatch"): is py-libp2p's
per-frame cost the wall, and what would lift it?

Both sides in one process and one trio loop on 127.0.0.1, sender and receiver, so the figure
is the CPU of both ends per frame (the coordinator pays one end of each frame it moves).
Frames are 200-byte payloads (an ack, an offer's size class). Six ways:

1. `Channel.send`, one awaited frame at a time (what each node stream did per message);
2. `Channel.send_many`, 32 frames per batch (one yamux write per batch: the writer here);
3. and 4. the same over a direct channel (`sogni_net.direct`: Noise on its own TCP
   connection, no yamux), what node job sessions and app requests use;
5. raw trio TCP, each frame length-prefixed and sealed with ChaCha20-Poly1305 (Noise's
   transport cipher; the handshake is once per connection and not counted), one
   `send_all` per frame;
6. the same, 32 sealed frames per `send_all`.
"""

from __future__ import annotations

import functools
import os
import struct
import time

import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from sogni_net import Channel, open_host
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import ResultAck

SINK = "/measure/floor-sink/1"
FRAMES = 4000
BATCH = 32


def _msg(i: int) -> ResultAck:
    return ResultAck(job_id=i.to_bytes(32, "big"), accepted=True, reason="x" * 100)


async def _libp2p(batch: int, *, direct: bool = False) -> float:
    """Seconds of wall (and, single loop, CPU) per frame over a py-libp2p channel (with
    `direct`, a direct channel between the same two hosts)."""
    got = trio.Event()

    async def sink(channel: Channel) -> None:
        for _ in range(FRAMES):
            await channel.receive(timeout=30)
        got.set()

    async with (
        open_host(key_path=None, listen=["/ip4/127.0.0.1/tcp/0"], direct=direct) as server,
        open_host(key_path=None, listen=()) as client,
    ):
        server.set_stream_handler(SINK, sink, direct=direct)
        channel = await client.open_channel(server.addrs[0], SINK, direct=direct)
        async with channel:
            started = time.process_time()
            if batch == 1:
                for i in range(FRAMES):
                    await channel.send(_msg(i))
            else:
                for i in range(0, FRAMES, batch):
                    frames = [(_msg(i + k), CONTROL_FRAME_LIMIT) for k in range(batch)]
                    await channel.send_many(frames)
            with trio.fail_after(60):
                await got.wait()
            return (time.process_time() - started) / FRAMES


async def _raw(batch: int) -> float:
    """The same frames over a bare trio TCP stream, sealed with ChaCha20-Poly1305."""
    key = ChaCha20Poly1305.generate_key()
    seal, unseal = ChaCha20Poly1305(key), ChaCha20Poly1305(key)
    done = trio.Event()

    async def receiver(stream: trio.SocketStream) -> None:
        buf = bytearray()
        n = nonce = 0
        while n < FRAMES:
            data = await stream.receive_some(1 << 16)
            buf += data
            while len(buf) >= 2:
                size = struct.unpack(">H", buf[:2])[0]
                if len(buf) < 2 + size:
                    break
                unseal.decrypt(nonce.to_bytes(12, "little"), bytes(buf[2 : 2 + size]), None)
                nonce += 1
                n += 1
                del buf[: 2 + size]
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, receiver, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        payload = os.urandom(200)
        started = time.process_time()
        nonce = 0
        for _ in range(0, FRAMES, batch):
            out = bytearray()
            for _ in range(batch):
                sealed = seal.encrypt(nonce.to_bytes(12, "little"), payload, None)
                nonce += 1
                out += struct.pack(">H", len(sealed)) + sealed
            await stream.send_all(bytes(out))
        with trio.fail_after(60):
            await done.wait()
        took = (time.process_time() - started) / FRAMES
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return took


async def _measure() -> list[tuple[str, float]]:
    return [
        ("py-libp2p `Channel.send`, one awaited frame at a time", await _libp2p(1)),
        (f"py-libp2p `Channel.send_many`, {BATCH} frames per write", await _libp2p(BATCH)),
        (
            "direct channel `Channel.send`, one awaited frame at a time",
            await _libp2p(1, direct=True),
        ),
        (
            f"direct channel `Channel.send_many`, {BATCH} frames per write",
            await _libp2p(BATCH, direct=True),
        ),
        ("raw trio TCP + ChaCha20-Poly1305, one send per frame", await _raw(1)),
        (f"raw trio TCP + ChaCha20-Poly1305, {BATCH} frames per send", await _raw(BATCH)),
    ]


def measure() -> list[tuple[str, float]]:
    """(way, CPU seconds per frame, both ends) for the six ways above."""
    return trio.run(_measure)


if __name__ == "__main__":
    print("CPU per 200-byte frame, both ends, one process:")
    for name, seconds in measure():
        print(f"  {name:58s} {seconds * 1e6:8.1f} us")
