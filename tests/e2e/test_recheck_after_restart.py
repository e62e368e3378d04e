"""A check pending when the coordinator dies is re-run once the worker's node reconnects.

Over real libp2p, on the same data dir and port (as `test_coordinator_restart.py`): every
receipt is checked. The worker (a real node, tiny model) renders the job; its receipt is held;
the only other wallet is a verifier (a bare libp2p stream) that takes the step to re-run and
never answers, so the check is still pending when the coordinator is stopped. After the
restart the held receipt stays held (not re-rendered, not paid), the worker's node reconnects
by itself with its trajectory kept, an honest verifier of a third wallet joins, the check runs
and passes, and the image is delivered and paid exactly once, without a second render.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.service import Signer, run_coordinator
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import open_host
from sogni_protocol import eip712
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import RequestAccepted, VerifyStep

from .conftest import (
    MODEL,
    CountingSlowBackend,
    Net,
    free_port,
    receive_skipping,
    rogue_node,
    tiny_request,
    until,
)
from .rogue_kit import checks_of, heartbeats

POLICY = VerificationConfig(
    rate=1.0, challenge_timeout=30.0, verify_timeout=120.0, restart_recheck_timeout=60.0
)


async def test_a_pending_check_runs_after_a_restart_and_the_image_is_paid_once(
    tmp_path: Path, backend: Any
) -> None:
    acct = Account.create()
    signer = Signer(acct.address, bytes(acct.key))
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        listen=f"/ip4/127.0.0.1/tcp/{free_port()}",
        models=[MODEL],
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
        http_listen="off",
        verification=POLICY,
    )
    counting = CountingSlowBackend(backend, step_seconds=0.0, nth=1)
    async with trio.open_nursery() as nodes:
        async with trio.open_nursery() as first, open_host(key_path=None, listen=()) as client:
            running = await first.start(run_coordinator, config, signer)
            net = Net(tmp_path, nodes, running, signer, config)
            async with rogue_node(net) as (channel, silent):
                first.start_soon(heartbeats, channel)
                worker = await net.add_node(counting, "worker")
                chan = await client.open_channel(running.addrs[0], CLIENT_PROTOCOL)
                await chan.send(tiny_request(1))
                accepted = await chan.receive(timeout=10)
                assert isinstance(accepted, RequestAccepted)
                (job_id,) = accepted.job_ids
                await receive_skipping(channel, (VerifyStep,), timeout=60, limit=RESULT_FRAME_LIMIT)
                store = running.dispatcher.store
                assert store.check_state(job_id) == "pending"  # and it never will be answered
                first.cancel_scope.cancel()  # the coordinator dies mid-check

        async with trio.open_nursery() as second:
            running = await second.start(run_coordinator, config, signer)
            store = running.dispatcher.store
            assert store.check_state(job_id) == "pending"  # still held, not failed
            assert running.dispatcher.job_counts()["running"] == 1
            net = Net(tmp_path, nodes, running, signer, config)
            verifier = await net.add_node(backend, "verifier")
            await until(lambda: store.check_state(job_id) == "passed", 60)
            await until(lambda: running.dispatcher.job_counts()["running"] == 0, 10)
            owed = store.delivery(accepted.request_id)  # what a resuming client is sent
            assert owed is not None and [p[0] for p in owed.pending] == [job_id]
            assert running.dispatcher.results.path(*store.pending_deliveries()[0]).exists()
            receipts = store.receipts()
            payable = store.unsettled_receipts()
            assert store.failed_receipts() == []
            second.cancel_scope.cancel()

        assert Counter(r.receipt.job_id for r in receipts) == {job_id: 1}
        assert [r.receipt.job_id for r in payable] == [job_id]  # paid once, to the worker
        assert eip712.same_address(payable[0].receipt.worker, worker.wallet.address)
        assert counting.calls == 1  # rendered once: checked after the restart, not re-rendered
        (line,) = checks_of(tmp_path)
        assert line["verdict"] == "pass" and line["jobId"] == "0x" + job_id.hex()
        assert eip712.same_address(line["verifier"], verifier.wallet.address)
        assert not eip712.same_address(line["verifier"], silent.address)
        for node in (worker, verifier):
            node.stop.set()
        with trio.fail_after(20):
            await worker.done.wait()
            await verifier.done.wait()
