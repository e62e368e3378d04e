"""The crash matrix: real `sogni-coordinator`, `sogni-node` and `sogni` processes, each killed
with SIGKILL at a named point (`SOGNI_CRASHPOINT`, `sogni_protocol/crashpoints.py`), not after
a guessed delay, then restarted on the same data.

Each case asserts: the process really died there (exit by SIGKILL); the request ends with
every image at the client exactly once; the coordinator holds exactly one receipt per job;
the payer paid exactly the quote, once; the ledger balances with nothing left reserved; and
every daemon is alive and serving afterwards (the next case renders on it).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import trio
from eth_account import Account

from sogni_app.api import RenderResult, render
from sogni_coordinator.ledger import ISSUERS, Ledger
from sogni_devnet.cluster import Cluster
from sogni_devnet.localnet import Proc
from sogni_node.models import ensure_tiny_model
from sogni_protocol.messages import RenderRequest

MODEL = "sogni-tiny-sd"
IMAGES = 3
FUNDS_SPARK = 1_000
NODE_POINTS = [
    "node_before_journal",
    "node_after_journal",
    "node_before_send_result",
    "node_after_send_result",
]
COORDINATOR_POINTS = [
    "coordinator_before_receipt_commit",
    "coordinator_after_receipt_commit",
    "coordinator_before_ack",
    "coordinator_after_ack",
    "coordinator_before_image_stream",
    "coordinator_after_image_stream",
]


class World:
    """The cluster plus what the cases have spent, to check the payer's balance."""

    def __init__(self, cluster: Cluster, payer_key: bytes) -> None:
        self.cluster = cluster
        self.payer_key = payer_key
        self.payer = Account.from_key(payer_key).address
        self.spent_micro = 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    models = tmp_path_factory.mktemp("models")
    ensure_tiny_model(models)  # built once here, not inside a node's first start
    cluster = Cluster(
        tmp_path_factory.mktemp("crash"),
        models,
        node_env={"SOGNI_NODE_TEST_MODEL": "true"},
        coordinator_env={
            "SOGNI_COORDINATOR_PROMPT_RETENTION_SECONDS": "0",
            # a killed node's re-queued jobs wait for its restart (a Python start with torch
            # and diffusers: over 10 s on a slow, loaded 2-core VM, where they failed)
            "SOGNI_COORDINATOR_NO_NODE_GRACE": "120",
        },
    )
    payer = Account.create()
    cluster.fund(payer.address, FUNDS_SPARK)
    try:
        cluster.start_coordinator()
        cluster.start_node(0)
        yield World(cluster, bytes(payer.key))
    finally:
        cluster.stop()


def _request(seed: int) -> RenderRequest:
    return RenderRequest(
        model_id=MODEL,
        positive_prompt="a red circle on a blue background",
        steps=2,
        guidance=2.0,
        width=64,
        height=64,
        seed=seed,
        number_of_images=IMAGES,
    )


async def _wait_killed(proc: Proc) -> int:
    code = await trio.to_thread.run_sync(lambda: proc.popen.wait(120))
    assert code == -signal.SIGKILL, f"{proc.name} exited {code}, not at its crash point"
    return code


def _receipted(database: Path, request_id: bytes) -> list[bytes]:
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT job_id FROM receipts WHERE request_id = ?", (request_id,))
        return [bytes(r[0]) for r in rows]


def _jobs(database: Path, request_id: bytes) -> set[bytes]:
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT job_id FROM jobs WHERE request_id = ?", (request_id,))
        return {bytes(r[0]) for r in rows}


def _check(world: World, result: RenderResult) -> None:
    """Exactly once, paid once, ledger balanced, everyone alive."""
    database = world.cluster.database
    jobs = _jobs(database, result.request_id)
    delivered = [img.job_id for img in result.images]
    assert len(jobs) == IMAGES and not result.failed
    assert sorted(delivered) == sorted(jobs), "an image missing or delivered twice"
    receipted = _receipted(database, result.request_id)
    assert sorted(receipted) == sorted(jobs), "a job without a receipt, or with two"
    world.spent_micro += result.cost_micro
    ledger = Ledger(database)
    try:
        assert set(ledger.totals().values()) == {0}
        # `RequestDone` goes out as the refund is queued for the coordinator's writer thread
        # (another process): the last reservation may be released a moment after `render`.
        deadline = time.monotonic() + 10
        balances = ledger.balances()
        while any(a.startswith("reserved:") for a in balances) and time.monotonic() < deadline:
            time.sleep(0.05)
            balances = ledger.balances()
        assert not any(a.startswith("reserved:") for a in balances), "a reservation is left"
        for account, amounts in balances.items():
            if account not in ISSUERS:
                assert min(amounts.values()) >= 0, account
        paid = ledger.balance(world.payer)["spark_paid"]
        assert paid == FUNDS_SPARK * 1_000_000 - world.spent_micro, "charged twice or not at all"
    finally:
        ledger.close()
    assert world.cluster.alive(), "a daemon was left dead"


async def _render(world: World, seed: int) -> RenderResult:
    return await render(
        world.cluster.addr,
        _request(seed),
        payer_key=world.payer_key,
        reconnect_for=90.0,
        idle_timeout=90.0,
    )


@pytest.mark.parametrize("point", NODE_POINTS)
async def test_node_killed_at(world: World, point: str) -> None:
    cluster = world.cluster
    old = cluster.node_procs[0]
    await trio.to_thread.run_sync(old.stop)
    # crash on the second job, so the first went through and the request is mid-way
    crashing = await trio.to_thread.run_sync(lambda: cluster.start_node(0, point, skip=1))
    outcome: list[RenderResult] = []
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            outcome.append(await _render(world, seed=NODE_POINTS.index(point) * 10))

        nursery.start_soon(client)
        await _wait_killed(crashing)
        await trio.to_thread.run_sync(lambda: cluster.start_node(0))
    _check(world, outcome[0])


@pytest.mark.parametrize("point", COORDINATOR_POINTS)
async def test_coordinator_killed_at(world: World, point: str) -> None:
    cluster = world.cluster
    node = cluster.node_procs[0]
    connected = node.seen("connected")
    assert cluster.coordinator is not None
    await trio.to_thread.run_sync(cluster.coordinator.stop)
    crashing = await trio.to_thread.run_sync(lambda: cluster.start_coordinator(point, skip=1))
    await trio.to_thread.run_sync(lambda: node.wait_event("connected", 60, nth=connected + 1))
    outcome: list[RenderResult] = []
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            seed = 100 + COORDINATOR_POINTS.index(point) * 10
            outcome.append(await _render(world, seed=seed))

        nursery.start_soon(client)
        await _wait_killed(crashing)
        await trio.to_thread.run_sync(cluster.start_coordinator)
    assert node.popen.poll() is None, "the node died with the coordinator"
    _check(world, outcome[0])


async def test_client_killed_mid_stream_then_collects(world: World, tmp_path: Path) -> None:
    """`sogni render` dies after receiving an image but before acknowledging it; `sogni
    collect` then gets every image exactly once (the unacknowledged one included)."""
    cluster = world.cluster
    out = tmp_path / "out"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")},
        "HOME": str(tmp_path),
        "SOGNI_CRASHPOINT": "client_mid_stream",
        "SOGNI_CRASHPOINT_SKIP": "1",
    }
    args = [
        "render", "a red circle on a blue background", "-n", str(IMAGES), "--steps", "2",
        "--model", MODEL, "--seed", "500", "--out", str(out), "--coordinator", cluster.addr,
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "sogni_app.cli", *args]
    killed = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ticket = json.loads((out / "request.json").read_text())
    before = (out / "receipts.jsonl").read_text().splitlines()
    assert 1 <= len(before) < IMAGES  # it died mid-request
    env.pop("SOGNI_CRASHPOINT")
    collect = [
        sys.executable, "-m", "sogni_app.cli", "collect", ticket["requestId"], "--out", str(out)
    ]  # fmt: skip
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(collect, env=env, capture_output=True, text=True, timeout=120)
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (out / "receipts.jsonl").read_text().splitlines()]
    job_ids = [line["message"]["jobId"] for line in lines]
    request_id = bytes.fromhex(ticket["requestId"].removeprefix("0x"))
    jobs = {"0x" + j.hex() for j in _jobs(cluster.database, request_id)}
    assert sorted(job_ids) == sorted(jobs), "an image missing or saved twice"
    assert sorted(_receipted(cluster.database, request_id)) == sorted(
        bytes.fromhex(j[2:]) for j in jobs
    )
    assert all((out / line["image"]).is_file() for line in lines)
    assert cluster.alive()
