"""Node CPU per job, this tree's node daemons against another commit's, in the same rounds.

    python -m bench.dispatch.node_ab --against HEAD [--old-processes 2] [--rounds 3]

The dispatch harness (`bench.dispatch.network`: one coordinator process from this tree, 5
processes of 10 instant node daemons, 4 x 250 jobs a round), except that the first
`--old-processes` node processes run the other commit's code (its tree exported with `git
archive`, first on their import path). Both kinds of node share every round, the coordinator
and the machine's other load, so their CPU per job compares fairly on a busy machine, where
figures from separate runs do not. Per kind: CPU seconds of its processes (/proc, all
threads; the trio thread apart) over the receipts their journals gained in the round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import trio

from bench import _common as common
from bench.dispatch._parts import QUICK
from bench.dispatch.network import run_round, start_network
from sogni_devnet.localnet import Proc


def _thread_cpu(pid: int) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds of a process (Linux /proc)."""
    main = common.cpu_seconds(pid)
    task = Path(f"/proc/{pid}/task/{pid}/stat")
    with contextlib.suppress(OSError):
        fields = task.read_text().rsplit(")", 1)[1].split()
        return main, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return main, float("nan")


def _receipts(folder: Path) -> int:
    count = 0
    for db in folder.glob("node*/journal.db"):
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            count += int(conn.execute("SELECT count(*) FROM receipts").fetchone()[0])
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="commit whose node code runs too")
    parser.add_argument("--old-processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sogni-node-ab-"))
    old_tree = workdir / "old"
    old_tree.mkdir()
    try:
        common.export_tree(args.against, old_tree)
    except common.ExportError as exc:
        raise SystemExit(f"git archive {args.against}: {exc}") from None
    old = set(range(args.old_processes))
    procs: list[Proc] = []
    try:
        net = start_network(QUICK, workdir, procs, node_trees=dict.fromkeys(old, old_tree))
        trio.run(run_round, net.addr, 2, QUICK.nodes, 1)  # warm-up
        kinds = {
            f"{args.against} nodes": sorted(old),
            "this tree's nodes": [i for i in range(QUICK.processes) if i not in old],
        }
        per_job: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            pids = [p.popen.pid for p in net.nodes]
            before = [
                (_thread_cpu(pid), _receipts(workdir / f"nodes{i}")) for i, pid in enumerate(pids)
            ]
            result = net.timed_round(QUICK, 1000 * (r + 1))
            after = [
                (_thread_cpu(pid), _receipts(workdir / f"nodes{i}")) for i, pid in enumerate(pids)
            ]
            line = f"round {r + 1}: {result.jobs_per_s:.0f} jobs/s, {result.failed} failed"
            for kind, idx in kinds.items():
                jobs = sum(after[i][1] - before[i][1] for i in idx)
                cpu = sum(after[i][0][0] - before[i][0][0] for i in idx)
                main_cpu = sum(after[i][0][1] - before[i][0][1] for i in idx)
                if jobs:
                    per_job[kind].append((cpu / jobs * 1e3, main_cpu / jobs * 1e3))
                    line += (
                        f"; {kind}: {jobs} jobs, {cpu / jobs * 1e3:.2f} ms CPU/job "
                        f"({main_cpu / jobs * 1e3:.2f} on the trio thread)"
                    )
            print(line, flush=True)
        for kind, values in per_job.items():
            if values:
                total = common.median(v[0] for v in values)
                main_ms = common.median(v[1] for v in values)
                print(f"{kind}: median {total:.2f} ms CPU per job ({main_ms:.2f} trio thread)")
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
