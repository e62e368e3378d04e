"""Dispatch throughput: one coordinator process feeding 50 nodes whose renders cost nothing.

Layout: the coordinator runs alone in its own process (`bench._coordinator`: the CLI's
`run_coordinator` with a switchable profiler); 50 real node daemons (`run_node`, each with
its own libp2p host, wallet and journal) run 10 to a process in 5 processes over
`InstantBackend`; this process is the client. Each round submits several requests at once
(up to 512 images each) and times, per job, request accepted -> image received.

Baseline, measured in the same run: the same jobs through the coordinator's own code
(`Dispatcher.run`, `accept_result`, `Store` on disk, message codec) in one trio loop with 50
fake nodes on memory channels, the fake nodes' time subtracted: the ceiling the coordinator
could reach if libp2p and the other processes cost nothing.

The coordinator's trio thread is profiled during the last round with py-spy when it is
installed (`pip install py-spy`; sampling, so the round is not slowed), otherwise with
cProfile during one extra round. Its CPU, and the time it spent waiting for a core, come
from /proc.

Modules: `baseline` (the in-process harness: the real `Dispatcher` with fake nodes on memory
channels), `network` (the networked harness: coordinator and node processes, client rounds),
`runner` (settings, rounds, profiling), `report` (BENCHMARKS.md section), `node_ab` (the
node side alone: CPU per job of this tree's node daemons against another commit's, run side by
side in the same rounds; `python -m bench.dispatch.node_ab --against COMMIT`), `baseline_ab`
(the in-process baseline alone: this tree's against another commit's in alternated runs, each
in a fresh process, medians compared; `python -m bench.dispatch.baseline_ab --against COMMIT`).
"""

from bench.dispatch._parts import QUICK, Settings
from bench.dispatch.report import render_markdown
from bench.dispatch.runner import Report, run

__all__ = ["QUICK", "Report", "Settings", "render_markdown", "run"]
