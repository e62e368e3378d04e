"""A process running several simulated nodes: the real node daemon over an `InstantBackend`.

    python -m bench._nodes --count 10 --coordinator /ip4/127.0.0.1/tcp/N/p2p/ID \
        --trusted 0xSIGNER --data-dir DIR

Each node is a full `run_node` (own libp2p host and peer id, own wallet, own journal) in
this process's trio loop. One JSON line `{"event": "connected", "nodes": N}` goes to stdout
when every node has finished its handshake; SIGTERM stops them all. With `--profile-out`,
SIGUSR1 starts cProfile on the trio thread (timed by that thread's CPU time, so the
other load on the machine does not count) and SIGUSR2 writes its stats there and prints
`{"event": "profiled", "path": ...}` (as `bench._coordinator` does), so one round of the
node side can be profiled on a running network.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import signal
import time
from pathlib import Path

import trio
from eth_account import Account

from bench.instant import InstantBackend
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_protocol.logs import configure_logging
from sogni_wallet.keystore import Wallet

MODEL = "sogni-tiny-sd"


async def _main(args: argparse.Namespace) -> None:
    backend = InstantBackend()
    stops = [trio.Event() for _ in range(args.count)]
    connected = 0

    def on_event(event: dict[str, object]) -> None:
        nonlocal connected
        if event.get("event") == "connected":
            connected += 1
            if connected == args.count:
                print(json.dumps({"event": "connected", "nodes": args.count}), flush=True)

    async def one(i: int) -> None:
        account = Account.create()
        config = NodeConfig(
            data_dir=args.data_dir / f"node{i}",
            coordinators=[args.coordinator],
            trusted_coordinators=[args.trusted],
            slots=args.slots,
            device="cpu",
            threads=1,
            shutdown_grace=1.0,
            log_level=args.log_level,
            http_listen="127.0.0.1:0",  # one listener per simulated node, each on a free port
        )
        wallet = Wallet(account.address, bytes(account.key))
        await run_node(config, wallet, backend, [MODEL], stop=stops[i], on_event=on_event)

    async with trio.open_nursery() as nursery:
        for i in range(args.count):
            nursery.start_soon(one, i)
        profiler = cProfile.Profile(time.thread_time)  # CPU of the trio thread, not wall
        wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        with trio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1 and args.profile_out is not None:
                    profiler.enable()
                    print(json.dumps({"event": "profiling"}), flush=True)
                elif signum == signal.SIGUSR2 and args.profile_out is not None:
                    profiler.disable()
                    profiler.dump_stats(str(args.profile_out))
                    print(
                        json.dumps({"event": "profiled", "path": str(args.profile_out)}), flush=True
                    )
                elif signum in (signal.SIGINT, signal.SIGTERM):
                    break
        for stop in stops:
            stop.set()  # each run_node drains, says goodbye and returns
        nursery.cancel_scope.deadline = trio.current_time() + 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--trusted", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--profile-out", type=Path, default=None)
    args = parser.parse_args()
    configure_logging(args.log_level, json=True)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
