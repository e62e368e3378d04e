"""Staked payers in the dispatcher: their queued jobs are offered first, and their relaxed
jobs take idle fast nodes at the relaxed price, the worker paid what the payer paid; and the
status page lists models with stake on them (ModelStake.sol) first."""

from __future__ import annotations

from types import SimpleNamespace

import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from sogni_app.api import authorize
from sogni_app.quote import quote as client_quote
from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.ledger import worker_account
from sogni_coordinator.model_stake import ModelStakeBoard
from sogni_coordinator.staking_benefits import PayerBenefits
from sogni_coordinator.standing import Standing
from sogni_coordinator.status_page import snapshot
from sogni_protocol.messages import Capabilities, Message, RenderRequest
from sogni_protocol.payout_rules import SOGNI
from sogni_protocol.pricing import price_factor_bps
from sogni_protocol.stake_benefits import StakeBenefits
from tests.coordinator.conftest import DOMAIN, MODEL, FakeNode, Harness, request

RICH: LocalAccount = Account.from_key(b"\x71" * 32)  # 100,000 SOGNI staked: tier 3
POOR: LocalAccount = Account.from_key(b"\x72" * 32)  # nothing staked: tier 0
STAKES = {RICH.address.lower(): 100_000}


def _chain(wallet: str) -> Standing:
    """What the chain says: the payers above, and every node licensed with 20,000 staked."""
    if wallet.lower() in STAKES:
        return Standing(stake=STAKES[wallet.lower()])
    return Standing(licensed=True, stake=20_000)


def _with_benefits(h: Harness, *, enforced: bool = False) -> None:
    billing = h.dispatcher.billing
    assert billing is not None and h.ledger is not None
    billing.benefits = PayerBenefits(StakeBenefits(), _chain)
    if enforced:
        h.dispatcher.router.tiers = "enforced"
        h.dispatcher.router.standing = _chain
    for payer in (RICH, POOR):
        h.ledger.credit_purchase(payer.address, 100)


def _signed(payer: LocalAccount, n: int, **kw: object) -> RenderRequest:
    return authorize(request(n, **kw), payer.key, DOMAIN)


def _cuda_node(h: Harness, n: int) -> FakeNode:
    key = bytes([n + 1]) * 32
    wallet = Account.from_key(key).address
    send, inbox = trio.open_memory_channel[Message](100)
    caps = Capabilities(
        peer_id=f"peer-{n}",
        wallet=wallet,
        expiry=0,
        models=[MODEL],
        slots=1,
        backend="test",
        device="cuda",
        max_pixels=0,
    )
    link = h.dispatcher.node_joined(f"peer-{n}", caps, send)
    h.dispatcher.ready(link, 1)
    return FakeNode(link, key, inbox)


async def test_a_higher_tier_payer_is_offered_first(paid: Harness) -> None:
    _with_benefits(paid)
    poor = await paid.submit(_signed(POOR, 2))
    rich = await paid.submit(_signed(RICH, 1))
    node = paid.node(1)
    paid.dispatcher.match()
    (first,) = node.offers()
    assert first.offer.job_id in rich.accepted.job_ids  # submitted last, offered first
    await paid.deliver(node, first)
    paid.dispatcher.ready(node.link, 1)
    paid.dispatcher.match()
    (second,) = node.offers()
    assert second.offer.job_id == poor.accepted.job_ids[0]  # then the others, in order


async def test_without_stake_there_is_no_priority(paid: Harness) -> None:
    _with_benefits(paid)
    early = await paid.submit(_signed(POOR, 1, seed=5))
    await paid.submit(_signed(POOR, 1, seed=6))
    node = paid.node(1)
    paid.dispatcher.match()
    (first,) = node.offers()
    assert first.offer.job_id == early.accepted.job_ids[0]  # plain FIFO


async def test_free_upgrade_runs_on_fast_at_the_relaxed_price(paid: Harness) -> None:
    _with_benefits(paid, enforced=True)
    fast = _cuda_node(paid, 1)
    sub = await paid.submit(_signed(RICH, 1, network="relaxed"))
    paid.dispatcher.match()
    (offer,) = fast.offers()  # no relaxed node at all: the fast node takes it
    assert offer.offer.price_factor_bps == price_factor_bps("relaxed")

    charged = sub.accepted.cost_micro
    promised = client_quote(
        MODEL, steps=10, width=64, height=64, network="relaxed", stake=100_000
    ).spark_micro
    fast_price = client_quote(MODEL, steps=10, width=64, height=64, network="fast").spark_micro
    assert charged == promised < fast_price  # the relaxed price, less the tier-3 discount

    await paid.deliver(fast, offer)
    assert paid.ledger is not None
    rows = paid.ledger.settled_jobs(0, 2e9)
    assert [(r[1], r[3]) for r in rows] == [(fast.wallet.lower(), charged)]  # job value
    earned = paid.ledger.balance(worker_account(fast.wallet))["spark_paid"]
    assert 0 < earned < charged  # the worker's share of what the payer paid


async def test_no_upgrade_for_low_tiers_or_a_busy_fast_tier(paid: Harness) -> None:
    _with_benefits(paid, enforced=True)
    fast = [_cuda_node(paid, 1), _cuda_node(paid, 2)]
    poor = await paid.submit(_signed(POOR, 1, network="relaxed"))
    paid.dispatcher.match()
    assert [n.offers() for n in fast] == [[], []]  # tier 0: relaxed jobs wait for relaxed nodes

    busy = await paid.submit(_signed(POOR, 1, network="fast"))
    paid.dispatcher.match()
    offers = [o for n in fast for o in n.offers()]
    assert [o.offer.job_id for o in offers] == busy.accepted.job_ids
    await paid.submit(_signed(RICH, 1, network="relaxed"))
    paid.dispatcher.match()  # half the fast slots idle: not above the 0.5 threshold
    assert [n.offers() for n in fast] == [[], []]
    assert poor.accepted.job_ids[0] in {j.job_id for j in paid.dispatcher.queue}


async def test_status_page_lists_staked_models_first(coord: Harness) -> None:
    send, _inbox = trio.open_memory_channel[Message](10)
    caps = Capabilities(
        peer_id="peer-m",
        wallet=RICH.address,
        expiry=0,
        models=["sdxl-base-1.0", MODEL],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=0,
    )
    coord.dispatcher.node_joined("peer-m", caps, send)
    view = SimpleNamespace(dispatcher=coord.dispatcher, peer_id="p", signer="s")
    assert list(snapshot(view, None).nodes_by_model) == ["sdxl-base-1.0", MODEL]  # by name

    chain = connect()
    treasury, fan = chain.accounts[0], chain.accounts[2]
    addresses = deploy_all(chain, treasury)
    d = Deployment(chain, addresses, sender=treasury)
    assert d.model_stake is not None
    d.token.transfer(fan, 5 * SOGNI)
    d.token.approve(d.model_stake.address, 5 * SOGNI, sender=fan)
    d.model_stake.stake(MODEL, 5 * SOGNI, sender=fan)
    board = ModelStakeBoard(d.model_stake, first_block=addresses.deployed_at_block)
    board.refresh()
    coord.dispatcher.model_stake = board
    assert list(snapshot(view, None).nodes_by_model) == [MODEL, "sdxl-base-1.0"]
