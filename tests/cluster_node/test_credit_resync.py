"""A node's credit at a coordinator heals by itself (real libp2p, real diffusers).

The credit is the node's last `Ready` less the offers in flight; a node sends `Ready` when
a job ends. With several coordinators a `Ready` can be counted at the wrong moment or lost
(a slot freed by one coordinator's job is credit for all), and an idle node then had no job
left whose end would correct it: it stayed idle while jobs waited (the 1-in-13 stall of
`make demo-cluster`). An idle node now repeats its `Ready` every quiet heartbeat interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import render
from tests.cluster_node.test_node_failover import _coordinator, _node, _signer_set
from tests.e2e.conftest import tiny_request, until

pytestmark = pytest.mark.filterwarnings("ignore")


async def test_an_idle_node_whose_credit_was_lost_gets_work_again(
    tmp_path: Path, backend: Any
) -> None:
    async with trio.open_nursery() as nursery:
        a, kill_a = await _coordinator(nursery, tmp_path / "a")
        operator = _signer_set(tmp_path / "set.json", [a.signer.address])
        async with _node(nursery, tmp_path, backend, [a.addr], operator):
            await until(lambda: len(a.coordinator.dispatcher.nodes) == 1, 30)
            link = next(iter(a.coordinator.dispatcher.nodes.values()))
            await until(lambda: link.credit > 0, 30)
            link.credit = 0  # a Ready lost or overtaken: nothing in flight, nothing to end
            assert not link.inflight
            with trio.fail_after(30):  # without the repeat: never (the node stays idle)
                assert len((await render(a.addr, tiny_request(1))).images) == 1
        kill_a.cancel()
