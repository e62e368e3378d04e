"""Ways to cheat governance, each refused by the contracts."""

from __future__ import annotations

import pytest

from sogni_chain import ChainRevert
from sogni_chain.governance import DEV_SETTINGS

from .gov_env import STAKE, GovNet


def test_a_non_staker_cannot_propose(gnet: GovNet) -> None:
    g = gnet
    with pytest.raises(ChainRevert, match="GovernorInsufficientProposerVotes"):
        g.propose_take_rates([0, 0, 0, 0], proposer=g.outsider)


def test_a_staker_below_the_threshold_cannot_propose(gnet: GovNet) -> None:
    g = gnet
    small = g.outsider
    g.d.token.approve(g.d.addresses.staking, 10 * 10**18, sender=small)
    g.d.staking.stake(10 * 10**18, sender=small)  # 10 SOGNI < the 1,000 SOGNI threshold
    g.chain.advance_time(2)
    with pytest.raises(ChainRevert, match="GovernorInsufficientProposerVotes"):
        g.propose_take_rates([0, 0, 0, 0], proposer=small)


def test_a_second_vote_is_refused(gnet: GovNet) -> None:
    g = gnet
    pid = g.propose_take_rates([2000, 1500, 1000, 500])
    g.to_voting()
    g.governor.cast_vote(pid, "for", sender=g.stakers[0])
    with pytest.raises(ChainRevert, match="GovernorAlreadyCastVote"):
        g.governor.cast_vote(pid, "against", sender=g.stakers[0])
    assert g.governor.proposal(pid).votes_for == STAKE


def test_execution_before_the_timelock_delay_is_refused(gnet: GovNet) -> None:
    g = gnet
    pid = g.propose_take_rates([2000, 1500, 1000, 500])
    queued = g.pass_and_queue(pid)
    with pytest.raises(ChainRevert, match="TimelockUnexpectedOperationState"):
        g.governor.execute(queued)
    g.chain.advance_time(DEV_SETTINGS.timelock_delay - 10)
    with pytest.raises(ChainRevert, match="TimelockUnexpectedOperationState"):
        g.governor.execute(queued)
    assert g.params.snapshot().take_rates_bps is None


def test_nobody_but_the_timelock_sets_parameters(gnet: GovNet) -> None:
    g = gnet
    for who in (g.outsider, g.treasury, g.stakers[0]):
        with pytest.raises(ChainRevert, match="OwnableUnauthorizedAccount"):
            g.params.set_take_rates([0, 0, 0, 0], sender=who)
    with pytest.raises(ChainRevert, match="AccessControlUnauthorizedAccount"):
        g.d.staking.set_tier_minimum(1, 0, sender=g.treasury)  # the deployer let go of staking
    with pytest.raises(ChainRevert, match="AccessControlUnauthorizedAccount"):
        g.d.distributor._send("setClaimDelay", 0, sender=g.treasury)


def test_out_of_bounds_values_fail_at_execution(gnet: GovNet) -> None:
    """A passed proposal still cannot set a take above 50 %: the bound is in the contract."""
    g = gnet
    pid = g.propose_take_rates([9000, 1500, 1000, 500])
    queued = g.pass_and_queue(pid)
    g.chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    with pytest.raises(ChainRevert, match="TakeRateTooHigh"):
        g.governor.execute(queued)


def test_stake_added_after_the_snapshot_has_no_votes(gnet: GovNet) -> None:
    """Flash stake: buy and stake once a vote has started; it weighs nothing on that vote."""
    g = gnet
    pid = g.propose_take_rates([2000, 1500, 1000, 500])
    g.to_voting()
    late = g.outsider
    g.d.token.approve(g.d.addresses.staking, 2 * STAKE, sender=late)
    g.d.staking.stake(2 * STAKE, sender=late)
    assert g.votes.get_votes(late) == 2 * STAKE  # it has votes now, for later proposals
    g.governor.cast_vote(pid, "against", sender=late)
    assert g.governor.proposal(pid).votes_against == 0


def test_unstaking_and_slashing_drop_votes_and_delegation_moves_them(gnet: GovNet) -> None:
    g = gnet
    a, b, c = g.stakers
    g.votes.delegate(b, sender=a)
    assert g.votes.get_votes(b) == 2 * STAKE and g.votes.get_votes(a) == 0
    g.d.staking.request_unstake(STAKE // 2, sender=a)
    assert g.votes.get_votes(b) == STAKE + STAKE // 2  # pending stake never votes
    g.d.staking.slash(c, STAKE // 4, "test", sender=g.slasher)
    assert g.votes.get_votes(c) == STAKE - STAKE // 4
    g.chain.advance_time(2)
    total = g.votes._call("getPastTotalSupply", g.chain.timestamp() - 1)
    assert total == 3 * STAKE - STAKE // 2 - STAKE // 4 == g.d.staking.total_active()


def test_delegation_by_signature_is_single_use(gnet: GovNet) -> None:
    """A staker signs a delegation off chain; anyone submits it, once."""
    g = gnet
    a, b = g.stakers[0], g.stakers[1]
    expiry = g.chain.timestamp() + 3_600
    nonce = g.votes.nonces(a)
    sig = g.votes.sign_delegation(a, b, expiry)
    g.votes.delegate_by_sig(b, nonce, expiry, sig, sender=g.outsider)
    assert g.votes.delegates(a) == b.address and g.votes.get_votes(b) == 2 * STAKE
    with pytest.raises(ChainRevert, match="InvalidAccountNonce"):
        g.votes.delegate_by_sig(b, nonce, expiry, sig, sender=g.outsider)
