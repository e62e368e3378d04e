"""Paying for renders through the real coordinator and nodes: reserve, settle, refund."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from eth_account import Account

from sogni_client.api import RenderRefused, authorize, render
from sogni_coordinator.ledger import Ledger, worker_account
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL
from sogni_protocol.messages import RenderRequest, RequestAccepted, RequestRefused
from sogni_protocol.pricing import quote

from .conftest import MODEL


def _request(n: int) -> RenderRequest:
    return RenderRequest(
        model_id=MODEL,
        positive_prompt="a red circle",
        steps=3,
        guidance=4.0,
        width=64,
        height=64,
        number_of_images=n,
    )


async def test_payer_is_charged_per_image_and_workers_paid(net_factory: Any, backend: Any) -> None:
    payer = Account.create()
    async with net_factory() as net:
        node = await net.add_node(backend, "node0")
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)  # 1 Spark, far more than 3 tiny images
            before = ledger.totals()
            with trio.fail_after(60):
                result = await render(
                    net.addr, _request(3), payer_key=bytes(payer.key), domain=net.domain
                )
            per_image = quote(_request(3)).per_image.spark_micro
            assert result.cost_micro == 3 * per_image
            paid = ledger.balance(payer.address)
            assert paid["spark_paid"] == 1_000_000 - 3 * per_image
            worker = ledger.balance(worker_account(node.wallet.address))
            assert 0 < sum(worker.values()) < 3 * per_image  # minus take rate and creator share
            assert ledger.totals() == before  # moved, never created or destroyed
        finally:
            ledger.close()


async def test_unaffordable_forged_and_replayed_requests_are_refused(
    net_factory: Any, backend: Any
) -> None:
    broke, rich = Account.create(), Account.create()
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(rich.address, 1)
        finally:
            ledger.close()
        with pytest.raises(RenderRefused, match="insufficient_funds") as info:
            await render(net.addr, _request(2), payer_key=bytes(broke.key), domain=net.domain)
        assert '"spark"' in info.value.reason  # the refusal carries the quote
        signed = authorize(_request(1), bytes(rich.key), net.domain)
        tampered = msgspec.structs.replace(signed, number_of_images=2)
        other_chain = authorize(
            _request(1), bytes(rich.key), type(net.domain)(1, net.domain.verifying_contract)
        )
        async with open_host(key_path=None, listen=()) as client:
            for bad in (tampered, other_chain):
                channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await channel.send(bad)
                refused = await channel.receive(timeout=10)
                assert isinstance(refused, RequestRefused) and refused.code == "unauthorized"
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(signed)
            assert isinstance(await channel.receive(timeout=10), RequestAccepted)
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(signed)  # the same signed request again
            refused = await channel.receive(timeout=10)
            assert isinstance(refused, RequestRefused) and refused.code == "replayed"


async def test_undelivered_images_are_refunded(net_factory: Any, backend: Any) -> None:
    payer = Account.create()
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        dispatcher = net.coordinator.dispatcher
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
            dispatcher._key = b"\x07" * 32  # offers the node will not trust: every job fails
            with trio.fail_after(60):
                result = await render(
                    net.addr, _request(2), payer_key=bytes(payer.key), domain=net.domain
                )
            assert result.images == [] and len(result.failed) == 2
            assert ledger.balance(payer.address)["spark_paid"] == 1_000_000
        finally:
            ledger.close()
