"""Roles: grant/revoke, the two-step admin handover (AccessControlDefaultAdminRules), and the
settlement role kept apart from the admin."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_hash.auto import keccak

from sogni_chain import ChainRevert, Deployment, deploy_all

from .chain_env import Env

DAY = 24 * 3600
ZERO = "0x" + "00" * 20


def test_settlement_role_is_separate_from_admin(env: Env) -> None:
    dist, admin, settler = env.d.distributor, env.treasury, env.coordinator
    assert dist.default_admin() == admin.address
    assert dist.has_role("SETTLEMENT_ROLE", settler)
    assert not dist.has_role("DEFAULT_ADMIN_ROLE", settler)
    assert not dist.has_role("SETTLEMENT_ROLE", admin)
    root = keccak(b"root")
    with pytest.raises(ChainRevert) as err:  # the admin cannot post roots ...
        dist.post_root(1, root, 0, root, sender=admin)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    for call in (  # ... and the settlement key cannot do admin things
        lambda: dist.pause(sender=settler),
        lambda: dist.set_claim_delay(0, sender=settler),
        lambda: dist.set_max_total_growth(1, sender=settler),
        lambda: dist.grant_role("SETTLEMENT_ROLE", env.relayer, sender=settler),
        lambda: dist.begin_default_admin_transfer(settler, sender=settler),
    ):
        with pytest.raises(ChainRevert) as err:
            call()
        assert err.value.error == "AccessControlUnauthorizedAccount"
    dist.post_root(1, root, 0, root, sender=settler)


def test_grant_and_revoke_settlement_role(env: Env) -> None:
    dist, admin, new = env.d.distributor, env.treasury, env.relayer
    root = keccak(b"r")
    tx = dist.grant_role("SETTLEMENT_ROLE", new, sender=admin)
    assert tx.event("RoleGranted")["account"] == new.address
    dist.post_root(1, root, 0, root, sender=new)
    dist.revoke_role("SETTLEMENT_ROLE", env.coordinator, sender=admin)  # retire the old key
    assert not dist.has_role("SETTLEMENT_ROLE", env.coordinator)
    with pytest.raises(ChainRevert) as err:
        dist.post_root(2, root, 0, root, sender=env.coordinator)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    dist.revoke_role("SETTLEMENT_ROLE", new, sender=admin)
    with pytest.raises(ChainRevert):
        dist.post_root(2, root, 0, root, sender=new)


def test_admin_role_is_never_granted_or_revoked_directly(env: Env) -> None:
    for contract in (env.d.distributor, env.d.staking, env.d.license):
        with pytest.raises(ChainRevert) as err:
            contract.grant_role("DEFAULT_ADMIN_ROLE", env.relayer, sender=env.treasury)
        assert err.value.error == "AccessControlEnforcedDefaultAdminRules"
        assert "two steps" in str(err.value)
        with pytest.raises(ChainRevert) as err:
            contract.revoke_role("DEFAULT_ADMIN_ROLE", env.treasury, sender=env.treasury)
        assert err.value.error == "AccessControlEnforcedDefaultAdminRules"


def test_two_step_admin_handover_waits_for_the_delay(env: Env) -> None:
    """A live-style deployment (2-day admin delay): the new admin accepts only after it."""
    chain, old, new = env.chain, env.treasury, env.workers[5]
    addresses = deploy_all(chain, old, coordinator=env.coordinator, admin_transfer_delay=2 * DAY)
    d = Deployment(chain, addresses, sender=old)
    for contract in (d.distributor, d.staking, d.license):
        assert contract.default_admin_delay() == 2 * DAY
        tx = contract.begin_default_admin_transfer(new, sender=old)
        new_admin, schedule = contract.pending_default_admin()
        assert new_admin == new.address
        assert schedule == tx.event("DefaultAdminTransferScheduled")["acceptSchedule"]
        with pytest.raises(ChainRevert) as err:  # too early
            contract.accept_default_admin_transfer(sender=new)
        assert err.value.error == "AccessControlEnforcedDefaultAdminDelay"
        with pytest.raises(ChainRevert) as err:  # only the named account may accept
            contract.accept_default_admin_transfer(sender=env.relayer)
        assert err.value.error == "AccessControlInvalidDefaultAdmin"
    # a handover can be cancelled
    d.license.cancel_default_admin_transfer(sender=old)
    assert d.license.pending_default_admin() == (ZERO, 0)

    chain.advance_time(2 * DAY + 10)
    for contract in (d.distributor, d.staking):
        contract.accept_default_admin_transfer(sender=new)
        assert contract.default_admin() == new.address
        assert contract.has_role("DEFAULT_ADMIN_ROLE", new)
        assert not contract.has_role("DEFAULT_ADMIN_ROLE", old)
    with pytest.raises(ChainRevert):  # cancelled: nothing to accept
        d.license.accept_default_admin_transfer(sender=new)
    assert d.license.default_admin() == old.address

    # the new admin governs; the old one no longer does
    d.distributor.pause(sender=new)
    with pytest.raises(ChainRevert) as err:
        d.distributor.unpause(sender=old)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    d.staking.set_tier_minimum(1, 5, sender=new)
    assert d.staking.tier_minimum(1) == 5


def test_dev_chain_handover_is_two_steps_without_a_wait(env: Env) -> None:
    dist, new = env.d.distributor, Account.create()
    env.chain.send_eth(new, 10**17, sender=env.treasury)
    assert dist.default_admin_delay() == 0
    dist.begin_default_admin_transfer(new.address, sender=env.treasury)
    env.chain.advance_time(2)  # accepted strictly after the schedule
    dist.accept_default_admin_transfer(sender=new)
    assert dist.default_admin() == new.address
    assert dist.has_role("SETTLEMENT_ROLE", env.coordinator)  # other roles are untouched
