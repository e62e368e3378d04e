"""WorkerLicense transfer cooldown: a licence that changed hands stays put for a while."""

from __future__ import annotations

import pytest

from sogni_chain import ChainRevert

from .chain_env import Env

DAY = 24 * 3600
SLACK = 10


def test_second_hand_over_within_the_cooldown_reverts(env: Env) -> None:
    lic = env.d.license
    a, b, c = env.workers[:3]
    assert lic.transfer_cooldown() == 7 * DAY
    [token] = lic.mint_batch([a])
    assert lic.transferable_at(token) == 0  # minting starts no cooldown
    tx = lic.transfer(b, token, sender=a)
    moved_at = env.chain.w3.eth.get_block(tx.block_number)["timestamp"]
    assert lic.transferable_at(token) == moved_at + 7 * DAY
    assert lic.has_valid_license(b) and not lic.has_valid_license(a)

    with pytest.raises(ChainRevert) as err:
        lic.transfer(c, token, sender=b)
    assert err.value.error == "TransferCooldown"
    assert err.value.args_by_name == {"tokenId": token, "until": moved_at + 7 * DAY}
    assert "can move again at" in str(err.value)
    env.chain.advance_time(6 * DAY)
    with pytest.raises(ChainRevert):
        lic.transfer(c, token, sender=b)
    assert lic.owner_of(token) == b.address and lic.valid_balance(b) == 1

    env.chain.advance_time(DAY + SLACK)
    lic.transfer(c, token, sender=b)  # the cooldown is over
    assert lic.owner_of(token) == c.address
    assert (lic.valid_balance(a), lic.valid_balance(b), lic.valid_balance(c)) == (0, 0, 1)
    with pytest.raises(ChainRevert):  # and a new one has started
        lic.transfer(a, token, sender=c)


def test_cooldown_does_not_block_burning_or_blacklisting(env: Env) -> None:
    lic = env.d.license
    a, b = env.workers[:2]
    first, second = lic.mint_batch([a, a])
    lic.transfer(b, first, sender=a)
    lic.transfer(b, second, sender=a)
    assert lic.valid_balance(b) == 2
    lic.blacklist(second)
    assert lic.valid_balance(b) == 1
    with pytest.raises(ChainRevert) as err:  # blacklisting is checked first, as before
        lic.transfer(a, second, sender=b)
    assert err.value.error == "LicenseBlacklisted"
    lic.burn(first)  # governance burns regardless of the cooldown
    assert lic.valid_balance(b) == 0 and lic.balance_of(b) == 1
    assert lic.transferable_at(first) == 0


def test_governance_sets_the_cooldown(env: Env) -> None:
    lic = env.d.license
    a, b, c = env.workers[:3]
    [token] = lic.mint_batch([a])
    lic.transfer(b, token, sender=a)
    with pytest.raises(ChainRevert) as err:
        lic.set_transfer_cooldown(0, sender=a)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    tx = lic.set_transfer_cooldown(3600)
    assert tx.event("TransferCooldownSet") == {"cooldown": 3600}
    assert lic.transfer_cooldown() == 3600
    with pytest.raises(ChainRevert):
        lic.transfer(c, token, sender=b)
    env.chain.advance_time(3600 + SLACK)  # the shorter cooldown applies at once
    lic.transfer(c, token, sender=b)
    lic.set_transfer_cooldown(0)  # none at all
    lic.transfer(a, token, sender=c)
    assert lic.owner_of(token) == a.address
