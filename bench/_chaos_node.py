"""One node daemon over a stub backend, configured like `sogni-node start --announce`.

    SOGNI_NODE_DATA_DIR=... SOGNI_NODE_COORDINATORS=... python -m bench._chaos_node

The chaos soak SIGKILLs and restarts node processes by the dozen: each one must be a real
`run_node` (own process, wallet, peer key and journal, read from the same `SOGNI_NODE_*`
env as the CLI, so `Cluster.start_node` can launch it), but without a model to load. Each
render takes `--render-seconds` (honouring cancellation), so a kill lands mid-job often
enough to matter. Prints the CLI's JSON event lines (`ready`, `connected`) on stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Callable

import trio

from bench.instant import InstantBackend
from sogni_node.config import load_node_config
from sogni_node.daemon import run_node
from sogni_node.render.backend import RenderCancelled, RenderJob, RenderOutput
from sogni_protocol.logs import configure_logging
from sogni_wallet.keystore import unlock_wallet

MODEL = "sogni-tiny-sd"


class SlowInstant(InstantBackend):
    """`InstantBackend` that spends `seconds` per image (in the worker thread, cancellable)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def render(
        self,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
    ) -> RenderOutput:
        deadline = time.monotonic() + self.seconds
        while (left := deadline - time.monotonic()) > 0:
            if should_cancel():
                raise RenderCancelled(0)
            time.sleep(min(left, 0.05))
        return super().render(job, on_step, should_cancel)


def _announce(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


async def _main(render_seconds: float) -> None:
    config = load_node_config()
    configure_logging(config.log_level, config.log_json)
    wallet = unlock_wallet(config.keystore, config.password_env)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(watch_signals)
        backend = SlowInstant(render_seconds)
        await run_node(config, wallet, backend, [MODEL], stop=stop, on_event=_announce)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-seconds", type=float, default=0.0)
    args = parser.parse_args()
    trio.run(_main, args.render_seconds)


if __name__ == "__main__":
    main()
