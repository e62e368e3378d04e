"""Paying for renders through the real coordinator and nodes: reserve, settle, refund;
the Daily Boost and balances over the wire and from the `sogni` CLI; worker pay by stake."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from eth_account import Account

from sogni_app.api import (
    AccountRefused,
    RenderRefused,
    authorize,
    balance,
    claim_daily_boost,
    render,
)
from sogni_chain import Addresses, Deployment, connect, deploy_all
from sogni_chain.anvil import Anvil
from sogni_coordinator.ledger import PLATFORM, Ledger, utc_day, worker_account
from sogni_net import open_host
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CLIENT_PROTOCOL
from sogni_protocol.messages import (
    BalanceReport,
    RenderRequest,
    RequestAccepted,
    RequestRefused,
)
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from sogni_protocol.pricing import quote
from sogni_wallet.keystore import create_keystore

from .conftest import run_sogni, start_net, tiny_request

SPARK = 1_000_000  # micro


def _request(n: int) -> RenderRequest:
    return tiny_request(n, seed=0)


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


async def test_daily_boost_and_balance_over_the_wire(net_factory: Any) -> None:
    payer = Account.create()
    key = bytes(payer.key)
    async with net_factory() as net:
        with trio.fail_after(30):
            granted = await claim_daily_boost(net.addr, key, domain=net.domain)
        assert granted.amount_micro == 50 * SPARK and granted.day == utc_day()
        assert granted.balances.spark_free == 50 * SPARK
        with pytest.raises(AccountRefused) as again:
            await claim_daily_boost(net.addr, key, domain=net.domain)
        assert again.value.code == "already_claimed" and "next claim opens at" in again.value.reason
        with pytest.raises(AccountRefused) as foreign:
            await claim_daily_boost(net.addr, key, domain=Domain(1, net.domain.verifying_contract))
        assert foreign.value.code == "unauthorized"
        report = await balance(net.addr, key, domain=net.domain)
        assert report.balances.spark_free == 50 * SPARK and not report.boost_available
        async with open_host(key_path=None, listen=()) as thief:
            # a query signed for another peer id (a copy of someone's query) is refused
            query = eip712.sign_balance_query(key, net.domain, "12D3KooWsomeoneelse", 2**40)
            channel = await thief.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(query)
            refused = await channel.receive(timeout=10)
            assert isinstance(refused, RequestRefused) and refused.code == "unauthorized"
            assert "another peer id" in refused.reason
            # signed for this peer: answered, then the stream is closed
            expiry = int(time.time()) + 60
            query = eip712.sign_balance_query(key, net.domain, thief.peer_id, expiry)
            channel = await thief.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(query)
            assert isinstance(await channel.receive(timeout=10), BalanceReport)


async def _sogni(home: Path, *args: str) -> tuple[int, str, str]:
    return await run_sogni(home, *args, password="payer-password")


async def test_sogni_cli_boost_render_and_balance(
    net_factory: Any, backend: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    keystore = home / ".sogni" / "client" / "payer.json"  # the default place
    address = create_keystore(keystore, "payer-password", kdf_n=2**14)
    contract = "0x" + "5a" * 20  # not the default domain: the CLI must learn it
    async with net_factory(verifying_contract=contract) as net:
        await net.add_node(backend, "node0", verifying_contract=contract)
        local = home / ".sogni" / "coordinator" / "coordinator.json"
        local.parent.mkdir(parents=True)
        local.write_text((net.config.data_dir / "coordinator.json").read_text())
        # a local coordinator: address and EIP-712 domain come from the file it wrote
        code, out, err = await _sogni(home, "boost", "--json")
        assert code == 0, err
        granted = json.loads(out)
        assert granted["payer"] == address and granted["amountMicro"] == 50 * SPARK
        assert granted["nextClaimAt"].endswith("T00:00:00Z")
        explicit = [
            f"--coordinator={net.addr}",
            f"--chain-id={net.domain.chain_id}",
            f"--verifying-contract={contract}",
            "--json",
        ]
        code, out, err = await _sogni(
            home, "render", "a red circle", "--model", "sogni-tiny-sd", "--steps", "3",
            "--format", "jpeg",
            "--keystore", str(keystore), "--out", str(tmp_path / "out"),
        )  # fmt: skip
        assert code == 0, err
        assert "1 images" in out and " spark" in out  # paid, from the free Spark
        assert [p.suffix for p in (tmp_path / "out").glob("*-000.*")] == [".jpg"]
        code, _, err = await _sogni(
            home, "render", "x", "--model", "sogni-tiny-sd", "--lora", "ghost:0.5", "--lora", "a"
        )
        assert code == 3 and "LoRAs ['ghost', 'a']" in err  # the LoRAs went on the wire
        code, out, err = await _sogni(home, "balance", *explicit)
        assert code == 0, err
        report = json.loads(out)
        cost = quote(_request(1)).per_image.spark_micro
        assert report["balancesMicro"] == {
            "sparkFree": 50 * SPARK - cost,
            "sparkPaid": 0,
            "sogni": 0,
        }
        assert report["reservedMicro"]["sparkFree"] == 0 and report["boostAvailable"] is False


async def test_worker_pay_per_receipt_uses_its_stake_tier(
    anvil: Anvil, tmp_path: Path, backend: Any
) -> None:
    chain = connect(anvil.url)
    treasury = chain.accounts[0]
    signer, payer = Account.create(), Account.create()
    chain.send_eth(signer.address, 10**18, sender=treasury)
    addresses = tmp_path / "addresses.json"
    deploy_all(chain, treasury, coordinator=signer.address, path=addresses)
    deployment = Deployment(chain, Addresses.load(addresses), treasury)
    settlement = SettlementConfig()  # stake 10,000 SOGNI: 20 % take instead of 30 %
    async with start_net(
        tmp_path,
        signer_key=bytes(signer.key),
        chain_url=anvil.url,
        addresses_file=addresses,
        settlement=settlement,
        chain_poll_seconds=0.5,
    ) as net:
        node = await net.add_node(backend, "node0", addresses_file=addresses)
        staker = chain.add_key(node.wallet.private_key)
        chain.send_eth(staker, 10**18, sender=treasury)
        deployment.token.transfer(staker, 10_000 * SOGNI)
        deployment.token.approve(deployment.staking.address, 10_000 * SOGNI, sender=staker)
        deployment.staking.stake(10_000 * SOGNI, sender=staker)
        # the coordinator learns the stake from the chain's events (polled), not per receipt
        standing = net.coordinator.dispatcher.billing.standing
        with trio.fail_after(30):
            while standing(node.wallet.address).stake < 10_000:
                await trio.sleep(0.1)
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
            with trio.fail_after(60):
                result = await render(
                    net.addr, _request(2), payer_key=bytes(payer.key), domain=net.domain
                )
            assert len(result.images) == 2
            value = quote(_request(1)).per_image.spark_micro
            take, creator = value * 2000 // 10_000, value * 500 // 10_000
            worker = ledger.balance(worker_account(node.wallet.address))
            assert worker["spark_paid"] == 2 * (value - take - creator)
            assert ledger.balance(PLATFORM)["spark_paid"] == 2 * take
        finally:
            ledger.close()
