"""One coordinator on SQLite vs on PostgreSQL (docs/SCALING.md, "Storage engines").

Two figures per engine:
- jobs/s of the in-process dispatch (`bench.dispatch.baseline`: the real `Dispatcher`,
  fake nodes in the same trio loop, billing on) with its store, ledger and reputation in
  that engine: the coordinator's own time per job, the fake nodes' time subtracted;
- microseconds per synchronous read a component does under its lock (a balance, a job's
  state), which is what a read costs the calling thread.

PostgreSQL runs durable (fsync and synchronous commit on, as deployed) and with the test
settings (`--fast`: fsync off). SQLite is the coordinator's file with FULL sync.

    .venv/bin/python -m bench.storage_engines [--requests 40 --images 5 --runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.dispatch import baseline
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.store import Store
from sogni_devnet.pg_cluster import PgCluster, start_cluster
from sogni_protocol.logs import configure_logging


@contextmanager
def _engine_at(url: str | None) -> Iterator[None]:
    """Point the baseline's components at `url` (None: its own SQLite file)."""
    if url is None:
        yield
        return
    saved = {name: getattr(baseline, name) for name in ("Store", "Ledger", "Reputation")}
    for name, cls in saved.items():  # the same class, opened at `url` whatever path it gets
        setattr(baseline, name, lambda _path, *a, _cls=cls, **kw: _cls(url, *a, **kw))
    try:
        yield
    finally:
        for name, cls in saved.items():
            setattr(baseline, name, cls)


def _reads_us(where: str, n: int = 2000) -> dict[str, float]:
    ledger, store = Ledger(where), Store(where)
    try:
        ledger.credit_purchase("0x" + "a1" * 20, 5)
        out = {}
        for name, fn in (
            ("ledger.balance", lambda: ledger.balance("0x" + "a1" * 20)),
            ("store.job_state (absent)", lambda: store.job_state(b"\x01" * 32)),
        ):
            started = time.perf_counter()
            for _ in range(n):
                fn()
            out[name] = (time.perf_counter() - started) / n * 1e6
        return out
    finally:
        ledger.close()
        store.close()


def _run(label: str, cluster: PgCluster | None, args: argparse.Namespace) -> None:
    rates = []
    url = None
    for i in range(args.runs):
        if cluster is not None:  # a fresh database each run
            url = cluster.create_database(f"bench{i}")
        with tempfile.TemporaryDirectory() as tmp, _engine_at(url):
            got = baseline.run_baseline(
                args.requests, args.images, args.nodes, Path(tmp) / f"run{i}", paid=True
            )
            rates.append(got.jobs_per_s)
    with tempfile.TemporaryDirectory() as tmp:
        reads = _reads_us(url or str(Path(tmp) / "reads.db"))
    jobs = args.requests * args.images
    print(
        f"{label}: {statistics.median(rates):.0f} jobs/s"
        f" ({min(rates):.0f}-{max(rates):.0f}, {args.runs} runs of {jobs} paid jobs);"
        + "".join(f" {k} {v:.0f} us;" for k, v in reads.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    _run("SQLite file (FULL sync)", None, args)
    for fast in (False, True):
        cluster = start_cluster(fast=fast)
        try:
            label = "PostgreSQL, " + ("fsync off (tests)" if fast else "fsync on")
            _run(label, cluster, args)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
