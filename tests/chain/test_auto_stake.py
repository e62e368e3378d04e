"""claimAndStake (gasless auto-stake with an EIP-712 StakeAuthorization), Staking.stakeFor and
stake snapshots by block."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from eth_utils import to_checksum_address
from rlp import encode as rlp_encode

from sogni_chain import ChainRevert
from sogni_chain.contracts import (
    DISTRIBUTOR_DOMAIN_VERSION,
    sign_stake_authorization,
    stake_authorization_typed_data,
)
from sogni_protocol.merkle import MerkleTree

from .chain_env import SOGNI, WORKER_FUNDING, Env

RECEIPTS = keccak(b"receipts")


def _post(env: Env, epoch: int, leaves: list[tuple[str, int]]) -> MerkleTree:
    tree = MerkleTree(leaves)
    total = sum(a for _, a in leaves)
    env.d.distributor.post_root(epoch, tree.root, total, RECEIPTS, sender=env.coordinator)
    return tree


def _deadline(env: Env) -> int:
    return env.chain.timestamp() + 3600


def test_relayer_claims_and_stakes_with_the_workers_signature(env: Env) -> None:
    d, chain, relayer = env.d, env.chain, env.relayer
    w = env.workers[0]
    tree = _post(env, 1, [(w.address, 400 * SOGNI), (env.workers[1].address, 1)])
    amount, proof = tree.proof_for(w.address)
    deadline = _deadline(env)
    sig = d.distributor.sign_stake_authorization(w, amount, 2_500, deadline)
    eth_before, relayer_tokens = chain.eth_balance(w), d.token.balance_of(relayer)

    tx = d.distributor.claim_and_stake(w, amount, proof, 2_500, deadline, sig, sender=relayer)
    assert tx.event("Claimed") == {
        "account": w.address,
        "epoch": 1,
        "amount": amount,
        "cumulativeAmount": amount,
    }
    assert tx.event("AutoStaked") == {
        "account": w.address,
        "epoch": 1,
        "staked": 100 * SOGNI,
        "paid": 300 * SOGNI,
    }
    assert tx.event("Staked")["account"] == w.address  # the staking contract's event
    assert d.staking.active_stake(w) == 100 * SOGNI
    assert d.token.balance_of(w) == WORKER_FUNDING + 300 * SOGNI
    assert d.token.balance_of(relayer) == relayer_tokens == 0  # the relayer gets nothing
    assert chain.eth_balance(w) == eth_before  # and paid the gas
    assert d.token.balance_of(d.staking.address) == d.staking.total_active() == 100 * SOGNI
    assert d.token.allowance(d.distributor.address, d.staking.address) == 0
    assert d.distributor.claimed(w) == amount

    # replaying the same authorization gets nothing: the claimed amount has moved on
    with pytest.raises(ChainRevert) as err:
        d.distributor.claim_and_stake(w, amount, proof, 2_500, deadline, sig, sender=relayer)
    assert err.value.error == "NothingToClaim"
    # nor in a later epoch: the signed cumulative amount is not a leaf of the new tree
    tree2 = _post(env, 2, [(w.address, 600 * SOGNI), (env.workers[1].address, 1)])
    with pytest.raises(ChainRevert) as err:
        d.distributor.claim_and_stake(w, amount, proof, 2_500, deadline, sig, sender=relayer)
    assert err.value.error == "InvalidProof"
    with pytest.raises(ChainRevert) as err:  # nor stretched to the new amount
        d.distributor.claim_and_stake(
            w, *tree2.proof_for(w.address), 2_500, deadline, sig, sender=relayer
        )
    assert err.value.error == "InvalidStakeAuthorization"


def test_bad_authorizations_are_refused(env: Env) -> None:
    d, relayer = env.d, env.relayer
    w, other = env.workers[0], env.workers[1]
    tree = _post(env, 1, [(w.address, 10 * SOGNI), (other.address, 5 * SOGNI)])
    amount, proof = tree.proof_for(w.address)
    deadline = _deadline(env)
    dist = d.distributor

    def attempt(sig: bytes, bps: int = 5_000, dl: int = deadline) -> ChainRevert:
        with pytest.raises(ChainRevert) as err:
            dist.claim_and_stake(w, amount, proof, bps, dl, sig, sender=relayer)
        return err.value

    wrong_signer = sign_stake_authorization(
        other,
        chain_id=env.chain.chain_id,
        distributor=dist.address,
        cumulative_amount=amount,
        stake_bps=5_000,
        deadline=deadline,
    )  # `other` signing its own authorization: not w's
    err = attempt(wrong_signer)
    assert err.error == "InvalidStakeAuthorization"
    assert err.args_by_name == {"account": w.address}
    # w's signature, but of other values
    assert attempt(dist.sign_stake_authorization(w, amount, 4_999, deadline)).error == (
        "InvalidStakeAuthorization"
    )
    assert attempt(b"").error == "InvalidStakeAuthorization"  # a relayer needs a signature
    assert attempt(b"\x01" * 65).error == "InvalidStakeAuthorization"
    # signed for another deployment (another verifying contract)
    elsewhere = sign_stake_authorization(
        w,
        chain_id=env.chain.chain_id,
        distributor=d.staking.address,
        cumulative_amount=amount,
        stake_bps=5_000,
        deadline=deadline,
    )
    assert attempt(elsewhere).error == "InvalidStakeAuthorization"

    past = env.chain.timestamp() - 1
    err = attempt(dist.sign_stake_authorization(w, amount, 5_000, past), dl=past)
    assert err.error == "AuthorizationExpired" and err.args_by_name == {"deadline": past}
    err = attempt(b"", bps=10_001)
    assert err.error == "StakeBpsTooHigh"
    assert err.args_by_name == {"stakeBps": 10_001, "maximum": 10_000}
    with pytest.raises(ValueError):
        dist.sign_stake_authorization(w, amount, 10_001, deadline)

    dist.pause(sender=env.treasury)
    assert attempt(dist.sign_stake_authorization(w, amount, 5_000, deadline)).error == (
        "EnforcedPause"
    )
    dist.unpause(sender=env.treasury)
    assert dist.claimed(w) == 0 and d.staking.active_stake(w) == 0


def test_worker_submits_its_own_claim_and_stake_without_a_signature(env: Env) -> None:
    d, w = env.d, env.workers[2]
    tree = _post(env, 1, [(w.address, 7 * SOGNI + 3), (env.workers[0].address, 1)])
    amount, proof = tree.proof_for(w.address)
    tx = d.distributor.claim_and_stake(w, amount, proof, 10_000, _deadline(env), sender=w)
    assert tx.event("AutoStaked")["staked"] == amount and tx.event("AutoStaked")["paid"] == 0
    assert d.staking.active_stake(w) == amount
    assert d.token.balance_of(w) == WORKER_FUNDING


def test_stake_nothing_pays_everything(env: Env) -> None:
    d, w = env.d, env.workers[1]
    tree = _post(env, 1, [(w.address, 9), (env.workers[0].address, 1)])
    amount, proof = tree.proof_for(w.address)
    sig = d.distributor.sign_stake_authorization(w, amount, 0, _deadline(env))
    tx = d.distributor.claim_and_stake(w, amount, proof, 0, _deadline(env), sig, sender=env.relayer)
    assert tx.event("AutoStaked") == {"account": w.address, "epoch": 1, "staked": 0, "paid": 9}
    assert not any(e.name == "Staked" for e in tx.events)
    assert d.token.balance_of(w) == WORKER_FUNDING + 9
    # rounding goes to the worker's wallet: 1 wei at 50% stakes 0
    tree2 = _post(env, 2, [(w.address, 10), (env.workers[0].address, 1)])
    amount2, proof2 = tree2.proof_for(w.address)
    tx = d.distributor.claim_and_stake(w, amount2, proof2, 5_000, _deadline(env), sender=w)
    assert (tx.event("AutoStaked")["staked"], tx.event("AutoStaked")["paid"]) == (0, 1)


def test_typed_data_document_matches_the_contract(env: Env) -> None:
    dist = env.d.distributor
    doc = dist.stake_authorization(env.workers[0], 123, 4_000, 99)
    assert doc == stake_authorization_typed_data(
        chain_id=env.chain.chain_id,
        distributor=dist.address,
        account=env.workers[0].address,
        cumulative_amount=123,
        stake_bps=4_000,
        deadline=99,
    )
    assert doc["domain"]["version"] == DISTRIBUTOR_DOMAIN_VERSION == "3"
    assert doc["primaryType"] == "StakeAuthorization"
    signable = encode_typed_data(full_message=doc)
    assert signable.header == dist.domain_separator()
    type_hash = dist.contract.functions.STAKE_AUTHORIZATION_TYPEHASH().call()
    assert type_hash == keccak(
        b"StakeAuthorization(address account,uint256 cumulativeAmount,uint16 stakeBps,"
        b"uint64 deadline)"
    )


# -- ERC-1271: a contract wallet authorizes by answering isValidSignature ---------------------


def _approving_wallet_code(digest: bytes) -> bytes:
    """Init code of a minimal ERC-1271 wallet that approves exactly one digest (any signature
    bytes), and returns 0 for everything else."""
    assert len(digest) == 32
    magic = bytes.fromhex("631626ba7e60e01b60005260206000f3")  # mstore(0, 0x1626ba7e << 224)
    runtime = (
        bytes.fromhex("600435")  # calldataload(4): the hash
        + b"\x7f"
        + digest  # push32 digest
        + bytes.fromhex("14603257")  # eq; jumpi(0x32)
        + bytes.fromhex("6000600052" + "60206000f3")  # return 32 zero bytes
        + b"\x5b"  # 0x32: jumpdest
        + magic
    )
    assert runtime[0x32] == 0x5B
    n = len(runtime)
    init = bytes([0x60, n, 0x80, 0x60, 0x0B, 0x60, 0x00, 0x39, 0x60, 0x00, 0xF3])
    return init + runtime


def _deploy_code(env: Env, code: bytes) -> str:
    chain, sender = env.chain, env.treasury
    tx: dict[str, Any] = {
        "data": "0x" + code.hex(),
        "value": 0,
        "gas": 200_000,
        "nonce": chain.w3.eth.get_transaction_count(sender.address, "pending"),
        "chainId": chain.chain_id,
        "maxFeePerGas": 2 * int(chain.w3.eth.get_block("latest")["baseFeePerGas"]) + 10**9,
        "maxPriorityFeePerGas": 10**9,
    }
    signed = sender.sign_transaction(tx)
    receipt = chain.w3.eth.wait_for_transaction_receipt(
        chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    )
    assert receipt["status"] == 1
    return str(receipt["contractAddress"])


def test_contract_wallet_authorizes_through_erc1271(env: Env) -> None:
    d, dist = env.d, env.d.distributor
    deadline = _deadline(env)
    # the digest names the wallet: predict its address from the deployer's nonce
    nonce = env.chain.w3.eth.get_transaction_count(env.treasury.address, "pending")
    wallet = to_checksum_address(
        keccak(rlp_encode([bytes.fromhex(env.treasury.address[2:]), nonce]))[12:]
    )
    amount = 40 * SOGNI
    signable = encode_typed_data(
        full_message=dist.stake_authorization(wallet, amount, 5_000, deadline)
    )
    digest = keccak(b"\x19" + signable.version + signable.header + signable.body)
    assert _deploy_code(env, _approving_wallet_code(digest)) == wallet

    tree = _post(env, 1, [(wallet, amount), (env.workers[0].address, 1)])
    _, proof = tree.proof_for(wallet)
    with pytest.raises(ChainRevert) as err:  # the wallet approved 50%, not 60%
        dist.claim_and_stake(wallet, amount, proof, 6_000, deadline, b"", sender=env.relayer)
    assert err.value.error == "InvalidStakeAuthorization"
    tx = dist.claim_and_stake(wallet, amount, proof, 5_000, deadline, b"", sender=env.relayer)
    assert tx.event("AutoStaked")["staked"] == 20 * SOGNI
    assert d.staking.active_stake(wallet) == 20 * SOGNI
    assert d.token.balance_of(wallet) == 20 * SOGNI


# -- Staking.stakeFor and stake snapshots ------------------------------------------------------


def test_stake_for_credits_the_account_and_only_it_can_unstake(env: Env) -> None:
    d = env.d
    payer, owner = env.workers[0], env.workers[1]
    d.token.approve(d.staking.address, 300 * SOGNI, sender=payer)
    tx = d.staking.stake_for(owner, 300 * SOGNI, sender=payer)
    assert tx.event("Staked") == {
        "account": owner.address,
        "amount": 300 * SOGNI,
        "activeAfter": 300 * SOGNI,
    }
    assert d.staking.active_stake(owner) == 300 * SOGNI
    assert d.staking.active_stake(payer) == 0
    assert d.token.balance_of(payer) == WORKER_FUNDING - 300 * SOGNI
    assert d.staking.total_active() == 300 * SOGNI
    with pytest.raises(ChainRevert) as err:  # the payer has no claim on it
        d.staking.request_unstake(1, sender=payer)
    assert err.value.error == "InsufficientActiveStake"
    d.staking.request_unstake(100 * SOGNI, sender=owner)
    assert d.staking.total_pending() == 100 * SOGNI

    with pytest.raises(ChainRevert) as err:
        d.staking.stake_for("0x" + "00" * 20, 1, sender=payer)
    assert err.value.error == "ZeroAddress"
    with pytest.raises(ChainRevert) as err:
        d.staking.stake_for(owner, 0, sender=payer)
    assert err.value.error == "ZeroAmount"
    with pytest.raises(ChainRevert) as err:  # the allowance was used up
        d.staking.stake_for(owner, 1, sender=payer)
    assert err.value.error == "ERC20InsufficientAllowance"


def test_active_stake_at_a_past_block(env: Env) -> None:
    d, w = env.d, env.workers[3]
    d.token.approve(d.staking.address, 50 * SOGNI, sender=w)
    before = env.chain.block_number()
    staked_in = d.staking.stake(50 * SOGNI, sender=w).block_number
    d.staking.request_unstake(20 * SOGNI, sender=w)
    assert d.staking.active_stake(w) == 30 * SOGNI
    assert d.staking.active_stake(w, block=staked_in) == 50 * SOGNI
    assert d.staking.active_stake(w, block=before) == 0
