"""Staked payers' discount, from stake read on the in-process chain: the client's quote is the
charge, nobody gets a tier without stake, and an unstake right after a quote keeps the
discount no longer than the documented cache window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest
from eth_account.signers.local import LocalAccount
from web3.types import Wei

from sogni_app.api import authorize
from sogni_app.quote import quote as client_quote
from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.billing import Billing
from sogni_coordinator.chain_link import ChainLink
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.staking_benefits import PayerBenefits, TieredQueue
from sogni_coordinator.standing import StandingCache
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import RenderRequest
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from sogni_protocol.pricing import quote
from sogni_protocol.stake_benefits import StakeBenefits, discounted

MODEL = "sdxl-base-1.0"
TTL = 300.0
TIER_STAKES = {0: 0, 1: 1_000, 2: 10_000, 3: 100_000}  # accounts[0..3]'s stake in the world


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    deployment: Deployment
    domain: Domain
    ledger: Ledger
    billing: Billing
    cache: StandingCache
    feed: object
    clock: Clock
    accounts: list[LocalAccount]

    def stake(self, who: LocalAccount, sogni: int) -> None:
        d = self.deployment
        d.token.transfer(who.address, sogni * SOGNI)
        d.token.approve(d.staking.address, sogni * SOGNI, sender=who.address)
        d.staking.stake(sogni * SOGNI, sender=who.address)

    def admit(
        self, who: LocalAccount, network: Literal["fast", "relaxed"] = "fast", n: int = 2
    ) -> int:
        req = RenderRequest(
            model_id=MODEL,
            positive_prompt="a lighthouse",
            steps=20,
            width=1024,
            height=1024,
            number_of_images=n,
            network=network,
        )
        signed = authorize(req, who.key, self.domain)
        return self.billing.admit(signed, eip712.request_hash(signed))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("benefits")
    chain = connect()
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(chain, treasury, coordinator=coordinator, distributor_funding=SOGNI)
    deployment = Deployment(chain, addresses, sender=treasury)
    accounts = []
    for i in range(2, 9):  # funded dev accounts whose keys we know
        acct: LocalAccount = chain.add_key(bytes([0x40 + i]) * 32)
        chain.w3.eth.send_transaction(
            {"from": treasury.address, "to": acct.address, "value": Wei(10**18)}  # gas money
        )
        accounts.append(acct)
    store = Store(tmp / "c.db")
    settler = Settler(
        store,
        deployment,
        sender=coordinator,
        rules=SettlementConfig().rules(),
        publish_dir=tmp / "epochs",
    )
    link = ChainLink(deployment, settler)
    clock = Clock()
    cache = StandingCache(link.standing, ttl=TTL, clock=clock)
    domain = Domain(addresses.chain_id, addresses.distributor)
    ledger = Ledger(tmp / "c.db")
    billing = Billing(ledger, domain, benefits=PayerBenefits(StakeBenefits(), cache))
    for a in accounts:
        ledger.credit_purchase(a.address, 1_000)
    world = World(
        deployment, domain, ledger, billing, cache, link.standing_changes(), clock, accounts
    )
    # each test may run alone (xdist splits a module between workers): stakes are set here,
    # and a test that changes a stake uses accounts no other test reads
    for stake, payer in zip(TIER_STAKES.values(), accounts, strict=False):
        if stake:
            world.stake(payer, stake)
    yield world
    ledger.close()
    store.close()


async def test_the_quote_with_stake_is_the_charge_for_every_tier(world: World) -> None:
    for (tier, stake), payer in zip(TIER_STAKES.items(), world.accounts, strict=False):
        await world.cache.warm(payer.address)
        for network in ("fast", "relaxed"):
            charged = world.admit(payer, network)
            promised = client_quote(MODEL, images=2, network=network, stake=stake)  # type: ignore[arg-type]
            assert charged == promised.spark_micro, (tier, network)
            full = client_quote(MODEL, images=2, network=network).spark_micro  # type: ignore[arg-type]
            assert charged == full * (10_000 - StakeBenefits().discount_for(tier)) // 10_000


async def test_no_tier_without_stake_and_none_borrowed(world: World) -> None:
    staker, other = world.accounts[3], world.accounts[4]  # staker has 100,000 (the world's)
    await world.cache.warm(staker.address)
    await world.cache.warm(other.address)
    assert world.billing.benefits is not None
    assert world.billing.benefits.tier(other.address) == 0
    full = client_quote(MODEL, images=2).spark_micro
    assert world.admit(other) == full  # the request has no tier field to claim one with
    assert world.billing.benefits.tier(staker.address) == 3  # staker's tier stays its own


async def test_unstake_after_a_quote_keeps_the_discount_only_within_the_cache_window(
    world: World,
) -> None:
    payer, rich = world.accounts[5], world.accounts[6]  # read by no other test
    world.stake(payer, 10_000)
    world.stake(rich, 100_000)
    world.clock.now += TTL  # the earlier read is stale: read again
    await world.cache.warm(payer.address)
    discounted_price = world.admit(payer)
    assert discounted_price == client_quote(MODEL, images=2, stake=10_000).spark_micro

    world.deployment.staking.request_unstake(10_000 * SOGNI, sender=payer.address)
    world.clock.now += TTL / 2  # inside the window: the cached stake still counts
    await world.cache.warm(payer.address)
    assert world.admit(payer) == discounted_price
    world.clock.now += TTL / 2  # the window is over: the chain is read again
    await world.cache.warm(payer.address)
    assert world.admit(payer) == client_quote(MODEL, images=2).spark_micro

    # with the service's change feed, the unstake event ends it at the next poll
    world.feed()  # type: ignore[operator]  # consume older events
    world.deployment.staking.request_unstake(100_000 * SOGNI, sender=rich.address)
    changed = world.feed()  # type: ignore[operator]
    assert changed is not None and rich.address.lower() in changed
    world.cache.invalidate(changed)
    await world.cache.warm(rich.address)
    assert world.admit(rich) == client_quote(MODEL, images=2).spark_micro


def test_discount_keeps_totals_images_times_per_image(world: World) -> None:
    req = RenderRequest(model_id=MODEL, positive_prompt="x", number_of_images=7)
    q = discounted(quote(req), 2_000)
    assert q.spark_micro == 7 * q.per_image.spark_micro
    assert q.work_units == quote(req).work_units  # work is not discounted


def test_tiered_queue_orders_by_tier_then_fifo_without_scanning() -> None:
    @dataclass
    class J:
        request_id: bytes
        name: str

    q = TieredQueue()
    q.tiers.update({b"r": 3, b"m": 1})
    for rid, name in [(b"p", "p1"), (b"m", "m1"), (b"r", "r1"), (b"p", "p2"), (b"r", "r2")]:
        q.append(J(rid, name))  # type: ignore[arg-type]
    q.appendleft(J(b"p", "p0"))  # type: ignore[arg-type]  # a requeued job: front of its tier
    assert [j.name for j in q] == ["r1", "r2", "m1", "p0", "p1", "p2"]  # type: ignore[attr-defined]
    assert len(q) == 6
    rebuilt = q.emptied()
    while q:
        rebuilt.append(q.popleft())
    assert [j.name for j in rebuilt] == ["r1", "r2", "m1", "p0", "p1", "p2"]  # type: ignore[attr-defined]
    rebuilt.forget(b"r")
    assert b"r" not in rebuilt.tiers
