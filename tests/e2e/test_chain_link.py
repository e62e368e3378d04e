"""A coordinator on a shared chain (anvil over JSON-RPC): epochs close on a timer, and the
fast tier is decided by the licence and stake the chain reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_app.api import render
from sogni_chain import Addresses, Deployment, connect, deploy_all
from sogni_chain.anvil import Anvil
from sogni_coordinator.ledger import Ledger
from sogni_protocol.messages import RenderRequest
from sogni_protocol.payout_rules import SettlementConfig

from .conftest import MODEL, start_net


async def test_epochs_close_on_a_timer_and_tiers_follow_the_chain(
    anvil: Anvil, tmp_path: Path, backend: Any
) -> None:
    chain = connect(anvil.url)
    treasury = chain.accounts[0]
    signer = Account.create()
    chain.send_eth(signer.address, 10**18, sender=treasury)
    addresses = tmp_path / "addresses.json"
    deploy_all(
        chain, treasury, coordinator=signer.address, distributor_funding=10**24, path=addresses
    )
    deployment = Deployment(chain, Addresses.load(addresses), treasury)
    async with start_net(
        tmp_path,
        signer_key=bytes(signer.key),
        chain_url=anvil.url,
        addresses_file=addresses,
        tiers="enforced",
        settlement=SettlementConfig(epoch_seconds=1.0),
    ) as net:
        await net.add_node(backend, "node0", addresses_file=addresses)
        link = next(iter(net.coordinator.dispatcher.nodes.values()))
        networks, _ = net.coordinator.dispatcher.router.classify(link.device, link.wallet)
        assert networks == {"relaxed"}  # CPU, no licence, no stake
        request = RenderRequest(
            model_id=MODEL,
            positive_prompt="x",
            steps=2,
            width=64,
            height=64,
            number_of_images=2,
            network="relaxed",
        )
        payer = Account.create()  # only paid work is paid on chain
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
        finally:
            ledger.close()
        with trio.fail_after(60):
            result = await render(net.addr, request, payer_key=bytes(payer.key), domain=net.domain)
        assert len(result.images) == 2
        store = net.coordinator.dispatcher.store
        with trio.fail_after(30):
            while store.last_epoch_record(state="posted") is None:
                await trio.sleep(0.1)
        epoch = store.last_epoch_record(state="posted")
        assert epoch is not None
        assert deployment.distributor.root_of(epoch.epoch) == epoch.root
