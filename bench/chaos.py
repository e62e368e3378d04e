"""Chaos soak: paid requests finish exactly once while node and coordinator processes die.

`python -m bench chaos` starts a coordinator and 10 node processes (`bench._chaos_node`: the
real node daemon over a stub backend that takes `render_seconds` per image) on a restartable
`Cluster`, has 10 clients each send a paid request of 100 images through
`sogni_app.api.render` (which resumes after breaks), and meanwhile:

- node kill rule: every `tick` (0.5 s), each node process that has finished starting is
  SIGKILLed with probability `kill_probability` (10%), and restarted at once on its data
  (wallet, peer key, journal): a node lives about 5 s between kills;
- the coordinator is SIGKILLed `coordinator_restarts` times (2), each when the store's
  receipt count first passes a random point of its own slice of the run, and restarted on
  the same port, key and database.

When every client has its `RequestDone` it checks the floors from the clients and the
coordinator's own database: every job delivered, each exactly once (duplicates at clients
0); one receipt and one settlement per job (paid twice 0); the ledger balanced (totals zero,
no reservation left, no account below zero) with the payer charged exactly the sum of its
quotes; every daemon alive. A missed floor exits non-zero and keeps the work folder.

`tests/crash/test_chaos_short.py` runs the same soak small, its kills triggered by receipt
counts instead of the clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio
from eth_account import Account

from bench import _common as common
from sogni_app.api import ResumeTicket, render
from sogni_coordinator.ledger import ISSUERS, Ledger
from sogni_devnet.cluster import Cluster
from sogni_protocol.messages import RenderRequest

MODEL = "sogni-tiny-sd"
FUNDS_SPARK_PER_JOB = 10


@dataclass(frozen=True)
class Settings:
    nodes: int = 10
    clients: int = 10
    images: int = 100
    """Per client request."""
    render_seconds: float = 0.2
    """Per image on a node, so that a kill often lands on a job in flight."""
    kill_probability: float = 0.1
    tick: float = 0.5
    node_kills_at: tuple[int, ...] = ()
    """Receipt counts at which a node is killed (deterministic; the test); with the clock rule."""
    coordinator_restarts: int = 2
    coordinator_kills_at: tuple[int, ...] = ()
    """Receipt counts for the coordinator kills; empty: random, one per slice of the run."""
    runs: int = 1
    deadline: float = 900.0
    seed: int | None = None
    keep: bool = False

    @property
    def jobs(self) -> int:
        return self.clients * self.images


QUICK = Settings(clients=4, images=50, coordinator_restarts=1)


@dataclass
class _Client:
    request_id: bytes = b""
    quoted_micro: int = 0
    handed: list[bytes] = field(default_factory=list)
    """Job ids as `on_image` got them, duplicates included."""
    failed: list[str] = field(default_factory=list)
    """The reasons of the `JobFailed` the client got."""
    error: str = ""
    done_at: float = 0.0


@dataclass
class Outcome:
    """One soak's figures, from the clients and from the coordinator's database."""

    requested: int = 0
    delivered: int = 0
    """Jobs of the requests whose image reached their client."""
    duplicates: int = 0
    failed: int = 0
    failure_reasons: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    receipts: int = 0
    receipts_match: bool = False
    """The receipts' job ids are exactly the requests' job ids."""
    settlements: int = 0
    settled_jobs: int = 0
    wrong_worker: int = 0
    """Settlements paid to another wallet than the one that signed the job's receipt."""
    quoted_micro: int = 0
    charged_micro: int = 0
    totals_zero: bool = False
    reservations_left: int = 0
    negative_accounts: list[str] = field(default_factory=list)
    node_kills: int = 0
    node_restarts: int = 0
    requeued: int = 0
    """Jobs re-queued because the node holding them died."""
    restored: int = 0
    """Live jobs re-queued by a restarted coordinator."""
    coordinator_restarts: int = 0
    coordinator_down: list[float] = field(default_factory=list)
    drain: float = 0.0
    alive: bool = False
    load: float = 0.0
    """1-minute load average when the soak started: other work shares the cores."""
    seed: int = 0
    workdir: str = ""

    @property
    def paid_twice(self) -> int:
        return self.settlements - self.settled_jobs

    def missed(self) -> list[str]:
        """The floors this run missed, in words; empty when it passed."""
        checks = [
            (self.delivered == self.requested and not self.errors, "not every job delivered"),
            (self.duplicates == 0, f"{self.duplicates} duplicates at clients"),
            (self.failed == 0, f"{self.failed} jobs failed ({dict(self.failure_reasons)})"),
            (self.receipts_match and self.receipts == self.requested, "receipts != jobs"),
            (self.settled_jobs == self.requested, "settlements != jobs"),
            (self.paid_twice == 0, f"{self.paid_twice} jobs paid twice"),
            (self.wrong_worker == 0, f"{self.wrong_worker} jobs paid to the wrong worker"),
            (self.charged_micro == self.quoted_micro, "payer not charged its quotes"),
            (self.totals_zero, "ledger totals not zero"),
            (self.reservations_left == 0, f"{self.reservations_left} reservations left"),
            (not self.negative_accounts, f"negative accounts {self.negative_accounts}"),
            (self.alive, "a daemon was left dead"),
        ]
        return [why for ok, why in checks if not ok] + self.errors


# --- the soak -------------------------------------------------------------------------------
def _receipt_count(database: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
    except sqlite3.Error:  # mid-restart or before the schema: nothing counted yet
        return 0


def _coordinator_points(settings: Settings, rng: random.Random) -> list[int]:
    """One receipt count per coordinator kill, each random within its slice of 10-85%."""
    if settings.coordinator_kills_at:
        return sorted(settings.coordinator_kills_at)
    n = settings.coordinator_restarts
    width = 0.75 / max(n, 1)
    return [int(settings.jobs * (0.1 + width * (k + rng.random()))) for k in range(n)]


class _Chaos:
    """The supervisor: kills and restarts processes of `cluster` while the clients run."""

    def __init__(self, cluster: Cluster, settings: Settings, rng: random.Random) -> None:
        self.cluster = cluster
        self.settings = settings
        self.rng = rng
        self.up: set[int] = set()
        self.outcome = Outcome()
        self.receipts = 0
        self.over = trio.Event()

    async def _poll_receipts(self) -> None:
        while not self.over.is_set():
            self.receipts = await trio.to_thread.run_sync(_receipt_count, self.cluster.database)
            await trio.sleep(0.05)

    async def _reached(self, count: int) -> bool:
        """Wait until the store holds `count` receipts; False if the run ended first."""
        while self.receipts < count and not self.over.is_set():
            await trio.sleep(0.02)
        return not self.over.is_set()

    async def start_node(self, i: int) -> None:
        await trio.to_thread.run_sync(self.cluster.start_node, i)
        self.up.add(i)

    async def _kill_node(self, i: int, nursery: trio.Nursery) -> None:
        self.up.discard(i)
        await trio.to_thread.run_sync(self.cluster.kill, self.cluster.node_procs[i])
        self.outcome.node_kills += 1

        async def restart() -> None:
            await self.start_node(i)
            self.outcome.node_restarts += 1

        nursery.start_soon(restart)

    async def _clock_kills(self, nursery: trio.Nursery) -> None:
        s = self.settings
        while s.kill_probability > 0:
            with trio.move_on_after(s.tick):
                await self.over.wait()
            if self.over.is_set():
                return
            for i in sorted(self.up):
                if self.rng.random() < s.kill_probability:
                    await self._kill_node(i, nursery)

    async def _counted_kills(self, nursery: trio.Nursery) -> None:
        for k, count in enumerate(sorted(self.settings.node_kills_at)):
            if not await self._reached(count):
                return
            while not self.up and not self.over.is_set():  # all restarting: the next one up
                await trio.sleep(0.05)
            if self.over.is_set():
                return
            candidates = sorted(self.up)
            await self._kill_node(candidates[k % len(candidates)], nursery)

    async def _coordinator_kills(self, points: list[int], accepted: Callable[[], bool]) -> None:
        while not accepted():  # a request is sent once: a kill before its answer would lose it
            if self.over.is_set():
                return
            await trio.sleep(0.02)
        for count in points:
            if not await self._reached(count):
                return
            assert self.cluster.coordinator is not None
            down = time.perf_counter()
            await trio.to_thread.run_sync(self.cluster.kill, self.cluster.coordinator)
            await trio.to_thread.run_sync(self.cluster.start_coordinator)
            self.outcome.coordinator_down.append(time.perf_counter() - down)
            self.outcome.coordinator_restarts += 1

    async def run(
        self,
        clients: Callable[[], Awaitable[None]],
        points: list[int],
        accepted: Callable[[], bool],
    ) -> None:
        """Run the clients under chaos; return once they are done and every restart is."""
        # the outer nursery holds the restarts: they finish after the chaos tasks have stopped
        async with trio.open_nursery() as restarts, trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_receipts)
            nursery.start_soon(self._clock_kills, restarts)
            nursery.start_soon(self._counted_kills, restarts)
            nursery.start_soon(self._coordinator_kills, points, accepted)
            with trio.move_on_after(self.settings.deadline):
                await clients()
            self.over.set()


def _request(settings: Settings, c: int) -> RenderRequest:
    return RenderRequest(
        model_id=MODEL,
        positive_prompt=f"chaos soak client {c}",
        steps=1,
        guidance=1.0,
        width=64,
        height=64,
        seed=c * settings.images,
        number_of_images=settings.images,
    )


async def _client(addr: str, request: RenderRequest, payer_key: bytes, rec: _Client) -> None:
    def on_accepted(ticket: ResumeTicket) -> None:
        rec.request_id = ticket.request_id

    try:
        result = await render(
            addr,
            request,
            payer_key=payer_key,
            on_image=lambda image: rec.handed.append(image.job_id),
            on_accepted=on_accepted,
            reconnect_for=120.0,
            idle_timeout=120.0,
        )
    except Exception as exc:  # counted as a missed floor, with its words
        rec.error = f"client: {type(exc).__name__}: {exc}"
    else:
        rec.request_id, rec.quoted_micro = result.request_id, result.cost_micro
        rec.failed = [reason for _, reason in result.failed]
    rec.done_at = time.perf_counter()


def _audit(cluster: Cluster, payer: str, funds_micro: int, clients: list[_Client]) -> Outcome:
    """The floors' figures from the clients and the coordinator's database (store, ledger)."""
    out = Outcome(quoted_micro=sum(c.quoted_micro for c in clients))
    with contextlib.closing(sqlite3.connect(f"file:{cluster.database}?mode=ro", uri=True)) as db:
        jobs: dict[bytes, set[bytes]] = {}
        for job_id, request_id in db.execute("SELECT job_id, request_id FROM jobs"):
            jobs.setdefault(bytes(request_id), set()).add(bytes(job_id))
        workers = {
            bytes(j): str(w).lower() for j, w in db.execute("SELECT job_id, worker FROM receipts")
        }
        receipts = list(workers)
        settlements = db.execute("SELECT COUNT(*) FROM ledger_tx WHERE kind = 'settle'")
        out.settlements = int(settlements.fetchone()[0])
        paid_to = {
            str(j): str(w).lower() for j, w in db.execute("SELECT job_id, worker FROM ledger_jobs")
        }
    settled = set(paid_to)
    out.wrong_worker = sum(1 for j, w in workers.items() if paid_to.get(j.hex(), w) != w)
    all_jobs = set().union(*jobs.values()) if jobs else set()
    out.requested = sum(len(jobs.get(c.request_id, ())) for c in clients)
    for c in clients:
        mine = jobs.get(c.request_id, set())
        out.delivered += len(mine & set(c.handed))
        out.duplicates += len(c.handed) - len(set(c.handed))
        out.failed += len(c.failed)
        out.failure_reasons.update(c.failed)
        if c.error:
            out.errors.append(c.error)
    out.receipts = len(receipts)
    out.receipts_match = sorted(receipts) == sorted(all_jobs)
    out.settled_jobs = len(settled & {j.hex() for j in all_jobs})
    ledger = Ledger(cluster.database)
    try:
        out.totals_zero = set(ledger.totals().values()) == {0}
        out.reservations_left = len(ledger.open_reservations())
        balances = ledger.balances()
        out.reservations_left += sum(1 for a in balances if a.startswith("reserved:"))
        out.negative_accounts = [
            a for a, amounts in balances.items() if a not in ISSUERS and min(amounts.values()) < 0
        ]
        out.charged_micro = funds_micro - ledger.balance(payer)["spark_paid"]
    finally:
        ledger.close()
    return out


def _coordinator_log_counts(cluster: Cluster) -> tuple[int, int]:
    """(jobs re-queued because their node died, jobs restored by a restarted coordinator),
    from the JSON log lines of every coordinator run."""
    requeued = restored = 0
    for path in cluster.log_files():
        if not path.name.startswith("coordinator."):
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "job_requeued" not in line and "jobs_restored" not in line:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if event.get("event") == "job_requeued":
                    requeued += str(event.get("reason", "")).startswith("node left")
                elif event.get("event") == "jobs_restored":
                    restored += int(event.get("jobs", 0))
    return requeued, restored


async def soak(settings: Settings, workdir: Path) -> Outcome:
    """One run: start the cluster, render under chaos, audit, stop."""
    seed = settings.seed if settings.seed is not None else random.randrange(2**32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rng = random.Random(seed)
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        workdir,
        models,
        nodes=settings.nodes,
        node_command=["bench._chaos_node", "--render-seconds", str(settings.render_seconds)],
        node_env={
            "PYTHONPATH": str(common.REPO),  # `bench` is not installed: run from the checkout
            "SOGNI_NODE_DEVICE": "cpu",
            "SOGNI_NODE_SHUTDOWN_GRACE": "1",
        },
    )
    payer = Account.create()
    funds_spark = FUNDS_SPARK_PER_JOB * settings.jobs
    cluster.fund(payer.address, funds_spark)
    chaos = _Chaos(cluster, settings, rng)
    clients = [_Client() for _ in range(settings.clients)]
    try:
        await trio.to_thread.run_sync(cluster.start_coordinator)
        async with trio.open_nursery() as nursery:
            for i in range(settings.nodes):
                nursery.start_soon(chaos.start_node, i)
        started = time.perf_counter()

        async def all_clients() -> None:
            async with trio.open_nursery() as nursery:
                for c, rec in enumerate(clients):
                    request = _request(settings, c)
                    nursery.start_soon(_client, cluster.addr, request, bytes(payer.key), rec)

        points = _coordinator_points(settings, rng)
        await chaos.run(all_clients, points, lambda: all(c.request_id for c in clients))
        drained = max((c.done_at for c in clients), default=started) - started
        alive = cluster.alive()
        out = await trio.to_thread.run_sync(
            _audit, cluster, payer.address, funds_spark * 1_000_000, clients
        )
    finally:
        await trio.to_thread.run_sync(cluster.stop)
    if not all(c.done_at for c in clients):
        out.errors.append(f"not drained within {settings.deadline:.0f} s")
    for name in ("node_kills", "node_restarts", "coordinator_restarts", "coordinator_down"):
        setattr(out, name, getattr(chaos.outcome, name))
    out.requeued, out.restored = _coordinator_log_counts(cluster)
    out.drain, out.alive, out.seed, out.workdir = drained, alive, seed, str(workdir)
    out.load = load
    return out


# --- the benchmark section ------------------------------------------------------------------
def render_markdown(settings: Settings, outcomes: list[Outcome], command: str) -> str:
    s = settings

    def cell(values: list[float], fmt: str = "{:.0f}") -> str:
        return common.spread(values, fmt) if len(values) > 1 else fmt.format(values[0])

    def figure(get: Callable[[Outcome], float], fmt: str = "{:.0f}") -> str:
        return cell([float(get(o)) for o in outcomes], fmt)

    rows = [
        ("jobs requested", figure(lambda o: o.requested)),
        ("delivered (each exactly once)", figure(lambda o: o.delivered)),
        ("duplicates at clients", figure(lambda o: o.duplicates)),
        ("failed jobs", figure(lambda o: o.failed)),
        ("receipts in the coordinator store", figure(lambda o: o.receipts)),
        ("jobs paid twice / paid to another worker", _pair(outcomes)),
        ("payer charged / sum of quotes (Spark)", _charged(outcomes)),
        ("ledger totals / reservations left", _ledger(outcomes)),
        ("node SIGKILLs (all restarted)", figure(lambda o: o.node_kills)),
        ("jobs re-queued because their node died", figure(lambda o: o.requeued)),
        ("coordinator SIGKILLs + restarts", figure(lambda o: o.coordinator_restarts)),
        (
            "coordinator down, kill to ready (s)",
            cell([d for o in outcomes for d in o.coordinator_down] or [0.0], "{:.1f}"),
        ),
        ("live jobs restored by restarted coordinators (sum)", figure(lambda o: o.restored)),
        ("time to drain (s)", figure(lambda o: o.drain, "{:.1f}")),
        ("jobs/s under chaos", figure(lambda o: o.requested / o.drain, "{:.1f}")),
        ("load average at start (other work here)", figure(lambda o: o.load, "{:.1f}")),
    ]
    missed = [m for o in outcomes for m in o.missed()]
    verdict = "all met" if not missed else "MISSED: " + "; ".join(missed)
    runs = f"median (min-max) of {len(outcomes)} runs" if len(outcomes) > 1 else "one run"
    return "\n".join(
        [
            "## Chaos soak",
            "",
            f"`{command}`: {s.clients} clients each send a paid request of {s.images} images "
            f"(`sogni_app.api.render`, resuming after breaks) to a coordinator and {s.nodes} "
            f"node processes (the real node daemon, `bench._chaos_node`, over a stub backend "
            f"taking {s.render_seconds:g} s per image), all on this machine.",
            "",
            f"Kill rule: every {s.tick:g} s each node process that has finished starting is "
            f"SIGKILLed with probability {s.kill_probability:.0%} and restarted at once on its "
            f"data (wallet, peer key, journal); the coordinator is SIGKILLed "
            f"{s.coordinator_restarts} time{'s' if s.coordinator_restarts != 1 else ''}, each "
            f"when the store's receipt count passes a random point of its own slice of the "
            f"run, and restarted on the same port, key and database. Seeds: "
            f"{', '.join(str(o.seed) for o in outcomes)}.",
            "",
            f"Floors: every job delivered, duplicates 0, paid twice 0, the payer charged "
            f"exactly its quotes, ledger balanced with no reservation left, every daemon "
            f"alive at the end ({runs}: {verdict}).",
            "",
            common.table(("", runs), rows),
        ]
    )


def _pair(outcomes: list[Outcome]) -> str:
    return f"{max(o.paid_twice for o in outcomes)} / {max(o.wrong_worker for o in outcomes)}"


def _charged(outcomes: list[Outcome]) -> str:
    o = outcomes[len(outcomes) // 2]
    same = all(x.charged_micro == x.quoted_micro for x in outcomes)
    return f"{o.charged_micro / 1e6:g} / {o.quoted_micro / 1e6:g}" + (
        " (equal in every run)" if same and len(outcomes) > 1 else ""
    )


def _ledger(outcomes: list[Outcome]) -> str:
    zero = all(o.totals_zero for o in outcomes)
    left = max(o.reservations_left for o in outcomes)
    return f"{'0' if zero else 'NOT ZERO'} / {left}"


def run(quick: bool, command: str, *, keep: bool = False) -> str:
    """The BENCHMARKS.md section; `SystemExit` naming the floors when a run missed one."""
    settings = replace(QUICK if quick else Settings(), keep=keep)
    # the clients redial a dead coordinator by design: py-libp2p logs each refused dial
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
    outcomes = []
    for _ in range(settings.runs):
        workdir = Path(tempfile.mkdtemp(prefix="sogni-chaos-"))
        outcome = trio.run(soak, settings, workdir)
        outcomes.append(outcome)
        if not settings.keep and not outcome.missed():
            shutil.rmtree(workdir, ignore_errors=True)
    text = render_markdown(settings, outcomes, command)
    failed = [o for o in outcomes if o.missed()]
    if failed:
        print(text)
        raise SystemExit(
            "chaos: floors missed: "
            + "; ".join(f"{o.missed()} (work folder kept: {o.workdir})" for o in failed)
        )
    return text
