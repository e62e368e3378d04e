"""A node's payout address reaches the coordinator (issue #12: verifier pay and independence
follow payout accounts): a node configured with `payout_address` advertises it in its hello,
one without advertises none, and the coordinator keeps it on the node's `NodeLink`, where
`choose_verifier` and the verifier-work record read it. Real coordinator and nodes over
libp2p on 127.0.0.1, real SQLite; nothing is rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_coordinator.verifiers import choose_verifier

from .conftest import MODEL, start_net

pytestmark = pytest.mark.filterwarnings("ignore")


async def test_the_payout_address_is_advertised_and_bars_its_containers(
    tmp_path: Path, backend: Any
) -> None:
    payout = Account.create().address
    async with start_net(tmp_path) as net:
        container = await net.add_node(backend, "container", payout_address=payout.lower())
        sibling = await net.add_node(backend, "sibling", payout_address=payout)
        plain = await net.add_node(backend, "plain")
        nodes = net.coordinator.dispatcher.nodes
        with trio.fail_after(10):
            while len(nodes) < 3:
                await trio.sleep(0.05)
        by_wallet = {link.wallet.lower(): link for link in nodes.values()}
        assert by_wallet[container.wallet.address.lower()].payout == payout  # checksummed
        assert by_wallet[sibling.wallet.address.lower()].payout == payout
        assert by_wallet[plain.wallet.address.lower()].payout is None
        assert by_wallet[plain.wallet.address.lower()].payee == plain.wallet.address
        # the container's work (its receipts pay `payout`) is never checked by its sibling
        plain_peer = next(p for p, x in nodes.items() if x.wallet == plain.wallet.address)
        for _ in range(20):
            assert (
                choose_verifier(nodes, MODEL, container.wallet.address, worker_payout=payout)
                == plain_peer
            )
        for handle in (container, sibling, plain):
            handle.stop.set()
        with trio.fail_after(30):
            for handle in (container, sibling, plain):
                await handle.done.wait()
