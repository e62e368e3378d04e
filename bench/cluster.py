"""Coordinators on SQLite vs on one PostgreSQL, 1 to 3 of them (docs/SCALING.md, issue #18).

Each configuration runs real processes on 127.0.0.1: coordinators (`sogni-coordinator start`),
instant-backend nodes (`bench._nodes`: the real node daemon, no render cost), and paid client
requests sent to every coordinator at once (`bench.dispatch.network.run_round`). Per
configuration: jobs/s over the round, coordinator CPU per job (all coordinator processes), the
PostgreSQL server's CPU per job (all its processes), and per job the database's commits and
rows written (`pg_stat_database`). The same nodes in total whatever the coordinator count:
each coordinator gets its share, attached to it alone.

    .venv/bin/python -m bench.cluster [--jobs 400 --nodes 6 --rounds 2]
    .venv/bin/python -m bench cluster      # the BENCHMARKS.md section

PostgreSQL runs durable (fsync on, as deployed) unless `--fast`. On a 2-core machine every
process shares the cores: read CPU per job (what each added job costs) more than jobs/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from eth_account import Account

from bench import _common as common
from bench.dispatch.network import Round, run_round
from sogni_devnet.localnet import DEMO_KDF_N, DEMO_PASSWORD, Proc
from sogni_devnet.pg_cluster import PgCluster, start_cluster
from sogni_wallet.keystore import create_keystore

__all__ = ["Measured", "main", "measure", "render_markdown", "run"]


@dataclass(frozen=True)
class Config:
    label: str
    coordinators: int
    postgres: bool


CONFIGS = (
    Config("1 coordinator, SQLite", 1, False),
    Config("1 coordinator, PostgreSQL", 1, True),
    Config("2 coordinators, PostgreSQL", 2, True),
    Config("3 coordinators, PostgreSQL", 3, True),
)


@dataclass
class Measured:
    config: Config
    jobs: int = 0
    rates: list[float] = field(default_factory=list)
    coordinator_ms: list[float] = field(default_factory=list)
    """Coordinator CPU per job (ms), all coordinator processes together."""
    db_ms: list[float] = field(default_factory=list)
    """PostgreSQL server CPU per job (ms), all its processes."""
    commits: list[float] = field(default_factory=list)
    rows: list[float] = field(default_factory=list)
    """Rows inserted + updated + deleted per job."""
    others: list[float] = field(default_factory=list)
    """CPU seconds other processes took during the rounds (load from elsewhere)."""
    failed: int = 0


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc), for the server's backend processes."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _pg_cpu(pg: PgCluster) -> float:
    """CPU seconds the server has used so far (postmaster and its children; the ones that
    exited meanwhile are lost, so connections are held for the whole run)."""
    try:
        root = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return sum(common.cpu_seconds(p) for p in [root, *_children(root)])


def _pg_stats(url: str) -> tuple[int, int]:
    """(commits, rows written) of the benchmark's database so far."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _start(
    config: Config, workdir: Path, url: str | None, nodes: int, jobs: int
) -> tuple[list[Proc], list[Proc], list[str], bytes]:
    """Coordinators, then each one's nodes (a share of `nodes`); a payer funded for `jobs`."""
    from sogni_coordinator.ledger import Ledger

    env = common.base_env("warning")
    payer = Account.create()
    coordinators: list[Proc] = []
    signers: list[str] = []
    for i in range(config.coordinators):
        cdir = workdir / f"coordinator{i}"
        signers.append(
            create_keystore(cdir / "signer.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True)
        )
        database = url or str(cdir / "coordinator.db")
        if i == 0:  # one ledger for all on PostgreSQL; the SQLite coordinator's own file
            ledger = Ledger(database)
            ledger.credit_purchase(payer.address, 10 * jobs)
            ledger.close()
        cenv = {
            **env,
            "SOGNI_COORDINATOR_DATA_DIR": str(cdir),
            "SOGNI_COORDINATOR_LISTEN": "/ip4/127.0.0.1/tcp/0",
            "SOGNI_COORDINATOR_DATABASE": database,
            "SOGNI_COORDINATOR_HTTP_LISTEN": "127.0.0.1:0",
        }
        if url is not None:
            cenv["SOGNI_COORDINATOR_RESULTS_DIR"] = str(workdir / "results")
            cenv["SOGNI_COORDINATOR_RESULT_URL_KEY_FILE"] = str(workdir / "result-url.key")
        coordinators.append(
            common.spawn(f"coordinator{i}", ["-m", "bench._coordinator"], cenv, workdir)
        )
    addrs = [str(c.wait_event("ready", 120)["addrs"][0]) for c in coordinators]
    node_procs: list[Proc] = []
    for i, addr in enumerate(addrs):
        count = nodes // len(addrs) + (1 if i < nodes % len(addrs) else 0)
        argv = [
            "-m", "bench._nodes",
            "--count", str(count),
            "--coordinator", addr,
            "--trusted", signers[i],
            "--data-dir", str(workdir / f"nodes{i}"),
        ]  # fmt: skip
        node_procs.append(common.spawn(f"nodes{i}", argv, env, workdir))
    for proc in node_procs:
        proc.wait_event("connected", 180)
    return coordinators, node_procs, addrs, bytes(payer.key)


async def _rounds(
    addrs: list[str], requests: int, images: int, seed: int, payer: bytes
) -> list[Round]:
    """One round per coordinator, all at once (each gets `requests` of `images`)."""
    out: list[Round] = []

    async def one(addr: str, k: int) -> None:
        out.append(await run_round(addr, requests, images, seed + k * 10**6, payer))

    async with trio.open_nursery() as nursery:
        for k, addr in enumerate(addrs):
            nursery.start_soon(one, addr, k)
    return out


def measure(
    config: Config, *, jobs: int, nodes: int, rounds: int, fast: bool, keep: bool = False
) -> Measured:
    result = Measured(config)
    workdir = Path(tempfile.mkdtemp(prefix="sogni-bench-cluster-"))
    pg = start_cluster(fast=fast, owner_pid=os.getpid()) if config.postgres else None
    procs: list[Proc] = []
    try:
        url = pg.create_database("bench") if pg is not None else None
        coordinators, node_procs, addrs, payer = _start(config, workdir, url, nodes, jobs)
        procs += [*coordinators, *node_procs]
        requests = 4  # per coordinator
        images = max(1, jobs // (requests * len(addrs)))
        result.jobs = images * requests * len(addrs)
        trio.run(_rounds, addrs, requests, images, 1, payer)  # warm-up: caches, connections
        for r in range(rounds):
            cpu0 = sum(common.cpu_seconds(c.popen.pid) for c in coordinators)
            busy0 = common.system_busy_seconds()
            db0 = _pg_cpu(pg) if pg is not None else float("nan")
            stats0 = _pg_stats(url) if url is not None else (0, 0)
            started = time.perf_counter()
            got = trio.run(_rounds, addrs, requests, images, 10**7 * (r + 1), payer)
            wall = time.perf_counter() - started
            db1 = _pg_cpu(pg) if pg is not None else float("nan")
            stats1 = _pg_stats(url) if url is not None else (0, 0)
            cpu1 = sum(common.cpu_seconds(c.popen.pid) for c in coordinators)
            done = sum(g.jobs for g in got)
            result.failed += sum(g.failed for g in got)
            span = max(g.wall for g in got)
            result.rates.append(done / span)
            result.coordinator_ms.append((cpu1 - cpu0) / done * 1e3)
            result.db_ms.append((db1 - db0) / done * 1e3)
            result.commits.append((stats1[0] - stats0[0]) / done)
            result.rows.append((stats1[1] - stats0[1]) / done)
            result.others.append(
                common.busy_elsewhere(cpu1 - cpu0, busy0, common.system_busy_seconds())
                if wall > 0
                else float("nan")
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if pg is not None:
            pg.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _med(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values or all(v != v for v in values):  # NaN: not measured
        return "-"
    return common.spread(values, fmt)


def render_markdown(results: list[Measured], command: str, fast: bool) -> str:
    rows = [
        (
            m.config.label,
            m.jobs,
            _med(m.rates),
            _med(m.coordinator_ms, "{:.2f}"),
            _med(m.db_ms, "{:.2f}") if m.config.postgres else "-",
            _med(m.commits, "{:.1f}") if m.config.postgres else "-",
            _med(m.rows, "{:.1f}") if m.config.postgres else "-",
            m.failed,
        )
        for m in results
    ]
    engine = "fsync off (test settings)" if fast else "fsync on (as deployed)"
    return (
        "## Cluster: coordinators on SQLite vs one PostgreSQL\n\n"
        f"`{command}`: real coordinator and node processes (instant backend), paid requests "
        "sent to every coordinator at once, the same nodes in total split between the "
        f"coordinators; PostgreSQL {engine}. Median of the timed rounds (min-max).\n\n"
        + common.table(
            (
                "configuration",
                "jobs/round",
                "jobs/s",
                "coordinator CPU ms/job",
                "PostgreSQL CPU ms/job",
                "commits/job",
                "rows written/job",
                "failed",
            ),
            rows,
        )
        + "\n"
    )


def run(quick: bool, command: str, *, fast: bool = False, keep: bool = False) -> str:
    jobs, rounds = (200, 2) if quick else (400, 3)
    results = [measure(c, jobs=jobs, nodes=6, rounds=rounds, fast=fast, keep=keep) for c in CONFIGS]
    return render_markdown(results, command, fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per round, all coordinators")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL with fsync off")
    parser.add_argument("--only", type=int, default=None, help="run CONFIGS[i] only")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    from sogni_protocol.logs import configure_logging

    configure_logging("warning")
    configs = CONFIGS if args.only is None else (CONFIGS[args.only],)
    results = []
    for c in configs:
        m = measure(
            c, jobs=args.jobs, nodes=args.nodes, rounds=args.rounds, fast=args.fast, keep=args.keep
        )
        print(render_markdown([m], "python -m bench.cluster", args.fast), flush=True)
        results.append(m)
    print(render_markdown(results, "python -m bench.cluster", args.fast))


if __name__ == "__main__":
    main()
