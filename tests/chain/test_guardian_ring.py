"""RewardDistributor's guardian (pause only) and its ring of stored epochs (older epochs
read back from events; a post may not push out the newest matured root)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_hash.auto import keccak

from sogni_chain import ChainRevert, Deployment, deploy_all
from sogni_protocol.merkle import MerkleTree

from .chain_env import SOGNI, Env

DAY = 24 * 3600


def _tree(env: Env, amount: int) -> MerkleTree:
    return MerkleTree([(env.workers[0].address, amount), (env.workers[1].address, 1)])


def _post(env: Env, epoch: int, amount: int | None = None) -> MerkleTree:
    tree = _tree(env, epoch * SOGNI if amount is None else amount)
    total = sum(v for _, v in tree.leaves())
    env.d.distributor.post_root(
        epoch, tree.root, total, keccak(b"r%d" % epoch), sender=env.coordinator
    )
    return tree


def _refused(call: Callable[[], Any], error: str = "AccessControlUnauthorizedAccount") -> None:
    with pytest.raises(ChainRevert) as err:
        call()
    assert err.value.error == error


def test_the_guardian_pauses_and_can_do_nothing_else(env: Env) -> None:
    dist, admin, guardian = env.d.distributor, env.treasury, env.workers[5]
    assert dist.has_role("GUARDIAN_ROLE", admin)  # dev chain: the deployer guards
    _refused(lambda: dist.pause(sender=guardian))  # not yet a guardian
    dist.grant_role("GUARDIAN_ROLE", guardian, sender=admin)
    tree = _post(env, 1)
    a = env.workers[0]

    tx = dist.pause(sender=guardian)
    assert tx.event("Paused") == {"account": guardian.address} and dist.paused()
    _refused(lambda: dist.pause(sender=guardian), "EnforcedPause")
    _refused(lambda: dist.claim(a, *tree.proof_for(a.address), sender=a), "EnforcedPause")
    _refused(
        lambda: dist.claim_and_stake(a, *tree.proof_for(a.address), 0, 2**63, sender=a),
        "EnforcedPause",
    )
    # the cheats: a guardian cannot resume, post, set caps or delays, or hand out roles
    cheats: list[Callable[[], Any]] = [
        lambda: dist.unpause(sender=guardian),
        lambda: _post_as(env, guardian, 2),
        lambda: dist.post_airdrop_root(2, 1, tree.root, 10**30, tree.root, sender=guardian),
        lambda: dist.set_max_total_growth(10**30, sender=guardian),
        lambda: dist.set_claim_delay(0, sender=guardian),
        lambda: dist.set_airdrop_cap(1, 10**30, sender=guardian),
        lambda: dist.grant_role("GUARDIAN_ROLE", env.workers[4], sender=guardian),
        lambda: dist.grant_role("SETTLEMENT_ROLE", guardian, sender=guardian),
        lambda: dist.revoke_role("GUARDIAN_ROLE", admin, sender=guardian),
        lambda: dist.begin_default_admin_transfer(guardian, sender=guardian),
    ]
    for cheat in cheats:
        _refused(cheat)
    assert dist.paused() and not dist.has_role("SETTLEMENT_ROLE", guardian)

    tx = dist.unpause(sender=admin)  # governance resumes
    assert tx.event("Unpaused") == {"account": admin.address} and not dist.paused()
    _refused(lambda: dist.unpause(sender=admin), "ExpectedPause")
    assert dist.claim(a, *tree.proof_for(a.address), sender=a).event("Claimed")["amount"] == SOGNI


def _post_as(env: Env, who: Any, epoch: int) -> None:
    tree = _tree(env, epoch * SOGNI)
    env.d.distributor.post_root(epoch, tree.root, 2 * SOGNI, tree.root, sender=who)


def test_epochs_out_of_the_ring_are_read_from_events(env: Env) -> None:
    dist = env.d.distributor
    ring = int(dist._call("RING"))
    trees = {e: _post(env, e) for e in range(1, ring + 3)}
    assert bytes(dist._call("rootOf", 1)) == bytes(32)  # overwritten in storage ...
    assert dist.root_of(1) == trees[1].root  # ... kept in the RootPosted event
    assert dist.receipts_hash_of(1) == keccak(b"r1")
    assert dist.total_of(1) == SOGNI + 1 and dist.posted_at(1) > 0
    assert dist.root_of(ring + 2) == trees[ring + 2].root and dist.total_of(ring + 2) > 0
    assert dist.root_of(ring + 3) is None and dist.receipts_hash_of(ring + 3) == bytes(32)
    a = env.workers[0]
    tx = dist.claim(a, *trees[ring + 2].proof_for(a.address), sender=a)
    assert tx.event("Claimed")["epoch"] == ring + 2
    _refused(  # an evicted root pays nothing: claims verify against the matured one only
        lambda: dist.claim(env.workers[1], *trees[1].proof_for(env.workers[1].address)),
        "InvalidProof",
    )


def test_a_post_never_pushes_out_the_newest_matured_root(env: Env) -> None:
    dist, chain, a = env.d.distributor, env.chain, env.workers[0]
    ring = int(dist._call("RING"))
    dist.set_claim_delay(DAY, sender=env.treasury)
    first = _post(env, 1)
    _refused(lambda: dist.claim(a, *first.proof_for(a.address), sender=a), "NotMatured")
    chain.advance_time(DAY + 10)
    for e in range(2, ring + 1):  # ring - 1 roots maturing at once is allowed
        _post(env, e)
    assert dist.matured_epoch() == 1
    with pytest.raises(ChainRevert) as err:  # epoch ring + 1 would overwrite epoch 1
        _post(env, ring + 1)
    assert err.value.error == "TooManyMaturing"
    assert err.value.args_by_name["opensAt"] == dist.posted_at(2) + DAY
    assert dist.claim(a, *first.proof_for(a.address), sender=a).event("Claimed")["epoch"] == 1
    chain.advance_time(dist.posted_at(2) + DAY - chain.timestamp() + 10)
    newest = _post(env, ring + 1)
    assert dist.matured_epoch() >= 2 and dist.root_of(1) == first.root  # history: events
    chain.advance_time(DAY + 10)
    tx = dist.claim(a, *newest.proof_for(a.address), sender=a)
    assert tx.event("Claimed")["amount"] == (ring + 1) * SOGNI - SOGNI


def test_deploy_grants_the_guardian_it_is_given(env: Env) -> None:
    guardian = env.workers[4]
    addrs = deploy_all(env.chain, env.treasury, coordinator=env.coordinator, guardian=guardian)
    dist = Deployment(env.chain, addrs, sender=env.treasury).distributor
    assert dist.has_role("GUARDIAN_ROLE", guardian)
    assert not dist.has_role("GUARDIAN_ROLE", env.treasury)  # the given one instead
    dist.pause(sender=guardian)
    _refused(lambda: dist.unpause(sender=guardian))
