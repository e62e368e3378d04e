"""The gas-tuned claim path (issue 16): RewardDistributor reads and writes its head slot in
assembly and verifies proofs in scratch memory, so these tests try to cheat exactly that code:
another account's proof, a doctored proof or amount, a double claim, a claim while paused, a
claim past the root's total, a claim against an unmatured root, and check afterwards that no
field sharing the head slot was disturbed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_hash.auto import keccak

from sogni_chain import ChainRevert
from sogni_protocol.merkle import MerkleTree

from .chain_env import SOGNI, Env


def _refused(call: Callable[[], Any], error: str) -> dict[str, Any]:
    with pytest.raises(ChainRevert) as err:
        call()
    assert err.value.error == error, err.value.reason
    return err.value.args_by_name


def _post(env: Env, epoch: int, leaves: list[tuple[str, int]]) -> MerkleTree:
    tree = MerkleTree(leaves)
    total = sum(v for _, v in leaves)
    env.d.distributor.post_root(epoch, tree.root, total, keccak(b"e%d" % epoch),
                                sender=env.coordinator)  # fmt: skip
    return tree


def _head(env: Env) -> tuple[int, int, bool, int, int]:
    """Every field of the head slot, through its own view."""
    dist = env.d.distributor
    latest = dist.latest_epoch()
    return latest, dist.claim_delay(), dist.paused(), dist.total_claimed(), dist.total_of(latest)


def test_cheating_the_claim_path_is_refused(env: Env) -> None:
    dist, relayer = env.d.distributor, env.relayer
    a, b, c = (w.address for w in env.workers[:3])
    tree = _post(env, 1, [(a, 5 * SOGNI), (b, 3 * SOGNI), (c, 2 * SOGNI)])
    amount_a, proof_a = tree.proof_for(a)
    _, proof_b = tree.proof_for(b)

    # another account's proof, a wrong amount, a doctored or truncated proof
    _refused(lambda: dist.claim(a, amount_a, proof_b, sender=relayer), "InvalidProof")
    _refused(lambda: dist.claim(b, amount_a, proof_a, sender=relayer), "InvalidProof")
    _refused(lambda: dist.claim(a, amount_a + 1, proof_a, sender=relayer), "InvalidProof")
    flipped = [bytes([proof_a[0][0] ^ 1]) + bytes(proof_a[0][1:]), *proof_a[1:]]
    _refused(lambda: dist.claim(a, amount_a, flipped, sender=relayer), "InvalidProof")
    _refused(lambda: dist.claim(a, amount_a, proof_a[:-1], sender=relayer), "InvalidProof")
    _refused(lambda: dist.claim(a, amount_a, [*proof_a, proof_a[0]], sender=relayer),
             "InvalidProof")  # fmt: skip
    # an empty proof: the leaf alone is not the root of a three-leaf tree
    _refused(lambda: dist.claim(a, amount_a, [], sender=relayer), "InvalidProof")
    assert dist.total_claimed() == 0 and dist.claimed(a) == 0

    # paused: nothing moves; unpaused: the same claim pays once, a second one pays nothing
    dist.pause(sender=env.treasury)
    _refused(lambda: dist.claim(a, amount_a, proof_a, sender=relayer), "EnforcedPause")
    assert _head(env) == (1, 0, True, 0, 10 * SOGNI)
    dist.unpause(sender=env.treasury)
    before = env.d.token.balance_of(a)
    tx = dist.claim(a, amount_a, proof_a, sender=relayer)
    assert tx.event("Claimed") == {"account": a, "epoch": 1, "amount": 5 * SOGNI,
                                   "cumulativeAmount": 5 * SOGNI}  # fmt: skip
    assert env.d.token.balance_of(a) - before == 5 * SOGNI
    args = _refused(lambda: dist.claim(a, amount_a, proof_a, sender=relayer), "NothingToClaim")
    assert args["alreadyClaimed"] == 5 * SOGNI
    assert _head(env) == (1, 0, False, 5 * SOGNI, 10 * SOGNI)
    assert dist.claimed(a) == 5 * SOGNI and dist.claimed(b) == 0

    # a root that moves 4 SOGNI from a (already paid 5) to b keeps its total (10) and is
    # accepted; b's claim would take all claims to 12 > 10, past the root's total: refused
    moved = _post(env, 2, [(a, 1 * SOGNI), (b, 7 * SOGNI), (c, 2 * SOGNI)])
    args = _refused(lambda: dist.claim(b, *moved.proof_for(b), sender=relayer),
                    "ClaimExceedsRootTotal")  # fmt: skip
    assert (args["totalClaimedAfter"], args["rootTotal"]) == (12 * SOGNI, 10 * SOGNI)
    # c's 2 brings claims to 7 <= 10: paid, and the head still holds every other field
    dist.claim(c, *moved.proof_for(c), sender=relayer)
    assert _head(env) == (2, 0, False, 7 * SOGNI, 10 * SOGNI)
    assert dist.max_total_growth() > 0 and dist.matured_epoch() == 2


def test_claims_under_a_delay_use_the_newest_matured_root(env: Env) -> None:
    dist, relayer = env.d.distributor, env.relayer
    a, b = env.workers[0].address, env.workers[1].address
    dist.set_claim_delay(3600, sender=env.treasury)
    t1 = _post(env, 1, [(a, 5 * SOGNI), (b, 1 * SOGNI)])
    args = _refused(lambda: dist.claim(a, *t1.proof_for(a), sender=relayer), "NotMatured")
    assert args["opensAt"] == dist.posted_at(1) + 3600
    env.chain.advance_time(3600)
    t2 = _post(env, 2, [(a, 8 * SOGNI), (b, 1 * SOGNI)])  # not matured yet
    _refused(lambda: dist.claim(a, *t2.proof_for(a), sender=relayer), "InvalidProof")
    tx = dist.claim(a, *t1.proof_for(a), sender=relayer)
    assert tx.event("Claimed")["epoch"] == 1 and tx.event("Claimed")["amount"] == 5 * SOGNI
    env.chain.advance_time(3600)
    tx = dist.claim(a, *t2.proof_for(a), sender=relayer)
    assert tx.event("Claimed")["epoch"] == 2 and tx.event("Claimed")["amount"] == 3 * SOGNI
    assert _head(env) == (2, 3600, False, 8 * SOGNI, 9 * SOGNI)


def test_every_leaf_of_an_odd_sized_tree_verifies(env: Env) -> None:
    """Left and right siblings, short and long proofs: the assembly verifier agrees with the
    OpenZeppelin tree layout the Python side builds, for every position."""
    dist, relayer = env.d.distributor, env.relayer
    leaves = [("0x" + keccak(b"acct%d" % i)[:20].hex(), (i + 1) * SOGNI) for i in range(13)]
    tree = _post(env, 1, leaves)
    lengths = set()
    for account, _ in leaves:
        amount, proof = tree.proof_for(account)
        lengths.add(len(proof))
        assert (
            dist.claim(account, amount, proof, sender=relayer).event("Claimed")["amount"] == amount
        )
    assert len(lengths) > 1  # an unbalanced tree: proofs of different lengths were exercised
    assert dist.total_claimed() == sum(v for _, v in leaves)
