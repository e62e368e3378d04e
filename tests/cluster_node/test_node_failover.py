"""A node of a network of several coordinators (real libp2p on 127.0.0.1, real diffusers,
in-process coordinators): it trusts them through the operator-signed signer set, refuses a
coordinator outside the set, keeps rendering for the others when one dies, and sends a result
kept for the dead one to another; a refusal there keeps the result (never voided)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from structlog.testing import capture_logs

from sogni_app.api import CoordinatorLost, render
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_node.journal import Journal
from sogni_protocol.eip712 import Domain
from sogni_protocol.signer_set import NetworkSignerSet, encode_signer_set, sign_signer_set
from sogni_wallet.keystore import Wallet
from tests.e2e.conftest import MODEL, Net, SlowBackend, start_net, tiny_request, until

pytestmark = pytest.mark.filterwarnings("ignore")


async def _coordinator(nursery: trio.Nursery, tmp: Path) -> tuple[Net, trio.CancelScope]:
    """A coordinator in a task of its own, so the test can kill it (cancel) while others run."""

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with start_net(tmp) as net:
                task_status.started((net, scope))
                await trio.sleep_forever()

    result: tuple[Net, trio.CancelScope] = await nursery.start(run)
    return result


def _signer_set(path: Path, signers: list[str]) -> str:
    """Write a set of `signers` signed by a fresh operator; the operator's address."""
    op = Account.create()
    unsigned = NetworkSignerSet(
        network_id="sogni-local", serial=1, signers=signers, issued_at=int(time.time())
    )
    domain = NodeConfig().chain_id, NodeConfig().verifying_contract
    path.write_bytes(encode_signer_set(sign_signer_set(bytes(op.key), Domain(*domain), unsigned)))
    return str(op.address)


@asynccontextmanager
async def _node(
    nursery: trio.Nursery, tmp: Path, backend: Any, coordinators: list[str], operator: str
) -> AsyncIterator[NodeConfig]:
    acct = Account.create()
    config = NodeConfig(
        data_dir=tmp / "node",
        coordinators=coordinators,
        trusted_coordinators=[],  # none by key: the network's set decides
        network_operators=[operator],
        network_signers_file=tmp / "set.json",
        forward_results_after=1.0,
        threads=1,
        heartbeat_interval=0.5,
        heartbeat_timeout=2.0,
        http_listen="off",
    )
    stop, done = trio.Event(), trio.Event()

    async def run() -> None:
        try:
            await run_node(
                config, Wallet(acct.address, bytes(acct.key)), backend, [MODEL], stop=stop
            )
        finally:
            done.set()

    nursery.start_soon(run)
    try:
        yield config
    finally:
        stop.set()
        with trio.move_on_after(10):
            await done.wait()


async def test_a_node_of_the_network_set_survives_a_dead_coordinator(
    tmp_path: Path, backend: Any
) -> None:
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            a, kill_a = await _coordinator(nursery, tmp_path / "a")
            b, kill_b = await _coordinator(nursery, tmp_path / "b")
            c, kill_c = await _coordinator(nursery, tmp_path / "c")  # not in the set
            operator = _signer_set(tmp_path / "set.json", [a.signer.address, b.signer.address])
            slow = SlowBackend(backend, step_seconds=0.4)
            async with _node(nursery, tmp_path, slow, [a.addr, b.addr, c.addr], operator) as cfg:
                await until(lambda: len(a.coordinator.dispatcher.nodes) == 1, 30)
                await until(lambda: len(b.coordinator.dispatcher.nodes) == 1, 30)

                def refused_by_c() -> bool:
                    return any(
                        e["event"] == "coordinator_refused"
                        and e["addr"] == c.addr
                        and "nor in the network's signer set" in e["error"]
                        for e in logs
                    )

                await until(refused_by_c, 30)
                assert len(c.coordinator.dispatcher.nodes) == 0
                with trio.fail_after(60):  # both coordinators' offers are taken
                    for net in (a, b):
                        assert len((await render(net.addr, tiny_request(1))).images) == 1

                # A dies while the node renders its job: the render finishes, is kept, and
                # goes to B (which, on a ledger of its own here, refuses it: kept all the same)
                async def doomed() -> None:
                    with pytest.raises(CoordinatorLost):
                        await render(a.addr, tiny_request(1, seed=7), reconnect_for=1.0)

                slow.started = trio.Event()
                nursery.start_soon(doomed)
                with trio.fail_after(30):
                    await slow.started.wait()
                kill_a.cancel()

                def event(name: str) -> dict[str, Any] | None:
                    return next((e for e in logs if e["event"] == name), None)

                await until(lambda: event("forwarded_result_refused") is not None, 30)
                forwarded = event("result_forwarded")
                assert forwarded is not None
                assert forwarded["dead"] == a.signer.address.lower()
                assert forwarded["to"] == b.signer.address.lower()
                journal = Journal(cfg.journal_path)
                try:
                    kept = [journal.stored_result(e.receipt.job_id) for e in journal.unacked()]
                finally:
                    journal.close()
                assert len(kept) == 1 and kept[0] is not None
                assert kept[0].image and kept[0].entry.accepted is None  # not voided
                assert kept[0].entry.receipt.coordinator == a.signer.address
                # and B still renders for the node
                with trio.fail_after(60):
                    assert len((await render(b.addr, tiny_request(2, seed=3))).images) == 2
            kill_b.cancel()
            kill_c.cancel()


async def test_a_slot_freed_by_a_dead_coordinators_job_is_offered_to_the_others(
    tmp_path: Path, backend: Any
) -> None:
    """B's last `Ready` said "no credit" (the node's one slot and its look-ahead held A's two
    jobs, so B's offer was declined). A dies; when its job ends, B must hear the slot is free,
    or the node never renders for B again (what stalled the first `make demo-cluster`)."""
    async with trio.open_nursery() as nursery:
        a, kill_a = await _coordinator(nursery, tmp_path / "a")
        b, kill_b = await _coordinator(nursery, tmp_path / "b")
        operator = _signer_set(tmp_path / "set.json", [a.signer.address, b.signer.address])
        slow = SlowBackend(backend, step_seconds=0.5)
        async with _node(nursery, tmp_path, slow, [a.addr, b.addr], operator):
            await until(lambda: len(a.coordinator.dispatcher.nodes) == 1, 30)
            await until(lambda: len(b.coordinator.dispatcher.nodes) == 1, 30)
            link_a = next(iter(a.coordinator.dispatcher.nodes.values()))
            link_b = next(iter(b.coordinator.dispatcher.nodes.values()))

            async def at_a() -> None:
                with pytest.raises(CoordinatorLost):
                    await render(a.addr, tiny_request(2, seed=11), reconnect_for=1.0)

            nursery.start_soon(at_a)
            await until(lambda: len(link_a.inflight) == 2, 30)  # one rendering, one in hand
            done = trio.Event()

            async def at_b() -> None:
                result = await render(b.addr, tiny_request(1, seed=12))
                assert len(result.images) == 1
                done.set()

            nursery.start_soon(at_b)
            await until(lambda: link_b.credit == 0 and not link_b.inflight, 30)  # declined
            kill_a.cancel()
            with trio.fail_after(60):
                await done.wait()
        kill_b.cancel()
