"""Leases per second on the shared job queue: PostgreSQL from 1, 2 and 3 leaser processes,
and the single coordinator's SQLite file beside it (docs/SCALING.md quotes the output).

Each leaser is its own process (its own connection, its own GIL) taking one job per
transaction (`lease(n=1)`), then, in the `lease+complete` mode, recording its receipt (a
second transaction): the life of one job in the queue. The PostgreSQL server is durable
(fsync and synchronous commit on, as a deployment would run it), like SQLite's FULL sync.
Every run checks that no job was leased twice.

    .venv/bin/python -m bench.queue_leases [--jobs 1500]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sogni_coordinator.queue import NewJob, open_queue
from sogni_devnet.pg_cluster import start_cluster


def _leaser(database: str, owner: str, complete: bool, ready: Any, go: Any, out: Any) -> None:
    async def run() -> list[bytes]:
        q = await open_queue(database)
        taken: list[bytes] = []
        ready.put(owner)
        go.wait()
        try:
            while leases := await q.lease(owner, 1, 600):
                for lease in leases:
                    taken.append(lease.job_id)
                    if complete:
                        await q.complete(lease.job_id, b"r" + lease.job_id, owner)
        finally:
            await q.aclose()
        return taken

    out.put((owner, trio.run(run)))


def measure(database: str, leasers: int, jobs: int, complete: bool) -> tuple[float, int]:
    """Jobs per second through `leasers` processes, and how many jobs were leased twice."""

    async def fill() -> None:
        q = await open_queue(database)
        batch = [NewJob(i.to_bytes(8, "big"), b"req", b"x" * 200) for i in range(jobs)]
        for start in range(0, jobs, 500):
            await q.enqueue(batch[start : start + 500])
        await q.aclose()

    trio.run(fill)
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_leaser, args=(database, f"c{i}", complete, ready, go, out))
        for i in range(leasers)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every process imported and connected before the clock starts
        ready.get(timeout=120)
    started = time.perf_counter()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    leased = [job for _owner, taken in results for job in taken]
    assert len(set(leased)) == jobs, f"{len(set(leased))} of {jobs} jobs leased"
    return jobs / elapsed, len(leased) - len(set(leased))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL with fsync off")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (median shown)")
    args = parser.parse_args()
    cluster = start_cluster(fast=args.fast)
    label = "postgresql 15 (fsync off)" if args.fast else "postgresql 15 (fsync on)"
    try:
        print(
            f"{'engine':<28}{'leasers':>8}{'mode':>16}{'jobs/s median':>15}{'(min-max)':>13}"
            f"{'twice':>7}"
        )
        for complete in (False, True):
            mode = "lease+complete" if complete else "lease"
            rows: list[tuple[str, int, list[tuple[float, int]]]] = []
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(measure(str(Path(tmp) / "q.sqlite"), 1, args.jobs, complete))
            rows.append(("sqlite (FULL sync)", 1, runs))
            for leasers in (1, 2, 3):
                runs = []
                for r in range(args.repeat):
                    url = cluster.create_database(f"b_{leasers}_{int(complete)}_{r}")
                    runs.append(measure(url, leasers, args.jobs, complete))
                rows.append((label, leasers, runs))
            for name, leasers, runs in rows:
                rates = sorted(rate for rate, _twice in runs)
                twice = sum(t for _rate, t in runs)
                spread = f"({rates[0]:.0f}-{rates[-1]:.0f})"
                print(
                    f"{name:<28}{leasers:>8}{mode:>16}{statistics.median(rates):>15.0f}"
                    f"{spread:>13}{twice:>7}",
                    flush=True,
                )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
