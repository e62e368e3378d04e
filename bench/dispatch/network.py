"""The networked harness: a coordinator process, node processes, and timed client rounds."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing
from eth_account import Account

from bench import _common as common
from bench.dispatch._parts import Settings, bench_request
from sogni_app.api import authorize
from sogni_coordinator.ledger import Ledger
from sogni_devnet.localnet import DEMO_KDF_N, DEMO_PASSWORD, Proc
from sogni_net import open_host
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    JobFailed,
    JobImage,
    RequestAccepted,
    RequestDone,
)
from sogni_protocol.settings import DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT
from sogni_wallet.keystore import create_keystore


# --- the networked benchmark ----------------------------------------------------------------
@dataclass
class Round:
    jobs: int
    failed: int
    wall: float
    latencies: list[float]
    """Per job: request accepted -> image at the client (seconds)."""
    arrivals: dict[bytes, tuple[float, float]]
    """job id -> (request accepted, image received), both `time.time()`."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds during the round: coordinator, nodes (all processes), client, others."""
    window: float = float("nan")
    """Wall seconds between the CPU snapshots (a little longer than `wall`)."""
    coordinator_thread: tuple[float, float] = (float("nan"), float("nan"))
    """The coordinator's trio thread: seconds on a CPU, seconds runnable waiting for one."""
    receipted: list[float] = field(default_factory=list)
    """Per job: request accepted -> receipt committed at the coordinator (seconds)."""

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall


@dataclass
class _Outcome:
    sent: float
    done: float
    latencies: list[float]
    arrivals: dict[bytes, tuple[float, float]]
    failed: int


async def _client_request(
    addr: str,
    images: int,
    seed: int,
    gate: trio.Event,
    out: list[_Outcome],
    payer_key: bytes | None,
) -> None:
    """One app with its own libp2p host; sends its request when `gate` opens. With
    `payer_key` the request is paid: signed for the coordinator's (default) domain."""
    request = bench_request(images, seed)
    if payer_key is not None:
        request = authorize(request, payer_key, Domain(DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT))
    async with open_host(key_path=None, listen=()) as host:
        channel = await host.open_channel(addr, CLIENT_PROTOCOL, timeout=30.0, direct=True)
        await gate.wait()
        sent = time.perf_counter()
        await channel.send(request)
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=120.0)
        if not isinstance(first, RequestAccepted):
            raise RuntimeError(f"request not accepted: {first!r}")
        accepted, accepted_wall = time.perf_counter(), time.time()
        outcome = _Outcome(sent, 0.0, [], {}, 0)
        while True:
            msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=300.0)
            if isinstance(msg, JobImage):
                outcome.latencies.append(time.perf_counter() - accepted)
                outcome.arrivals[msg.job_id] = (accepted_wall, time.time())
            elif isinstance(msg, JobFailed):
                outcome.failed += 1
            elif isinstance(msg, RequestDone):
                break
        outcome.done = time.perf_counter()
        await channel.close()
        out.append(outcome)


async def run_round(
    addr: str, requests: int, images: int, seed: int, payer_key: bytes | None = None
) -> Round:
    out: list[_Outcome] = []
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(requests):
            nursery.start_soon(
                _client_request, addr, images, seed + i * images, gate, out, payer_key
            )
        await trio.sleep(1.0)  # hosts up and channels open before the clock starts
        gate.set()
    start = min(o.sent for o in out)
    end = max(o.done for o in out)
    latencies = [lat for o in out for lat in o.latencies]
    arrivals = {k: v for o in out for k, v in o.arrivals.items()}
    return Round(len(latencies), sum(o.failed for o in out), end - start, latencies, arrivals)


def _receipt_times(database: Path, arrivals: dict[bytes, tuple[float, float]]) -> list[float]:
    """accepted -> receipt committed, per job, from the coordinator's own receipts table."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT job_id, stored_at FROM receipts").fetchall()
    except sqlite3.Error:
        return []  # schema changed: the breakdown is left out, the benchmark still stands
    stored = {bytes(job_id): float(at) for job_id, at in rows}
    return [stored[j] - accepted for j, (accepted, _) in arrivals.items() if j in stored]


@dataclass
class Network:
    coordinator: Proc
    nodes: list[Proc]
    addr: str
    database: Path
    payer_key: bytes
    """A payer funded in the coordinator's ledger before it started, for the paid rounds."""

    def cpu(self) -> dict[str, float]:
        return {
            "coordinator": common.cpu_seconds(self.coordinator.popen.pid),
            "nodes": sum(common.cpu_seconds(p.popen.pid) for p in self.nodes),
            "client": time.process_time(),
            "machine": common.system_busy_seconds(),
        }

    def timed_round(self, settings: Settings, seed: int, *, paid: bool = False) -> Round:
        before = self.cpu()
        thread_before = common.schedstat(self.coordinator.popen.pid)
        started = time.perf_counter()
        result = trio.run(
            run_round,
            self.addr,
            settings.requests,
            settings.images_per_request,
            seed,
            self.payer_key if paid else None,
        )
        result.window = time.perf_counter() - started
        thread_after = common.schedstat(self.coordinator.popen.pid)
        after = self.cpu()
        result.cpu = {k: after[k] - before[k] for k in before if k != "machine"}
        result.cpu["others"] = common.busy_elsewhere(
            sum(result.cpu.values()), before["machine"], after["machine"]
        )
        result.coordinator_thread = (
            thread_after[0] - thread_before[0],
            thread_after[1] - thread_before[1],
        )
        result.receipted = _receipt_times(self.database, result.arrivals)
        return result


def start_network(
    settings: Settings,
    workdir: Path,
    procs: list[Proc],
    *,
    node_trees: dict[int, Path] | None = None,
) -> Network:
    """Start the coordinator and the node processes; `node_trees` maps a node process's
    index to another source tree it runs from (`bench.dispatch.node_ab`)."""
    env = common.base_env("info")
    cdir = workdir / "coordinator"
    signer = create_keystore(cdir / "signer.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True)
    payer = Account.create()
    ledger = Ledger(cdir / "coordinator.db")  # billing "optional": paid when a payer signs
    ledger.credit_purchase(payer.address, 10 * settings.jobs * (settings.rounds + 1))
    ledger.close()
    cenv = {
        **env,
        "SOGNI_COORDINATOR_DATA_DIR": str(cdir),
        "SOGNI_COORDINATOR_LISTEN": "/ip4/127.0.0.1/tcp/0",
    }
    coordinator = common.spawn(
        "coordinator",
        ["-m", "bench._coordinator", "--profile-out", str(workdir / "coordinator.prof")],
        cenv,
        workdir,
    )
    procs.append(coordinator)
    addr = str(coordinator.wait_event("ready", 60)["addrs"][0])
    nodes = []
    for p in range(settings.processes):
        argv = [
            "-m", "bench._nodes",
            "--count", str(settings.nodes_per_process),
            "--coordinator", addr,
            "--trusted", signer,
            "--data-dir", str(workdir / f"nodes{p}"),
        ]  # fmt: skip
        tree = (node_trees or {}).get(p)
        penv = env if tree is None else {**env, "PYTHONPATH": str(tree)}
        proc = common.spawn(f"nodes{p}", argv, penv, workdir)
        procs.append(proc)
        nodes.append(proc)
    for proc in nodes:
        proc.wait_event("connected", 180)
    return Network(coordinator, nodes, addr, cdir / "coordinator.db", bytes(payer.key))
