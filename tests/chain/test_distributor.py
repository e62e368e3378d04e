"""RewardDistributor: roots, claims against Python-built Merkle trees, pause, EIP-712 domain."""

from __future__ import annotations

import pytest
from eth_abi import encode as abi_encode
from eth_account._utils.encode_typed_data.encoding_and_hashing import hash_domain
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak

from sogni_chain import DISTRIBUTOR_DOMAIN_VERSION, ChainRevert
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.merkle import MerkleTree

from .chain_env import DISTRIBUTOR_FUNDING, SOGNI, WORKER_FUNDING, Env

RECEIPTS = keccak(b"epoch receipts file")


def _tree(env: Env, amounts: list[int]) -> MerkleTree:
    return MerkleTree([(w.address, a) for w, a in zip(env.workers, amounts, strict=False)])


def test_post_root_only_by_settlement_role(env: Env) -> None:
    dist = env.d.distributor
    tree = _tree(env, [100, 200])
    with pytest.raises(ChainRevert) as err:  # governance is not the settlement role
        dist.post_root(1, tree.root, 300, RECEIPTS, sender=env.treasury)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    assert err.value.args_by_name["account"] == env.treasury.address

    tx = dist.post_root(1, tree.root, 300, RECEIPTS, sender=env.coordinator)
    ev = tx.event("RootPosted")
    assert (ev["epoch"], ev["root"], ev["total"], ev["receiptsHash"]) == (
        1,
        tree.root,
        300,
        RECEIPTS,
    )
    assert dist.root_of(1) == tree.root
    assert dist.root_of(2) is None
    assert dist.receipts_hash_of(1) == RECEIPTS
    assert dist.latest_epoch() == 1 and dist.latest_root() == tree.root
    assert [r["epoch"] for r in dist.roots_posted()] == [1]


def test_post_root_rules(env: Env) -> None:
    dist, c = env.d.distributor, env.coordinator
    tree = _tree(env, [100])
    with pytest.raises(ChainRevert) as err:
        dist.post_root(1, bytes(32), 100, RECEIPTS, sender=c)
    assert err.value.error == "ZeroRoot"
    with pytest.raises(ChainRevert) as err:  # every leaf must be payable
        dist.post_root(1, tree.root, DISTRIBUTOR_FUNDING + 1, RECEIPTS, sender=c)
    assert err.value.error == "Underfunded"
    with pytest.raises(ChainRevert) as err:  # the first epoch is 1
        dist.post_root(0, tree.root, 100, RECEIPTS, sender=c)
    assert err.value.args_by_name == {"epoch": 0, "expected": 1}

    dist.post_root(1, tree.root, 100, RECEIPTS, sender=c)
    with pytest.raises(ChainRevert) as err:
        dist.post_root(1, _tree(env, [1]).root, 1, RECEIPTS, sender=c)
    assert err.value.error == "RootAlreadyPosted"
    assert err.value.args_by_name == {"epoch": 1}
    with pytest.raises(ChainRevert) as err:  # no gaps
        dist.post_root(3, tree.root, 100, RECEIPTS, sender=c)
    assert err.value.error == "EpochNotNext"
    assert err.value.args_by_name == {"epoch": 3, "expected": 2}
    dist.post_root(2, tree.root, 100, RECEIPTS, sender=c)
    assert dist.latest_epoch() == 2
    assert dist.total_of(2) == 100 and dist.posted_at(2) > 0


def test_claim_pays_once_and_checks_amount_and_proof(env: Env) -> None:
    dist, token = env.d.distributor, env.d.token
    a, b = env.workers[0], env.workers[1]
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, 1, [], sender=a)
    assert err.value.error == "NoRoot"

    tree = _tree(env, [100 * SOGNI, 250 * SOGNI, 7])
    dist.post_root(1, tree.root, 350 * SOGNI + 7, RECEIPTS, sender=env.coordinator)
    amount, proof = tree.proof_for(a.address)

    with pytest.raises(ChainRevert) as err:  # wrong amount
        dist.claim(a, amount + 1, proof, sender=a)
    assert err.value.error == "InvalidProof"
    with pytest.raises(ChainRevert) as err:  # someone else's proof
        dist.claim(a, amount, tree.proof_for(b.address)[1], sender=a)
    assert err.value.error == "InvalidProof"
    with pytest.raises(ChainRevert) as err:  # b claiming a's leaf
        dist.claim(b, amount, proof, sender=b)
    assert err.value.error == "InvalidProof"

    tx = dist.claim(a, amount, proof, sender=a)
    assert tx.event("Claimed") == {
        "account": a.address,
        "epoch": 1,
        "amount": amount,
        "cumulativeAmount": amount,
    }
    assert token.balance_of(a) == WORKER_FUNDING + amount
    assert dist.claimed(a) == amount

    # the second claim pays nothing: it reverts NothingToClaim (documented choice)
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, amount, proof, sender=a)
    assert err.value.error == "NothingToClaim"
    assert err.value.args_by_name["alreadyClaimed"] == amount
    assert token.balance_of(a) == WORKER_FUNDING + amount

    # anyone may relay a claim; the tokens go to the account
    b_amount, b_proof = tree.proof_for(b.address)
    dist.claim(b, b_amount, b_proof, sender=env.relayer)
    assert token.balance_of(b) == WORKER_FUNDING + b_amount
    assert token.balance_of(env.relayer) == 0
    assert dist.total_claimed() == amount + b_amount


def test_cumulative_claims_across_epochs_pay_the_difference(env: Env) -> None:
    dist, token = env.d.distributor, env.d.token
    a, b, c = env.workers[:3]
    e1 = MerkleTree([(a.address, 100), (b.address, 50)])
    dist.post_root(1, e1.root, 150, RECEIPTS, sender=env.coordinator)
    dist.claim(a, *e1.proof_for(a.address), sender=a)
    assert token.balance_of(a) == WORKER_FUNDING + 100

    e2 = MerkleTree([(a.address, 250), (b.address, 80), (c.address, 30)])
    dist.post_root(2, e2.root, 360, keccak(b"epoch 2"), sender=env.coordinator)
    with pytest.raises(ChainRevert) as err:  # claims use the newest matured root only
        dist.claim(b, *e1.proof_for(b.address), sender=b)
    assert err.value.error == "InvalidProof"

    tx = dist.claim(a, *e2.proof_for(a.address), sender=a)
    assert tx.event("Claimed")["amount"] == 150 and tx.event("Claimed")["epoch"] == 2
    assert token.balance_of(a) == WORKER_FUNDING + 250
    dist.claim(b, *e2.proof_for(b.address), sender=b)  # skipped epoch 1: gets it all at once
    assert token.balance_of(b) == WORKER_FUNDING + 80
    assert dist.claimed(b) == 80


def test_pause_blocks_claims_not_roots(env: Env) -> None:
    dist, a = env.d.distributor, env.workers[0]
    tree = _tree(env, [10, 20])
    dist.post_root(1, tree.root, 30, RECEIPTS, sender=env.coordinator)
    with pytest.raises(ChainRevert) as err:
        dist.pause(sender=a)
    assert err.value.error == "AccessControlUnauthorizedAccount"

    dist.pause(sender=env.treasury)
    assert dist.paused()
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, *tree.proof_for(a.address), sender=a)
    assert err.value.error == "EnforcedPause"
    fixed = _tree(env, [11, 20])  # a bad root is replaced by posting the next epoch
    dist.post_root(2, fixed.root, 31, RECEIPTS, sender=env.coordinator)

    dist.unpause(sender=env.treasury)
    assert dist.claim(a, *fixed.proof_for(a.address), sender=a).event("Claimed")["amount"] == 11


def test_mined_failure_is_replayed_for_its_reason(env: Env) -> None:
    """With an explicit gas limit nothing is estimated: the tx is mined, fails, and is explained."""
    dist = env.d.distributor
    tree = _tree(env, [10])
    dist.post_root(1, tree.root, 10, RECEIPTS, sender=env.coordinator)
    fn = dist.contract.functions.claim(env.workers[0].address, 11, tree.proof(0))
    block = env.chain.block_number()
    with pytest.raises(ChainRevert) as err:
        env.chain.send(fn, sender=env.relayer, gas=200_000)
    assert err.value.error == "InvalidProof"
    assert env.chain.block_number() == block + 1  # it was mined


def test_eip712_domain_matches_python(env: Env) -> None:
    dist = env.d.distributor
    domain = dist.eip712_domain()
    assert domain.name == "SogniSupernet"
    assert domain.version == "3"
    assert domain.chain_id == env.chain.chain_id
    assert domain.verifying_contract == dist.address

    type_hash = keccak(
        b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    by_hand = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [type_hash, keccak(b"SogniSupernet"), keccak(b"3"), env.chain.chain_id, dist.address],
        )
    )
    assert dist.domain_separator() == by_hand == hash_domain(domain.as_dict())
    protocol = dist.protocol_domain()  # what offers and receipts are signed under
    assert protocol == Domain(chain_id=env.chain.chain_id, verifying_contract=dist.address)
    assert protocol.version == eip712.DOMAIN_VERSION  # offers and receipts: the current one
    assert protocol.at(DISTRIBUTOR_DOMAIN_VERSION).separator == dist.domain_separator()

    # and eth-account signs typed data under exactly this separator
    signable = encode_typed_data(
        domain_data=domain.as_dict(),
        message_types={"Ping": [{"name": "n", "type": "uint256"}]},
        message_data={"n": 1},
    )
    assert signable.header == dist.domain_separator()
