"""`sogni-coordinator start --announce`, plus a switchable in-process profiler.

    python -m bench._coordinator --profile-out coordinator.prof

The same configuration (`SOGNI_COORDINATOR_*` env), signer keystore and `run_coordinator`
as the CLI; the only addition is cProfile on the trio thread, started by SIGUSR1 and stopped
by SIGUSR2, which writes the stats to `--profile-out` and prints `{"event": "profiled"}`. A
benchmark can thus time unprofiled rounds and then profile one round, on one network.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import signal
from pathlib import Path

import trio

from sogni_coordinator.config import load_coordinator_config
from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator
from sogni_protocol.logs import configure_logging
from sogni_wallet.keystore import unlock_wallet


def _emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


async def _main(profile_out: Path | None) -> None:
    # A free HTTP port unless the benchmark chose one: several runs may share the machine.
    cfg = load_coordinator_config(
        env={"SOGNI_COORDINATOR_HTTP_LISTEN": "127.0.0.1:0", **os.environ}
    )
    configure_logging(cfg.log_level, json=cfg.log_json)
    wallet = unlock_wallet(cfg.keystore, cfg.password_env)
    signer = Signer(wallet.address, wallet.private_key)
    profiler = cProfile.Profile()
    async with trio.open_nursery() as nursery:
        running: RunningCoordinator = await nursery.start(run_coordinator, cfg, signer)
        _emit(
            {
                "event": "ready",
                "peerId": running.peer_id,
                "addrs": running.addrs,
                "address": running.address,
                "http": running.http_url,
            }
        )
        wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        with trio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1 and profile_out is not None:
                    profiler.enable()
                    _emit({"event": "profiling"})
                elif signum == signal.SIGUSR2 and profile_out is not None:
                    profiler.disable()
                    profiler.dump_stats(str(profile_out))
                    _emit({"event": "profiled", "path": str(profile_out)})
                elif signum in (signal.SIGINT, signal.SIGTERM):
                    break
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile-out", type=Path, default=None)
    args = parser.parse_args()
    trio.run(_main, args.profile_out)


if __name__ == "__main__":
    main()
