"""The in-process harness: the coordinator's per-job work through the real `Dispatcher`."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing
from eth_account import Account
from eth_account.signers.local import LocalAccount

from bench.dispatch._parts import COMMIT, MODEL, bench_request
from bench.instant import noise_png
from sogni_app.api import authorize
from sogni_coordinator.billing import Billing
from sogni_coordinator.db import WriteStats
from sogni_coordinator.dispatch import MAX_LOOKAHEAD, Dispatcher, ResultRefused
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.node_session import results_at_once
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.results import SqliteResults
from sogni_coordinator.routing import Router
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Capabilities,
    JobImage,
    JobParams,
    Message,
    Offer,
    Receipt,
    RenderMeta,
    Result,
    ResultAck,
    decode,
    encode,
)
from sogni_protocol.settings import DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT


# --- baseline: the coordinator's per-job work, no network -----------------------------------
@dataclass
class Baseline:
    jobs: int
    seconds: float
    """Wall time of the in-process run minus the fake nodes' own time."""
    parts: dict[str, float]
    """Seconds per kind of coordinator task (trio task steps), plus loop idle time."""
    micro_us: dict[str, float]
    """Microseconds per call of individual primitives."""
    picks: int = 0
    """`Router.pick` calls (one per queued job `_match` looked at)."""
    matches: int = 0
    """`_match` calls (wake-ups of `Dispatcher.run`)."""
    nodes: int = 0
    """Fake nodes (one slot each)."""
    disk: WriteStats | None = None
    """What the database's writer did during the run: its commit groups and image groups
    (a job's ack waits for both, so they explain the loop's idle time)."""
    by_task: bool = True
    """`parts` came from a per-task-step instrument in this run (which costs the loop time
    itself); else only the loop's idle time and the fake nodes' own time were measured."""
    cpu_seconds: float = 0.0
    """CPU time of the loop's thread in the timed part, minus the fake nodes' own: steadier
    than wall time on a shared machine (no waits for a core or the disk in it)."""
    split: Baseline | None = None
    """A run of the same shape with `by_task`, whose parts split this one's time by task
    (set by the runner on the run it reports: the median of its clocked runs)."""

    @property
    def by_part(self) -> Baseline:
        """The run whose `parts` name every task: this one, or its `split`."""
        return self if self.by_task or self.split is None else self.split

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def busy_seconds(self) -> float:
        """Time the loop spent running coordinator code (not waiting for the commit thread)."""
        return self.seconds - self.parts.get(PART_IDLE, 0.0)


PART_NODE = "fake nodes (not counted)"
PART_LOOP = "`Dispatcher.run`: `_match`, signing offers, sweeps"
PART_READER = "node streams in: decode results, `accept_result`, acks, credit"
PART_WRITER = "node streams out: encode offers"
PART_CLIENT = "client streams: encode images"
PART_IDLE = "loop idle (waiting on I/O, e.g. a commit thread)"
PART_OTHER = "group commit and other coordinator tasks"


class _IdleClock(trio.abc.Instrument):
    """Wall time of the loop's I/O waits: two calls per loop turn, not per task step (trio
    calls only the hooks an instrument overrides), so the throughput run pays almost
    nothing for it."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = defaultdict(float)
        self._io = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._io = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self.steps[PART_IDLE] += time.perf_counter() - self._io


class _TaskClock(_IdleClock):
    """Also the wall time of every trio task step, by the task's name: two calls and a dict
    update per step (about seven steps per job; 3% of the loop's time under cProfile), so
    only the runs that split the time into parts use it."""

    def __init__(self) -> None:
        super().__init__()
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += time.perf_counter() - self._started


def _node_answer(offer_msg: Offer, wallet: LocalAccount, domain: Domain, image: bytes) -> bytes:
    """What a node sends back for an offer (node work: not counted)."""
    offer = offer_msg.offer
    receipt = Receipt(
        job_id=offer.job_id,
        offer_hash=eip712.offer_hash(domain, offer),
        worker=wallet.address,
        coordinator=offer.coordinator,
        model_id=offer.model_id,
        result_hash=hashlib.sha256(image).digest(),
        steps_done=offer.steps,
        work_units=offer.work_units,
        price_factor_bps=offer.price_factor_bps,
        completed_at=int(time.time()),
    )
    signature = eip712.sign_receipt(bytes(wallet.key), domain, receipt)
    meta = RenderMeta(backend="instant", device="cpu", dtype="none", threads=1)
    result = Result(
        job_id=offer.job_id, image=image, receipt=receipt, signature=signature, meta=meta
    )
    return encode(result)


def run_baseline(
    requests: int,
    images: int,
    nodes: int,
    workdir: Path,
    *,
    paid: bool = False,
    results: str = "folder",
    by_task: bool = True,
) -> Baseline:
    """The networked round's traffic through the real `Dispatcher`, minus the network.

    With `paid`, billing is on (`billing = "required"`): each request is signed by a funded
    payer, its quote reserved in the ledger, each receipt settled and the rest refunded, as in
    a paying network. `results`: the coordinator's `result_store` ("folder": files beside
    the database; "database": rows of its SQLite file, written with their receipts).
    `by_task`: split the loop's time by task (`_TaskClock`); without it, a run measures
    throughput as production code runs, with only the idle time and the fake nodes' time.
    """
    clock = _TaskClock() if by_task else _IdleClock()
    return trio.run(
        _baseline, requests, images, nodes, workdir, clock, paid, results, instruments=[clock]
    )


def _billing(workdir: Path, domain: Domain) -> tuple[Billing, Ledger]:
    ledger = Ledger(workdir / "baseline.db")
    return Billing(ledger, domain, mode="required"), ledger


async def _baseline(
    n_requests: int,
    n_images: int,
    n_nodes: int,
    workdir: Path,
    clock: _IdleClock,
    paid: bool,
    results: str,
) -> Baseline:
    """One trio loop holds the coordinator's code and 50 fake nodes, joined by memory channels.

    Per node link, as in `node_session`: a writer task encodes what the dispatcher sends, a
    reader task decodes results and settles `results_at_once` at a time (each awaits
    `accept_result`, encodes the ack and gives the credit back: `result_acked`; each node
    sent one `Ready` of slots + `MAX_LOOKAHEAD` and holds that many offers in hand, as
    `sogni_node.pull` does when its renders beat the round trip).
    Each request's events are encoded as its client stream would.
    `Dispatcher.run` does the matching as in production. A fake node decodes offers and signs
    receipts; the time of its steps is subtracted, everything else in the loop is the
    coordinator's (the node times its own work, with either clock, so the task switches to
    and from a node count as the coordinator's). Only the dispatcher's public API is used;
    `match` and `Router.pick` are wrapped on the instance to count them.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(workdir / "baseline.db")
    domain = Domain(DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT)
    signer = Account.create()
    billing, ledger = _billing(workdir, domain) if paid else (None, None)
    # As the coordinator runs it (`cli.py`): reputation in the store's file, so its updates
    # join the group commit's writes instead of one transaction per job on the event loop.
    reputation = Reputation(workdir / "baseline.db")
    dispatcher = Dispatcher(
        store,
        signer_key=bytes(signer.key),
        signer_address=signer.address,
        domain=domain,
        billing=billing,
        router=Router(reputation),
        results=SqliteResults(workdir / "baseline.db") if results == "database" else None,
    )
    payer = Account.create()
    if ledger is not None:  # enough paid Spark for every job
        ledger.credit_purchase(payer.address, 10 * n_requests * n_images)
    image = noise_png()
    counts = {"picks": 0, "matches": 0}
    pick = dispatcher.router.pick

    def counting_pick(*args: Any, **kwargs: Any) -> Any:
        counts["picks"] += 1
        return pick(*args, **kwargs)

    dispatcher.router.pick = counting_pick  # type: ignore[method-assign]
    match = dispatcher.match

    def counting_match() -> None:
        counts["matches"] += 1
        match()

    dispatcher.match = counting_match  # type: ignore[method-assign]

    n_jobs = n_requests * n_images
    node_seconds = [0.0]
    node_cpu = [0.0]
    all_delivered = trio.Event()
    delivered = 0

    async def client_stream(events: AsyncIterator[Message]) -> None:
        nonlocal delivered
        async for msg in events:
            encode(msg)
            if isinstance(msg, JobImage):
                delivered += 1
                if delivered == n_jobs:
                    all_delivered.set()

    async def node_writer(
        outbox: trio.MemoryReceiveChannel[Message], to_node: trio.MemorySendChannel[bytes]
    ) -> None:
        async for msg in outbox:
            to_node.send_nowait(encode(msg))

    async def fake_node(
        wallet: LocalAccount,
        from_coordinator: trio.MemoryReceiveChannel[bytes],
        to_coordinator: trio.MemorySendChannel[bytes],
    ) -> None:
        async for frame in from_coordinator:
            started, cpu = time.perf_counter(), time.thread_time()
            msg = decode(frame)
            if isinstance(msg, Offer):
                to_coordinator.send_nowait(_node_answer(msg, wallet, domain, image))
            node_seconds[0] += time.perf_counter() - started
            node_cpu[0] += time.thread_time() - cpu

    async def settle(link: NodeLink, result: Result, at_once: trio.Semaphore) -> None:
        try:
            try:
                await dispatcher.accept_result(link, result)
            except ResultRefused as exc:  # e.g. a straggler's copy, already receipted
                encode(ResultAck(job_id=result.job_id, accepted=False, reason=str(exc)[:512]))
            else:
                encode(ResultAck(job_id=result.job_id, accepted=True))
            dispatcher.result_acked(link)  # the ack gives the credit back: no `Ready`
        finally:
            at_once.release()

    async def node_reader(link: NodeLink, from_node: trio.MemoryReceiveChannel[bytes]) -> None:
        at_once = trio.Semaphore(results_at_once(link.slots))  # as `node_session` settles
        async with trio.open_nursery() as results:
            async for frame in from_node:
                result = decode(frame)
                assert isinstance(result, Result)
                await at_once.acquire()
                results.start_soon(settle, link, result, at_once, name=PART_READER)

    async def accept_request(r: int, nursery: trio.Nursery) -> None:
        """What `serve_client` does with each request."""
        req = bench_request(n_images, r * n_images)
        if paid:
            req = authorize(req, bytes(payer.key), domain)
        submission = await dispatcher.submit(req, client_peer="bench", allowed_models={MODEL})
        nursery.start_soon(client_stream, submission.events, name=PART_CLIENT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, name="dispatcher")
        wallets = [Account.create() for _ in range(n_nodes)]
        for i, wallet in enumerate(wallets):
            outbox_send, outbox_recv = trio.open_memory_channel[Message](math.inf)
            down_send, down_recv = trio.open_memory_channel[bytes](math.inf)
            up_send, up_recv = trio.open_memory_channel[bytes](math.inf)
            caps = Capabilities(
                peer_id=f"peer{i}",
                wallet=wallet.address,
                expiry=2**40,
                models=[MODEL],
                slots=1,
                backend="instant",
                device="cpu",
                max_pixels=0,
            )
            link = dispatcher.node_joined(f"peer{i}", caps, outbox_send)
            nursery.start_soon(node_writer, outbox_recv, down_send, name=PART_WRITER)
            nursery.start_soon(fake_node, wallet, down_recv, up_send, name=PART_NODE)
            nursery.start_soon(node_reader, link, up_recv, name=PART_READER)
        await trio.testing.wait_all_tasks_blocked()
        clock.steps.clear()
        node_seconds[0] = node_cpu[0] = 0.0
        before = store.write_stats()
        started, cpu_started = time.perf_counter(), time.thread_time()
        for r in range(n_requests):
            await accept_request(r, nursery)
        for link in list(dispatcher.nodes.values()):  # each node's one `Ready`, as
            # an instant node's renders beat any round trip: `sogni_node.pull` asks for the most
            dispatcher.ready(link, link.slots + MAX_LOOKAHEAD)
        await all_delivered.wait()
        wall = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started - node_cpu[0]
        disk = _since(before, store.write_stats())
        nursery.cancel_scope.cancel()
    parts: dict[str, float] = defaultdict(float)
    for name, seconds in clock.steps.items():
        parts[_part(name)] += seconds
    parts.pop(PART_NODE, None)  # the nodes' own timing is what is subtracted
    coordinator = wall - node_seconds[0]
    micro = _micro(store, bytes(signer.key), dispatcher.address, domain, wallets[0], image)
    if ledger is not None:
        ledger.close()
    reputation.close()
    dispatcher.results.close()
    store.close()
    return Baseline(
        n_jobs,
        coordinator,
        dict(parts),
        micro,
        counts["picks"],
        counts["matches"],
        n_nodes,
        disk,
        isinstance(clock, _TaskClock),
        cpu,
    )


def _since(before: WriteStats, after: WriteStats) -> WriteStats:
    return WriteStats(
        *(getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after))
    )


def _part(task_name: str) -> str:
    if task_name in (PART_NODE, PART_READER, PART_WRITER, PART_CLIENT, PART_IDLE):
        return task_name
    if task_name == "dispatcher" or "Dispatcher." in task_name:
        return PART_LOOP
    if "bench.dispatch" in task_name or "_baseline" in task_name:
        return "requests accepted (SQLite insert of every job)"
    return PART_OTHER


def _micro(
    store: Store, key: bytes, address: str, domain: Domain, wallet: LocalAccount, image: bytes
) -> dict[str, float]:
    """Microseconds per call of the primitives the coordinator runs once per job."""
    n = 300
    out: dict[str, float] = {}
    receipts = []
    for i in range(n):
        receipt = Receipt(
            job_id=os.urandom(32),
            offer_hash=os.urandom(32),
            worker=wallet.address,
            coordinator=address,
            model_id=MODEL,
            result_hash=hashlib.sha256(image).digest(),
            steps_done=1,
            work_units=1,
            completed_at=i,
        )
        receipts.append((receipt, eip712.sign_receipt(bytes(wallet.key), domain, receipt)))

    def each(name: str, fn: Callable[[int], object]) -> None:
        started = time.perf_counter()
        for i in range(n):
            fn(i)
        out[name] = (time.perf_counter() - started) / n * 1e6

    each(
        "ECDSA sign an offer digest (coincurve)",
        lambda i: eip712.sign_digest(key, receipts[i][0].job_id),
    )
    each(
        "recover a receipt signer (EIP-712 digest + ECDSA recover + checksum)",
        lambda i: eip712.recover_receipt_signer(domain, receipts[i][0], receipts[i][1]),
    )
    each("sha256 of a 12 KB image", lambda i: hashlib.sha256(image).digest())
    # store_receipt needs its job row (foreign key): add the jobs first, untimed
    request_id = os.urandom(32)
    params = JobParams(
        model_id=MODEL, positive_prompt="x", steps=1, guidance=1.0, width=64, height=64, seed=0
    )
    store.add_request(
        request_id,
        model_id=MODEL,
        network="fast",
        token_type="spark",
        client_peer="bench",
        jobs=[(r.job_id, params, 1) for r, _ in receipts],
    )
    each(
        COMMIT,
        lambda i: store.store_receipt(receipts[i][0], receipts[i][1], request_id),
    )
    return out
