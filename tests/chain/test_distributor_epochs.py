"""RewardDistributor epoch rules: numbering, totals, growth cap, claim delay, matured roots,
and an unsigned postRoot for an offline settlement key."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_hash.auto import keccak

from sogni_chain import ChainRevert
from sogni_chain.deploy import DEV_CLAIM_DELAY, DEV_MAX_TOTAL_GROWTH, deploy_defaults
from sogni_protocol.merkle import MerkleTree

from .chain_env import DISTRIBUTOR_FUNDING, SOGNI, Env

HOUR = 3600
DAY = 24 * HOUR
SLACK = 10  # the embedded chain's time travel can land a second or two short
RECEIPTS = keccak(b"receipts")


def _tree(env: Env, amounts: list[int]) -> MerkleTree:
    return MerkleTree([(w.address, a) for w, a in zip(env.workers, amounts, strict=False)])


def _post(env: Env, epoch: int, tree: MerkleTree, total: int | None = None) -> None:
    total = sum(amount for _, amount in tree.leaves()) if total is None else total
    env.d.distributor.post_root(epoch, tree.root, total, RECEIPTS, sender=env.coordinator)


def test_dev_defaults_and_live_defaults(env: Env) -> None:
    dist = env.d.distributor
    assert dist.claim_delay() == DEV_CLAIM_DELAY == 0
    assert dist.max_total_growth() == DEV_MAX_TOTAL_GROWTH == 10**9 * SOGNI
    live = deploy_defaults(1)  # mainnet, or any chain that is not a local dev chain
    assert live["claim_delay"] == DAY
    assert live["admin_transfer_delay"] > 0
    assert deploy_defaults(31337)["claim_delay"] == 0


def test_epochs_are_consecutive_from_one(env: Env) -> None:
    dist, tree = env.d.distributor, _tree(env, [5])
    for bad, expected in ((2, 1), (0, 1)):
        with pytest.raises(ChainRevert) as err:
            _post(env, bad, tree)
        assert err.value.error == "EpochNotNext"
        assert err.value.args_by_name == {"epoch": bad, "expected": expected}
        assert "the next epoch is 1" in str(err.value)  # the friendly line
    _post(env, 1, tree)
    with pytest.raises(ChainRevert) as err:  # a jump
        _post(env, 3, tree)
    assert err.value.args_by_name == {"epoch": 3, "expected": 2}
    with pytest.raises(ChainRevert) as err:  # the past
        _post(env, 1, tree)
    assert err.value.error == "RootAlreadyPosted"
    _post(env, 2, tree)
    assert dist.latest_epoch() == 2


def test_a_root_never_lowers_the_total_and_growth_is_capped(env: Env) -> None:
    dist, admin = env.d.distributor, env.treasury
    _post(env, 1, _tree(env, [100, 50]))
    assert dist.total_of(1) == 150
    with pytest.raises(ChainRevert) as err:
        _post(env, 2, _tree(env, [100, 49]))
    assert err.value.error == "TotalDecreased"
    assert err.value.args_by_name == {"total": 149, "previous": 150}
    _post(env, 2, _tree(env, [100, 50]))  # equal is fine (an epoch with no new work)

    tx = dist.set_max_total_growth(1_000, sender=admin)
    assert tx.event("MaxTotalGrowthSet") == {"maxTotalGrowth": 1_000}
    assert dist.max_total_growth() == 1_000
    with pytest.raises(ChainRevert) as err:
        _post(env, 3, _tree(env, [1_100, 51]))
    assert err.value.error == "GrowthCapExceeded"
    assert err.value.args_by_name == {"growth": 1_001, "cap": 1_000}
    _post(env, 3, _tree(env, [1_100, 50]))  # exactly the cap
    assert dist.total_of(3) == 1_150

    with pytest.raises(ChainRevert) as err:  # only the admin sets it, not settlement
        dist.set_max_total_growth(10**30, sender=env.coordinator)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    # the cap never lets a root through that the balance does not cover
    dist.set_max_total_growth(10**30, sender=admin)
    with pytest.raises(ChainRevert) as err:
        _post(env, 4, _tree(env, [DISTRIBUTOR_FUNDING + 1]))
    assert err.value.error == "Underfunded"


def test_claims_wait_for_the_delay(env: Env) -> None:
    dist, a = env.d.distributor, env.workers[0]
    tx = dist.set_claim_delay(DAY, sender=env.treasury)
    assert tx.event("ClaimDelaySet") == {"claimDelay": DAY}
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, 1, [], sender=a)
    assert err.value.error == "NoRoot"
    assert dist.matured_epoch() == 0 and dist.claimable_root() is None

    tree = _tree(env, [70])
    _post(env, 1, tree)
    posted = dist.posted_at(1)
    assert posted > 0 and dist.matures_at(1) == posted + DAY
    assert dist.matured_epoch() == 0 and dist.claimable_root() is None
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, *tree.proof_for(a.address), sender=a)
    assert err.value.error == "NotMatured"
    assert err.value.args_by_name == {"opensAt": posted + DAY}
    assert "claims open at" in str(err.value)

    env.chain.advance_time(DAY - HOUR)
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, *tree.proof_for(a.address), sender=a)
    assert err.value.error == "NotMatured"
    env.chain.advance_time(HOUR + SLACK)
    assert dist.matured_epoch() == 1 and dist.claimable_root() == tree.root
    assert dist.claim(a, *tree.proof_for(a.address), sender=a).event("Claimed")["epoch"] == 1

    with pytest.raises(ChainRevert) as err:  # capped, so a typo cannot lock claims for years
        dist.set_claim_delay(365 * DAY, sender=env.treasury)
    assert err.value.error == "ClaimDelayTooLong"
    with pytest.raises(ChainRevert) as err:
        dist.set_claim_delay(0, sender=env.coordinator)
    assert err.value.error == "AccessControlUnauthorizedAccount"


def test_posting_faster_than_the_delay_never_locks_claims(env: Env) -> None:
    """Three epochs, each posted 8 hours after the last with a one-day delay: claims keep
    working against the newest root that has matured, and move on as each one matures."""
    dist, token = env.d.distributor, env.d.token
    a, b = env.workers[0], env.workers[1]
    dist.set_claim_delay(DAY, sender=env.treasury)
    trees = [_tree(env, [10 * k, 3 * k]) for k in (1, 2, 3, 4)]
    _post(env, 1, trees[0])
    env.chain.advance_time(DAY + SLACK)  # epoch 1 matured
    for epoch in (2, 3, 4):
        _post(env, epoch, trees[epoch - 1])
        assert dist.latest_epoch() == epoch and dist.matured_epoch() == 1
        env.chain.advance_time(8 * HOUR)
    env.chain.advance_time(SLACK)  # epoch 2 was posted 24 h ago, give or take a second
    assert dist.matured_epoch() == 2 and dist.claimable_root() == trees[1].root

    # a proof against the latest (not yet matured) root is refused
    with pytest.raises(ChainRevert) as err:
        dist.claim(a, *trees[3].proof_for(a.address), sender=a)
    assert err.value.error == "InvalidProof"
    tx = dist.claim(a, *trees[1].proof_for(a.address), sender=a)
    assert tx.event("Claimed") == {
        "account": a.address,
        "epoch": 2,
        "amount": 20,
        "cumulativeAmount": 20,
    }

    env.chain.advance_time(8 * HOUR + SLACK)  # epoch 3 matures
    assert dist.matured_epoch() == 3
    assert dist.claim(a, *trees[2].proof_for(a.address), sender=a).event("Claimed")["amount"] == 10
    dist.claim(b, *trees[2].proof_for(b.address), sender=env.relayer)
    assert token.balance_of(b) - dist.claimed(b) == 10_000 * SOGNI  # paid to b, not the relayer

    env.chain.advance_time(DAY)  # everything matured: the latest root is the claimable one
    assert dist.matured_epoch() == dist.latest_epoch() == 4
    assert dist.claim(a, *trees[3].proof_for(a.address), sender=a).event("Claimed")["epoch"] == 4
    assert dist.claimed(a) == 40


def test_many_maturing_epochs_are_searched_cheaply(env: Env) -> None:
    dist, a = env.d.distributor, env.workers[0]
    tree = _tree(env, [9])
    _post(env, 1, tree)
    dist.set_claim_delay(DAY, sender=env.treasury)
    env.chain.advance_time(DAY + SLACK)
    for epoch in range(2, 12):  # ten roots waiting to mature
        _post(env, epoch, tree)
    assert dist.matured_epoch() == 1
    tx = dist.claim(a, *tree.proof_for(a.address), sender=a)
    assert tx.event("Claimed")["epoch"] == 1
    assert tx.gas_used < 110_000  # a binary search: a few reads, not one per epoch


@pytest.mark.parametrize("env", ["embedded"], indirect=True)  # mines one second per block
def test_a_root_matures_exactly_at_posted_plus_delay(env: Env) -> None:
    """``postedAt + claimDelay <= now`` is matured, one second less is not (on the searched
    path too: a newer root is waiting)."""
    dist, chain = env.d.distributor, env.chain
    dist.set_claim_delay(DAY, sender=env.treasury)
    tree = _tree(env, [3])
    _post(env, 1, tree)
    opens = dist.posted_at(1) + DAY
    chain.advance_time(HOUR)
    _post(env, 2, _tree(env, [4]))
    chain.advance_time(DAY - 2 * HOUR)
    chain.advance_time(opens - 3 - chain.timestamp())  # a few seconds before
    seen = set()
    for _ in range(10):  # one block (about a second) at a time across the boundary
        now = chain.timestamp()
        matured = dist.matured_epoch()
        assert matured == (1 if now >= opens else 0), (now, opens)
        seen.add(now - opens)
        if now > opens:
            break
        chain.mine()
    assert {-1, 0} <= seen  # both sides of the boundary were checked to the second


def test_lowering_the_delay_matures_roots_at_once(env: Env) -> None:
    dist, a = env.d.distributor, env.workers[0]
    dist.set_claim_delay(7 * DAY, sender=env.treasury)
    tree = _tree(env, [5])
    _post(env, 1, tree)
    assert dist.matured_epoch() == 0
    dist.set_claim_delay(0, sender=env.treasury)
    assert dist.matured_epoch() == 1
    dist.claim(a, *tree.proof_for(a.address), sender=a)


def test_a_root_that_moves_earnings_between_accounts_cannot_pay_beyond_its_total(env: Env) -> None:
    """The contract cannot see leaves, only totals: a (buggy or hostile) root that takes 100
    from a and gives it to b keeps the total, so it is accepted, but claims stop at its total."""
    dist = env.d.distributor
    a, b = env.workers[0], env.workers[1]
    first = _tree(env, [100, 0])
    _post(env, 1, first)
    dist.claim(a, *first.proof_for(a.address), sender=a)
    moved = _tree(env, [0, 100])
    _post(env, 2, moved)  # same total: allowed
    with pytest.raises(ChainRevert) as err:
        dist.claim(b, *moved.proof_for(b.address), sender=b)
    assert err.value.error == "ClaimExceedsRootTotal"
    assert err.value.args_by_name == {"totalClaimedAfter": 200, "rootTotal": 100}
    assert dist.total_claimed() == 100 <= dist.total_of(dist.latest_epoch())


def test_offline_settlement_key_posts_through_an_unsigned_transaction(env: Env) -> None:
    """The settlement key never touches the node: the online side builds the unsigned
    transaction, the offline side signs it, the online side broadcasts the raw bytes."""
    dist, chain = env.d.distributor, env.chain
    offline = Account.create()  # its key is never given to the Chain
    dist.grant_role("SETTLEMENT_ROLE", offline.address, sender=env.treasury)
    chain.send_eth(offline.address, 10**18, sender=env.treasury)
    tree = _tree(env, [11, 22])

    unsigned = dist.build_post_root(1, tree.root, 33, RECEIPTS, sender=offline.address)
    assert set(unsigned) >= {"to", "data", "chainId", "nonce", "gas", "maxFeePerGas"}
    assert unsigned["to"] == dist.address and unsigned["chainId"] == chain.chain_id
    assert unsigned["nonce"] == 0
    signed = Account.sign_transaction(unsigned, offline.key)  # on the offline machine
    tx = chain.send_raw(signed.raw_transaction)
    assert tx.event("RootPosted")["epoch"] == 1
    assert dist.root_of(1) == tree.root

    # a refused root fails while building, before anything is signed
    with pytest.raises(ChainRevert) as err:
        dist.build_post_root(5, tree.root, 33, RECEIPTS, sender=offline.address)
    assert err.value.error == "EpochNotNext"
    # a signed transaction that fails on chain is explained too
    bad = dist.build_post_root(2, tree.root, 33, RECEIPTS, sender=offline.address)
    dist.post_root(2, tree.root, 33, RECEIPTS, sender=env.coordinator)  # someone got there first
    with pytest.raises(ChainRevert) as err:
        chain.send_raw(Account.sign_transaction(bad, offline.key).raw_transaction)
    assert err.value.error == "RootAlreadyPosted"
