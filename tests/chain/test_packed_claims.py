"""The distributor's claimed amounts live in SogniToken, in the same slot as the account's
balance (issue 16: a first claim creates one storage slot, not two). These tests try to cheat
that layout: claim twice, claim for someone else, write the claimed half without being the
bound distributor, rebind the token, overflow either half, and move tokens into and out of a
packed slot; and they check that a replacement distributor inherits the counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from sogni_chain import ChainRevert, Distributor, Token
from sogni_protocol.merkle import MerkleTree

from .chain_env import SOGNI, Env

U128 = 2**128


def _refused(call: Callable[[], Any], error: str) -> dict[str, Any]:
    with pytest.raises(ChainRevert) as err:
        call()
    assert err.value.error == error, err.value.reason
    return err.value.args_by_name


def _post(dist: Distributor, env: Env, epoch: int, leaves: list[tuple[str, int]]) -> MerkleTree:
    tree = MerkleTree(leaves)
    dist.post_root(epoch, tree.root, sum(v for _, v in leaves), keccak(b"p%d" % epoch),
                   sender=env.coordinator)  # fmt: skip
    return tree


def _fresh_token(env: Env, binder: Any) -> Token:
    """A SogniToken deployed by ``binder`` (its whole supply to the treasury), not bound."""
    tx = env.chain.deploy("SogniToken", env.treasury.address, sender=binder)
    assert tx.contract_address
    return Token(env.chain, tx.contract_address, env.treasury)


def test_deploy_binds_the_distributor_once(env: Env) -> None:
    token, dist = env.d.token, env.d.distributor
    assert token.distributor() == dist.address
    # the deployer (treasury) bound it; neither it nor anyone else may rebind now
    for who in (env.treasury, env.relayer, env.workers[0]):

        def rebind(w: LocalAccount = who) -> Any:
            return token.set_distributor(w, sender=w)

        assert _refused(rebind, "NotDistributor")["caller"] == who.address
    # before binding, only the deployer may bind (a front-runner cannot)
    fresh = _fresh_token(env, env.workers[0])
    assert fresh.distributor() == "0x" + "00" * 20
    _refused(lambda: fresh.set_distributor(env.relayer, sender=env.relayer), "NotDistributor")
    _refused(lambda: fresh.set_distributor("0x" + "00" * 20, sender=env.workers[0]),
             "ZeroAddress")  # fmt: skip
    fresh.set_distributor(env.workers[1], sender=env.workers[0])
    _refused(lambda: fresh.set_distributor(env.workers[0], sender=env.workers[0]),
             "NotDistributor")  # fmt: skip


def test_claims_book_into_the_balance_slot_once(env: Env) -> None:
    token, dist, relayer = env.d.token, env.d.distributor, env.relayer
    fresh = "0x" + keccak(b"never held sogni")[:20].hex()
    a = env.workers[0].address
    tree = _post(dist, env, 1, [(a, 5 * SOGNI), (fresh, 3 * SOGNI)])
    before_a, before_relayer = token.balance_of(a), token.balance_of(relayer)
    supply = token.total_supply()

    # a relayer claims for `fresh`: the tokens go to `fresh`, never to the submitter
    tx = dist.claim(fresh, *tree.proof_for(fresh), sender=relayer)
    assert tx.event("Claimed")["amount"] == 3 * SOGNI
    assert token.balance_of(fresh) == 3 * SOGNI and token.claimed_of(fresh) == 3 * SOGNI
    assert token.balance_of(relayer) == before_relayer
    # claiming fresh's leaf for another account, or twice, is refused; nothing moves
    _refused(lambda: dist.claim(a, *tree.proof_for(fresh), sender=relayer), "InvalidProof")
    args = _refused(lambda: dist.claim(fresh, *tree.proof_for(fresh), sender=relayer),
                    "NothingToClaim")  # fmt: skip
    assert args["alreadyClaimed"] == 3 * SOGNI
    dist.claim(a, *tree.proof_for(a), sender=relayer)
    _refused(lambda: dist.claim(a, *tree.proof_for(a), sender=env.workers[0]), "NothingToClaim")
    assert token.balance_of(a) - before_a == 5 * SOGNI
    assert dist.claimed(a) == token.claimed_of(a) == 5 * SOGNI
    assert dist.total_claimed() == 8 * SOGNI and token.total_supply() == supply

    # the next epoch pays only the increment, to the same packed slot
    t2 = _post(dist, env, 2, [(a, 9 * SOGNI), (fresh, 3 * SOGNI)])
    assert dist.claim(a, *t2.proof_for(a), sender=relayer).event("Claimed")["amount"] == 4 * SOGNI
    _refused(lambda: dist.claim(fresh, *t2.proof_for(fresh), sender=relayer), "NothingToClaim")
    assert token.claimed_of(a) == 9 * SOGNI and token.balance_of(a) - before_a == 9 * SOGNI


def test_only_the_bound_distributor_writes_the_claimed_half(env: Env) -> None:
    token, dist = env.d.token, env.d.distributor
    a = env.workers[0].address
    tree = _post(dist, env, 1, [(a, 5 * SOGNI), (env.workers[1].address, 1 * SOGNI)])
    for who in (env.treasury, env.coordinator, env.workers[0], env.relayer):
        for pay in (True, False):

            def book(w: LocalAccount = who, p: bool = pay) -> Any:
                return token._send("bookClaim", a, 5 * SOGNI, p, sender=w)

            assert _refused(book, "NotDistributor")["caller"] == who.address
    assert token.claimed_of(a) == 0
    # the claim still pays in full: nothing was booked by the attempts
    tx = dist.claim(a, *tree.proof_for(a), sender=env.relayer)
    assert tx.event("Claimed")["amount"] == 5 * SOGNI


def test_packed_halves_at_their_limits(env: Env) -> None:
    """A token bound to a plain account (a stand-in distributor): the claimed half holds up to
    2^128 - 1 and refuses more, only grows, and never counts as balance; the balance half
    takes the whole supply next to a full claimed half."""
    book, holder, other = env.workers[0], env.workers[1].address, env.workers[2].address
    token = _fresh_token(env, env.workers[0])
    token.set_distributor(book, sender=book)
    supply = token.total_supply()

    args = _refused(lambda: token._send("bookClaim", holder, U128, False, sender=book),
                    "ClaimedOverflow")  # fmt: skip
    assert args["cumulativeAmount"] == U128
    token._send("bookClaim", holder, U128 - 1, False, sender=book)
    assert token.claimed_of(holder) == U128 - 1 and token.balance_of(holder) == 0
    # lower or equal: no change (the distributor turns that into NothingToClaim)
    token._send("bookClaim", holder, 7, False, sender=book)
    assert token.claimed_of(holder) == U128 - 1
    # paying moves the stand-in's own tokens only: it holds none
    _refused(lambda: token._send("bookClaim", other, 1, True, sender=book),
             "ERC20InsufficientBalance")  # fmt: skip
    assert token.claimed_of(other) == 0

    # the whole supply into the packed slot: both halves intact
    token.transfer(holder, supply, sender=env.treasury)
    assert token.balance_of(holder) == supply and token.claimed_of(holder) == U128 - 1
    assert token.balance_of(env.treasury) == 0 and token.total_supply() == supply
    # the claimed half is not spendable: one wei past the balance is refused
    args = _refused(lambda: token.transfer(other, supply + 1, sender=holder),
                    "ERC20InsufficientBalance")  # fmt: skip
    assert args["balance"] == supply
    token.transfer(other, supply, sender=holder)
    assert token.balance_of(holder) == 0 and token.claimed_of(holder) == U128 - 1
    assert token.balance_of(other) == supply and token.claimed_of(other) == 0


def test_transfers_into_and_out_of_a_packed_slot(env: Env) -> None:
    token, dist = env.d.token, env.d.distributor
    a, b = env.workers[0], env.workers[1]
    tree = _post(dist, env, 1, [(a.address, 5 * SOGNI), (b.address, 2 * SOGNI)])
    dist.claim(a.address, *tree.proof_for(a.address), sender=env.relayer)
    bal_a, bal_b = token.balance_of(a), token.balance_of(b)

    token.transfer(b, 1 * SOGNI, sender=a)  # out of a's packed slot
    token.transfer(a, 3 * SOGNI, sender=b)  # into it
    token.approve(env.relayer, 2 * SOGNI, sender=a)
    token._send("transferFrom", a.address, env.relayer.address, 2 * SOGNI, sender=env.relayer)
    assert token.balance_of(a) == bal_a - 1 * SOGNI + 3 * SOGNI - 2 * SOGNI
    assert token.balance_of(b) == bal_b + 1 * SOGNI - 3 * SOGNI
    assert token.claimed_of(a) == 5 * SOGNI and token.claimed_of(b) == 0
    # emptying the balance keeps the claimed half: the leaf still cannot be claimed again
    token.transfer(b, token.balance_of(a), sender=a)
    assert token.balance_of(a) == 0 and token.claimed_of(a) == 5 * SOGNI
    _refused(lambda: dist.claim(a.address, *tree.proof_for(a.address), sender=a),
             "NothingToClaim")  # fmt: skip
    # b's own claim after transfers into its slot pays exactly its leaf
    before = token.balance_of(b)
    dist.claim(b.address, *tree.proof_for(b.address), sender=b)
    assert token.balance_of(b) - before == 2 * SOGNI and token.claimed_of(b) == 2 * SOGNI


def test_claim_and_stake_books_the_claimed_half(env: Env) -> None:
    token, dist, staking = env.d.token, env.d.distributor, env.d.staking
    a = env.workers[0]
    tree = _post(dist, env, 1, [(a.address, 10 * SOGNI), (env.workers[1].address, 1 * SOGNI)])
    deadline = env.chain.w3.eth.get_block("latest")["timestamp"] + 3600
    signature = dist.sign_stake_authorization(a, 10 * SOGNI, 2_500, deadline)
    before, staked_before = token.balance_of(a), staking.active_stake(a)
    amount, proof = tree.proof_for(a.address)
    tx = dist.claim_and_stake(a.address, amount, proof, 2_500, deadline, signature,
                              sender=env.relayer)  # fmt: skip
    assert tx.event("AutoStaked")["staked"] == 25 * SOGNI // 10
    assert token.balance_of(a) - before == 75 * SOGNI // 10
    assert staking.active_stake(a) - staked_before == 25 * SOGNI // 10
    assert token.claimed_of(a) == 10 * SOGNI
    _refused(lambda: dist.claim_and_stake(a.address, amount, proof, 2_500, deadline, signature,
                                          sender=env.relayer), "NothingToClaim")  # fmt: skip
    _refused(lambda: dist.claim(a.address, amount, proof, sender=a), "NothingToClaim")


def test_a_root_with_an_oversized_leaf_pays_nothing(env: Env) -> None:
    """The contract cannot see leaves: a root whose leaf is past 2^128 is accepted (its total
    is small), but the claim is refused before anything moves."""
    token, dist = env.d.token, env.d.distributor
    a, b = env.workers[0].address, env.workers[1].address
    tree = MerkleTree([(a, U128), (b, 1 * SOGNI)])
    dist.post_root(1, tree.root, 2 * SOGNI, keccak(b"big"), sender=env.coordinator)
    before = token.balance_of(a)
    _refused(lambda: dist.claim(a, *tree.proof_for(a), sender=env.relayer), "ClaimedOverflow")
    assert token.balance_of(a) == before and token.claimed_of(a) == 0
    assert dist.claim(b, *tree.proof_for(b), sender=env.relayer).event("Claimed")["amount"] == SOGNI


def test_a_leaf_for_the_zero_address_burns_nothing(env: Env) -> None:
    """Paying goes through ERC-20 `_transfer`: a leaf for address 0 is refused, not burnt."""
    token, dist = env.d.token, env.d.distributor
    zero, b = "0x" + "00" * 20, env.workers[1].address
    tree = _post(dist, env, 1, [(zero, 1 * SOGNI), (b, 1 * SOGNI)])
    supply = token.total_supply()
    _refused(lambda: dist.claim(zero, *tree.proof_for(zero), sender=env.relayer),
             "ERC20InvalidReceiver")  # fmt: skip
    assert token.total_supply() == supply and token.claimed_of(zero) == 0


def test_a_replacement_distributor_inherits_the_counters(env: Env) -> None:
    token, old, gov = env.d.token, env.d.distributor, env.treasury
    a, b = env.workers[0].address, env.workers[1].address
    t1 = _post(old, env, 1, [(a, 5 * SOGNI), (b, 2 * SOGNI)])
    old.claim(a, *t1.proof_for(a), sender=env.relayer)

    tx = env.chain.deploy("RewardDistributor", token.address, env.d.staking.address,
                          gov.address, env.coordinator.address, 0, 0, 10**9 * SOGNI,
                          sender=gov)  # fmt: skip
    assert tx.contract_address
    new = Distributor(env.chain, tx.contract_address, gov)
    token.transfer(new.address, 100 * SOGNI, sender=gov)
    # only the old distributor's governance hands over; the token's deployer cannot
    _refused(lambda: old.hand_over_claims(new.address, sender=env.relayer),
             "AccessControlUnauthorizedAccount")  # fmt: skip
    _refused(lambda: token.set_distributor(new.address, sender=gov), "NotDistributor")
    # a typo (an account without code, or a contract of another kind) is refused
    for wrong in (env.relayer.address, token.address, env.d.staking.address):

        def hand_over(w: str = wrong) -> Any:
            return old.hand_over_claims(w, sender=gov)

        assert _refused(hand_over, "InvalidSuccessor")["next"] == wrong
    t_new = _post(new, env, 1, [(a, 6 * SOGNI), (b, 2 * SOGNI)])
    _refused(lambda: new.claim(b, *t_new.proof_for(b), sender=env.relayer), "NotDistributor")

    old.hand_over_claims(new.address, sender=gov)
    assert token.distributor() == new.address
    # the old one can no longer pay nor hand over again
    args = _refused(lambda: old.claim(b, *t1.proof_for(b), sender=env.relayer), "NotDistributor")
    assert args["caller"] == old.address
    _refused(lambda: old.hand_over_claims(new.address, sender=gov), "NotDistributor")
    # the new one continues the same cumulative tree: a is paid only its increment
    assert new.claimed(a) == old.claimed(a) == 5 * SOGNI
    assert new.claim(a, *t_new.proof_for(a), sender=env.relayer).event("Claimed")["amount"] == SOGNI
    assert new.claim(b, *t_new.proof_for(b), sender=env.relayer).event("Claimed")["amount"] == (
        2 * SOGNI
    )
