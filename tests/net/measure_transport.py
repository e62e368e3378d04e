"""Measure channel latency and throughput between two hosts on 127.0.0.1.

Not a test (pytest does not collect it): from the repository root run
`.venv/bin/python -m tests.net.measure_transport`.
Prints the median round trip of a small typed message over an open channel, and the
throughput of a stream of 64 KiB frames, next to the same traffic on a bare py-libp2p stream
so the channel's own overhead is visible.
"""

from __future__ import annotations

import statistics
import time

import trio
from libp2p.custom_types import TProtocol

from sogni_net import Channel, open_host
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import Heartbeat

ECHO = "/measure/echo/1"
SINK = "/measure/sink/1"
RAW = "/measure/raw-echo/1"
RAW_SINK = "/measure/raw-sink/1"
ROUNDS = 200
FRAME = 64 * 1024
FRAMES = 400


async def echo(channel: Channel) -> None:
    while True:
        await channel.send(await channel.receive(timeout=30))


async def sink(channel: Channel) -> None:
    received = 0
    while received < FRAMES:
        await channel.receive_raw(limit=CONTROL_FRAME_LIMIT, timeout=30)
        received += 1
    await channel.send(Heartbeat(seq=received))


async def raw_echo(stream) -> None:  # type: ignore[no-untyped-def]
    # Bare py-libp2p handler: an exception escaping it would take the connection down.
    try:
        while True:
            data = await stream.read(65536)
            await stream.write(data)
    except Exception:
        await stream.reset()


async def raw_sink(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        received = 0
        while received < FRAMES * (FRAME + 4):
            received += len(await stream.read(1 << 20))
        await stream.write(b"done")
    except Exception:
        await stream.reset()


async def main() -> None:
    async with open_host(key_path=None, handlers={ECHO: echo, SINK: sink}) as server:
        server._lp.set_stream_handler(TProtocol(RAW), raw_echo)
        server._lp.set_stream_handler(TProtocol(RAW_SINK), raw_sink)
        async with open_host(key_path=None) as client:
            async with await client.open_channel(server.addrs[0], ECHO) as channel:
                for seq in range(50):  # warm-up: identify, window growth
                    await channel.send(Heartbeat(seq=seq))
                    await channel.receive(timeout=5)
                rtts = []
                for seq in range(ROUNDS):
                    started = time.perf_counter()
                    await channel.send(Heartbeat(seq=seq))
                    await channel.receive(timeout=5)
                    rtts.append(time.perf_counter() - started)

            stream = await client._lp.new_stream(server._lp.get_id(), [TProtocol(RAW)])
            raw_rtts = []
            for index in range(50 + ROUNDS):
                started = time.perf_counter()
                await stream.write(b"\x00\x00\x00\x08" + b"12345678")
                await stream.read(65536)
                if index >= 50:
                    raw_rtts.append(time.perf_counter() - started)
            await stream.close()

            payload = bytes(FRAME)
            async with await client.open_channel(server.addrs[0], SINK) as channel:
                started = time.perf_counter()
                for _ in range(FRAMES):
                    await channel.send_raw(payload, limit=CONTROL_FRAME_LIMIT)
                await channel.receive(timeout=60)
                elapsed = time.perf_counter() - started

            stream = await client._lp.new_stream(server._lp.get_id(), [TProtocol(RAW_SINK)])
            started = time.perf_counter()
            for _ in range(FRAMES):
                await stream.write(bytes(FRAME + 4))
            await stream.read(4)
            raw_elapsed = time.perf_counter() - started
            await stream.close()

            ping = statistics.median([await client.ping(server.peer_id) for _ in range(20)])

    def ms(values: list[float], q: float) -> float:
        return sorted(values)[int(q * (len(values) - 1))] * 1e3

    print(
        f"channel round trip (Heartbeat, n={ROUNDS}): median {ms(rtts, 0.5):.2f} ms, "
        f"p90 {ms(rtts, 0.9):.2f} ms"
    )
    print(
        f"bare py-libp2p stream round trip (12 B): median {ms(raw_rtts, 0.5):.2f} ms, "
        f"p90 {ms(raw_rtts, 0.9):.2f} ms"
    )
    print(f"libp2p ping: median {ping * 1e3:.2f} ms")
    total = FRAMES * FRAME
    print(
        f"{FRAMES} x 64 KiB frames: {elapsed:.2f} s, {total / elapsed / 1e6:.1f} MB/s, "
        f"{FRAMES / elapsed:.0f} frames/s"
    )
    print(
        f"same bytes on a bare py-libp2p stream: {raw_elapsed:.2f} s, "
        f"{total / raw_elapsed / 1e6:.1f} MB/s"
    )


if __name__ == "__main__":
    trio.run(main)
