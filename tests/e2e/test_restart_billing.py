"""A coordinator stopped in the middle of a paid request keeps its ledger whole: after the
restart, what is delivered is settled once per image and what is not is refunded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.ledger import ISSUERS, Ledger, reserved_account
from sogni_coordinator.service import run_coordinator
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL
from sogni_protocol.messages import RequestAccepted
from sogni_protocol.pricing import quote

from .conftest import MODEL, Net, SlowBackend, start_net, tiny_request

SPARK = 1_000_000  # micro
REQUEST = tiny_request(3, seed=0)


def _assert_conserved(ledger: Ledger) -> None:
    """Double entry holds, nothing but the issuers is negative, and every micro-Spark issued
    is held by someone (payer, workers, platform, creator; none left reserved)."""
    assert set(ledger.totals().values()) == {0}
    held = ledger.balances()
    for account, amounts in held.items():
        if account not in ISSUERS:
            assert min(amounts.values()) >= 0, account
        assert not account.startswith("reserved:"), f"{account} still holds {amounts}"


async def _wait(condition: Any, seconds: float, what: str) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.05)
    assert condition(), what


@pytest.mark.parametrize("after_restart", ["delivered", "no_node"])
async def test_restart_mid_request_settles_delivered_and_refunds_the_rest(
    tmp_path: Path, backend: Any, after_restart: str
) -> None:
    payer = Account.create()
    per_image = quote(REQUEST).per_image.spark_micro
    ledger = Ledger(tmp_path / "coordinator" / "coordinator.db")
    try:
        ledger.credit_purchase(payer.address, 1)
        async with (
            start_net(tmp_path, models=[MODEL]) as net,
            open_host(key_path=None, listen=()) as client,
        ):
            await net.add_node(SlowBackend(backend, step_seconds=0.3), "node0")
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(authorize(REQUEST, bytes(payer.key), net.domain))
            accepted = await channel.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted)
            store = net.coordinator.dispatcher.store
            await _wait(lambda: store.counts().get("done", 0) >= 1, 60, "first image")
            # the coordinator stops here, with the request half done
        rid = accepted.request_id
        open_rows = ledger.open_reservations()
        assert [r.request_id for r in open_rows] == [rid.hex()]
        assert ledger.balance(payer.address)["spark_paid"] == SPARK - 3 * per_image

        async with trio.open_nursery() as nursery:
            running = await nursery.start(run_coordinator, net.config, net.signer)
            store = running.dispatcher.store
            delivered_before = store.counts()["receipts"]
            assert 1 <= delivered_before < 3  # mid-request
            if after_restart == "delivered":
                await Net(tmp_path, nursery, running, net.signer, net.config).add_node(
                    backend, "node1"
                )
            else:  # nobody can render the rest: the jobs fail and are refunded
                running.dispatcher.no_node_grace = 0.2
            await _wait(lambda: not ledger.open_reservations(), 60, "request closed")
            delivered = store.counts()["receipts"]
            nursery.cancel_scope.cancel()

        assert delivered == (3 if after_restart == "delivered" else delivered_before)
        assert ledger.balance(payer.address)["spark_paid"] == SPARK - delivered * per_image
        assert sum(ledger.balance(reserved_account(rid)).values()) == 0
        earned = sum(
            sum(amounts.values())
            for account, amounts in ledger.balances().items()
            if account.startswith(("worker:", "creator:")) or account == "platform"
        )
        assert earned == delivered * per_image  # every delivered image paid exactly once
        _assert_conserved(ledger)
    finally:
        ledger.close()
