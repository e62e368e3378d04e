"""A coordinator that dies mid-render and comes back on the same data never costs the node.

Measured before (issue #10): the restarted coordinator re-offered the job the node had
rendered meanwhile, the node's journal refused a second receipt inside the daemon's task
tree, the node exited, and with no node left every job failed. Here the coordinator is
stopped (cancelled in-process, its SQLite as a kill leaves it) while the node renders the
second image of four, then restarted on the same data dir and port: the node stays up, the
render it was doing is delivered from its kept result (never rendered twice), and every job
ends with exactly one receipt.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.service import Signer, run_coordinator
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL
from sogni_protocol.messages import RequestAccepted

from .conftest import MODEL, CountingSlowBackend, Net, free_port, tiny_request, until


async def test_node_survives_a_coordinator_restart_and_each_job_has_one_receipt(
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
    )
    slow = CountingSlowBackend(backend, step_seconds=0.4, nth=2)
    async with trio.open_nursery() as nodes:
        async with trio.open_nursery() as first, open_host(key_path=None, listen=()) as client:
            running = await first.start(run_coordinator, config, signer)
            node = await Net(tmp_path, nodes, running, signer, config).add_node(slow, "node0")
            channel = await client.open_channel(running.addrs[0], CLIENT_PROTOCOL)
            await channel.send(tiny_request(4))
            accepted = await channel.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted)
            await slow.nth_started.wait()  # image 2 mid-render (pipelined: it may start
            # before image 1's result is committed, so wait for that receipt)
            await until(lambda: running.dispatcher.store.counts().get("done", 0) == 1, 10)
            first.cancel_scope.cancel()  # the coordinator dies here

        assert not node.done.is_set()
        async with trio.open_nursery() as second:
            running = await second.start(run_coordinator, config, signer)
            store = running.dispatcher.store
            await until(lambda: store.counts().get("done", 0) == 4, 45)
            receipts = store.receipts()
            second.cancel_scope.cancel()

        per_job = Counter(r.receipt.job_id for r in receipts)
        assert set(per_job) == set(accepted.job_ids) and set(per_job.values()) == {1}
        assert slow.calls == 4  # image 2 was delivered from the kept result, not re-rendered
        assert not node.done.is_set()  # the node never stopped
        node.stop.set()
        with trio.fail_after(20):
            await node.done.wait()
