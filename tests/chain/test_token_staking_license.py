"""SogniToken, Staking and WorkerLicense behaviour, on both chains."""

from __future__ import annotations

import pytest
from eth_account import Account

from sogni_chain import ChainRevert

from .chain_env import DISTRIBUTOR_FUNDING, SOGNI, WORKER_FUNDING, Env

DAY = 24 * 3600
COOLDOWN = 7 * DAY


# -- token ---------------------------------------------------------------------------------


def test_token_supply_minted_to_treasury(env: Env) -> None:
    token = env.d.token
    assert token.total_supply() == 10_000_000_000 * SOGNI
    handed_out = DISTRIBUTOR_FUNDING + WORKER_FUNDING * len(env.workers)
    assert token.balance_of(env.treasury) == token.total_supply() - handed_out
    assert token.balance_of(env.d.distributor.address) == DISTRIBUTOR_FUNDING


def test_transfer_more_than_balance_reverts(env: Env) -> None:
    w = env.workers[0]
    with pytest.raises(ChainRevert) as err:
        env.d.token.transfer(env.treasury, WORKER_FUNDING + 1, sender=w)
    assert err.value.error == "ERC20InsufficientBalance"
    assert err.value.args_by_name["needed"] == WORKER_FUNDING + 1


def test_permit_sets_allowance_without_a_transaction_from_the_owner(env: Env) -> None:
    token, staking, w = env.d.token, env.d.staking, env.workers[0]
    deadline = env.chain.timestamp() + 3600
    sig = token.sign_permit(w, staking.address, 500 * SOGNI, deadline)
    eth_before = env.chain.eth_balance(w)
    token.permit(w, staking.address, 500 * SOGNI, deadline, sig, sender=env.relayer)
    assert env.chain.eth_balance(w) == eth_before  # the relayer paid the gas
    assert token.allowance(w, staking.address) == 500 * SOGNI
    assert token.nonces(w) == 1
    staking.stake(500 * SOGNI, sender=w)  # the permit's allowance is usable
    assert staking.active_stake(w) == 500 * SOGNI

    with pytest.raises(ChainRevert) as err:  # replaying the same signature fails (nonce moved)
        token.permit(w, staking.address, 500 * SOGNI, deadline, sig, sender=env.relayer)
    assert err.value.error == "ERC2612InvalidSigner"

    old = env.chain.timestamp() - 1
    expired = token.sign_permit(w, staking.address, 1, old)
    with pytest.raises(ChainRevert) as err:
        token.permit(w, staking.address, 1, old, expired, sender=env.relayer)
    assert err.value.error == "ERC2612ExpiredSignature"


def test_a_fresh_local_key_signs_transactions(env: Env) -> None:
    fresh = Account.create()
    env.chain.send_eth(fresh, 10**18, sender=env.treasury)
    env.d.token.transfer(fresh, 7 * SOGNI)
    env.d.token.transfer(env.workers[0], 3 * SOGNI, sender=fresh)
    assert env.d.token.balance_of(fresh) == 4 * SOGNI
    assert env.chain.eth_balance(fresh) < 10**18  # it paid its own gas


# -- staking -------------------------------------------------------------------------------


def _stake(env: Env, who: int, amount: int) -> None:
    w = env.workers[who]
    env.d.token.approve(env.d.staking.address, amount, sender=w)
    env.d.staking.stake(amount, sender=w)


def test_stake_needs_allowance(env: Env) -> None:
    with pytest.raises(ChainRevert) as err:
        env.d.staking.stake(SOGNI, sender=env.workers[0])
    assert err.value.error == "ERC20InsufficientAllowance"


def test_stake_unstake_withdraw_after_cooldown(env: Env) -> None:
    staking, token, w = env.d.staking, env.d.token, env.workers[0]
    _stake(env, 0, 1000 * SOGNI)
    assert staking.active_stake(w) == 1000 * SOGNI
    assert token.balance_of(w) == WORKER_FUNDING - 1000 * SOGNI

    with pytest.raises(ChainRevert) as err:
        staking.request_unstake(1001 * SOGNI, sender=w)
    assert err.value.error == "InsufficientActiveStake"

    tx = staking.request_unstake(400 * SOGNI, sender=w)
    unlock_at = tx.event("UnstakeRequested")["unlockAt"]
    assert staking.active_stake(w) == 600 * SOGNI  # pending no longer counts
    assert staking.pending_stake(w) == (400 * SOGNI, unlock_at)
    assert unlock_at >= env.chain.timestamp() + COOLDOWN - 5

    with pytest.raises(ChainRevert) as err:
        staking.withdraw(sender=w)
    assert err.value.error == "CooldownActive"

    env.chain.advance_time(COOLDOWN - DAY)
    with pytest.raises(ChainRevert) as err:
        staking.withdraw(sender=w)
    assert err.value.error == "CooldownActive"

    env.chain.advance_time(DAY + 1)
    tx = staking.withdraw(sender=w)
    assert tx.event("Withdrawn")["amount"] == 400 * SOGNI
    assert token.balance_of(w) == WORKER_FUNDING - 600 * SOGNI
    assert staking.pending_stake(w) == (0, 0)
    assert staking.active_stake(w) == 600 * SOGNI

    with pytest.raises(ChainRevert) as err:
        staking.withdraw(sender=w)
    assert err.value.error == "NothingToWithdraw"


def test_second_unstake_request_restarts_the_cooldown(env: Env) -> None:
    staking, w = env.d.staking, env.workers[0]
    _stake(env, 0, 100 * SOGNI)
    staking.request_unstake(50 * SOGNI, sender=w)
    env.chain.advance_time(COOLDOWN - DAY)
    staking.request_unstake(50 * SOGNI, sender=w)
    env.chain.advance_time(DAY + 1)
    with pytest.raises(ChainRevert):
        staking.withdraw(sender=w)
    env.chain.advance_time(COOLDOWN)
    assert staking.withdraw(sender=w).event("Withdrawn")["amount"] == 100 * SOGNI


def test_tier_minimums(env: Env) -> None:
    staking, w = env.d.staking, env.workers[0]
    assert staking.meets_tier(w, 0)  # no minimum set: everyone qualifies
    staking.set_tier_minimum(1, 500 * SOGNI)  # governance
    assert staking.tier_minimum(1) == 500 * SOGNI
    assert not staking.meets_tier(w, 1)
    _stake(env, 0, 600 * SOGNI)
    assert staking.meets_tier(w, 1)
    staking.request_unstake(200 * SOGNI, sender=w)  # pending stake does not count
    assert not staking.meets_tier(w, 1)

    with pytest.raises(ChainRevert) as err:
        staking.set_tier_minimum(1, 0, sender=w)
    assert err.value.error == "AccessControlUnauthorizedAccount"


def test_slash_takes_active_then_pending_and_slashed_stake_cannot_be_withdrawn(env: Env) -> None:
    staking, token, w = env.d.staking, env.d.token, env.workers[0]
    _stake(env, 0, 1000 * SOGNI)
    staking.request_unstake(700 * SOGNI, sender=w)  # active 300, pending 700
    treasury_before = token.balance_of(env.treasury)

    tx = staking.slash(w, 500 * SOGNI, "forged receipt", sender=env.slasher)
    ev = tx.event("Slashed")
    assert (ev["fromActive"], ev["fromPending"]) == (300 * SOGNI, 200 * SOGNI)
    assert ev["reason"] == "forged receipt"
    assert staking.active_stake(w) == 0
    assert staking.pending_stake(w)[0] == 500 * SOGNI
    assert token.balance_of(env.treasury) == treasury_before + 500 * SOGNI

    env.chain.advance_time(COOLDOWN + 1)
    assert staking.withdraw(sender=w).event("Withdrawn")["amount"] == 500 * SOGNI  # not 700
    assert token.balance_of(w) == WORKER_FUNDING - 500 * SOGNI


def test_fully_slashed_pending_stake_cannot_be_withdrawn(env: Env) -> None:
    staking, w = env.d.staking, env.workers[1]
    _stake(env, 1, 100 * SOGNI)
    staking.request_unstake(100 * SOGNI, sender=w)
    # more than it has: capped at what is there; governance may slash too
    tx = staking.slash(w, 10_000 * SOGNI, "double spend", sender=env.treasury)
    assert tx.event("Slashed")["fromPending"] == 100 * SOGNI
    env.chain.advance_time(COOLDOWN + 1)
    with pytest.raises(ChainRevert) as err:
        staking.withdraw(sender=w)
    assert err.value.error == "NothingToWithdraw"
    with pytest.raises(ChainRevert) as err:
        staking.slash(w, 1, "again", sender=env.slasher)
    assert err.value.error == "NothingToSlash"


def test_only_slashers_slash(env: Env) -> None:
    _stake(env, 0, 100 * SOGNI)
    with pytest.raises(ChainRevert) as err:
        env.d.staking.slash(env.workers[0], 1, "grudge", sender=env.workers[1])
    assert err.value.error == "NotSlasher"
    assert env.d.staking.has_role("SLASHER_ROLE", env.slasher)


# -- licences ------------------------------------------------------------------------------


def test_license_mint_batch_blacklist_burn(env: Env) -> None:
    lic = env.d.license
    a, b, c = env.workers[:3]
    assert not lic.has_valid_license(a)
    ids = lic.mint_batch([a, b, c])
    assert ids == [1, 2, 3]
    assert [lic.owner_of(i) for i in ids] == [a.address, b.address, c.address]
    assert all(lic.has_valid_license(x) for x in (a, b, c))

    with pytest.raises(ChainRevert) as err:
        lic.mint_batch([a], sender=a)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    with pytest.raises(ChainRevert) as err:
        lic.blacklist(1, sender=a)
    assert err.value.error == "AccessControlUnauthorizedAccount"

    lic.blacklist(2)
    assert lic.is_blacklisted(2)
    assert not lic.has_valid_license(b)
    assert lic.owner_of(2) == b.address  # still held, no longer valid
    with pytest.raises(ChainRevert) as err:  # and cannot be sold on
        lic.transfer(a, 2, sender=b)
    assert err.value.error == "LicenseBlacklisted"
    lic.unblacklist(2)
    assert lic.has_valid_license(b)

    lic.burn(3)
    assert not lic.has_valid_license(c)
    assert lic.balance_of(c) == 0
    with pytest.raises(ChainRevert) as err:
        lic.owner_of(3)
    assert err.value.error == "ERC721NonexistentToken"

    # a valid licence moves validity with it; two licences, one blacklisted, stays valid
    lic.transfer(c, 1, sender=a)
    assert not lic.has_valid_license(a) and lic.has_valid_license(c)
    [extra] = lic.mint_batch([c])
    lic.blacklist(extra)
    assert lic.has_valid_license(c)
    lic.burn(extra)  # blacklisted licences can still be burned
    assert lic.balance_of(c) == 1 and lic.has_valid_license(c)
