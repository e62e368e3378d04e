"""Stake on models (ModelStake.sol on the in-process chain): more stake, earlier in model
lists; an unstake stops counting at once and is withdrawn only after the cooldown."""

from __future__ import annotations

import pytest

from sogni_chain import Deployment, Signer, connect, deploy_all
from sogni_chain.errors import ChainRevert
from sogni_chain.model_stake import ModelStake, model_key
from sogni_coordinator.model_stake import ModelStakeBoard, by_stake
from sogni_protocol.payout_rules import SOGNI

TINY, SDXL, FLUX = "sogni-tiny-sd", "sdxl-base-1.0", "flux1-schnell"


def _fund(d: Deployment, who: Signer, ms: ModelStake, sogni: int) -> None:
    d.token.transfer(who, sogni * SOGNI)
    d.token.approve(ms.address, sogni * SOGNI, sender=who)


def test_stake_orders_model_lists_and_unstake_waits_for_the_cooldown() -> None:
    chain = connect()
    treasury, alice, bob = chain.accounts[0], chain.accounts[2], chain.accounts[3]
    addresses = deploy_all(chain, treasury)
    d = Deployment(chain, addresses, sender=treasury)
    ms = d.model_stake
    assert ms is not None and addresses.model_stake == ms.address
    board = ModelStakeBoard(ms, first_block=addresses.deployed_at_block)
    board.refresh()
    given = [FLUX, SDXL, TINY]
    assert board.order(given) == given  # no stake: the usual order
    assert by_stake(None, given) == given

    _fund(d, alice, ms, 1_000)
    _fund(d, bob, ms, 1_000)
    tx = ms.stake(TINY, 300 * SOGNI, sender=alice)
    assert tx.event("ModelStaked")["model"] == model_key(TINY)
    ms.stake(SDXL, 200 * SOGNI, sender=bob)
    ms.stake(SDXL, 200 * SOGNI, sender=alice)
    board.refresh()
    assert board.order(given) == [SDXL, TINY, FLUX]
    assert board.stake_of(SDXL) == ms.total(SDXL) == 400 * SOGNI

    with pytest.raises(ChainRevert, match="InsufficientStake"):  # more than Bob staked
        ms.request_unstake(SDXL, 201 * SOGNI, sender=bob)
    with pytest.raises(ChainRevert, match="ZeroAmount"):
        ms.stake(FLUX, 0, sender=bob)
    ms.request_unstake(SDXL, 200 * SOGNI, sender=bob)
    ms.request_unstake(SDXL, 150 * SOGNI, sender=alice)
    board.refresh()  # stops counting at once: 50 on SDXL now, 300 on TINY
    assert board.order(given) == [TINY, SDXL, FLUX]
    assert board.stake_of(SDXL) == 50 * SOGNI

    before = d.token.balance_of(bob)
    with pytest.raises(ChainRevert, match="CooldownActive"):
        ms.withdraw(SDXL, sender=bob)
    chain.advance_time(ms.COOLDOWN_SECONDS)
    ms.withdraw(SDXL, sender=bob)
    assert d.token.balance_of(bob) == before + 200 * SOGNI
    with pytest.raises(ChainRevert, match="NothingPending"):  # withdrawn once
        ms.withdraw(SDXL, sender=bob)
