"""Closing epochs: payouts, cumulative trees, published files, claims, stake tiers, creators."""

from __future__ import annotations

from pathlib import Path

import pytest

from sogni_chain import ChainRevert
from sogni_coordinator.settlement.epochs import epoch_claims
from sogni_coordinator.store import Store
from sogni_protocol.epoch_files import content_hash, decode_batch, decode_epoch
from sogni_protocol.merkle import MerkleTree, verify
from sogni_protocol.payout_rules import SOGNI

from .settle_env import Net, rules, settler, signed_receipt, store_receipts, worker

SPARK = 43_200  # work units of one Spark: worth 1 SOGNI at the default rate
# default rules: tier-0 take 30%, creator share 5% (kept by the platform: no creator set)
WORKER_PER_SPARK = SOGNI * 65 // 100


def _claim_all(net: Net, record_claims: dict[str, object]) -> dict[str, int]:
    paid = {}
    for c in record_claims["claims"]:  # type: ignore[attr-defined]
        tx = net.d.distributor.claim(
            c["account"], int(c["cumulativeAmount"]), c["proof"], sender=net.treasury
        )
        paid[c["account"]] = int(tx.event("Claimed")["amount"])
    return paid


def test_close_posts_root_publishes_files_and_pays_claims(
    any_net: Net, store: Store, tmp_path: Path
) -> None:
    net = any_net
    a, b = worker(1), worker(2)
    store_receipts(
        store,
        [
            signed_receipt(a, net.domain, work_units=SPARK),
            signed_receipt(a, net.domain, work_units=2 * SPARK),
            signed_receipt(b, net.domain, work_units=SPARK),
        ],
    )
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None and result.epoch == 1 and result.posted and not result.resumed
    assert result.paid_receipts == 3 and result.refused_receipts == 0
    assert result.payouts == {a.address: 3 * WORKER_PER_SPARK, b.address: WORKER_PER_SPARK}
    assert result.total == 4 * WORKER_PER_SPARK

    dist = net.d.distributor
    assert dist.root_of(1) == result.root
    # the receipts file is content-addressed: its keccak is its name and the posted hash
    raw = result.receipts_file.read_bytes()
    assert content_hash(raw) == result.receipts_hash == dist.receipts_hash_of(1)
    assert result.receipts_file.name == "0x" + result.receipts_hash.hex() + ".json"
    batch = decode_batch(raw)
    assert batch.epoch == 1 and len(batch.receipts) == 3
    assert (batch.chain_id, batch.verifying_contract) == (
        net.domain.chain_id,
        net.d.addresses.distributor,
    )
    ef = decode_epoch(result.epoch_file.read_bytes())
    assert ef.root == "0x" + result.root.hex() and MerkleTree(ef.leaf_ints()).root == result.root
    tree_dump = result.epoch_file.with_name("epoch-000001.tree.json")
    assert tree_dump.is_file()

    claims = epoch_claims(store.epoch_record(1))  # type: ignore[arg-type]
    assert set(claims) >= {"epoch", "root", "receiptsHash", "claims"}
    for c in claims["claims"]:
        assert verify(result.root, (c["account"], int(c["cumulativeAmount"])), c["proof"])
    before = net.d.token.balance_of(a)
    assert _claim_all(net, claims) == result.payouts
    assert net.d.token.balance_of(a) - before == 3 * WORKER_PER_SPARK

    # second claim pays nothing (reverts at estimation: no gas spent on a no-op)
    c = claims["claims"][0]
    with pytest.raises(ChainRevert) as err:
        dist.claim(c["account"], int(c["cumulativeAmount"]), c["proof"], sender=net.treasury)
    assert err.value.error == "NothingToClaim"


def test_trees_are_cumulative_across_epochs(net: Net, store: Store, tmp_path: Path) -> None:
    a, b = worker(1), worker(2)
    s = settler(store, net, tmp_path)
    store_receipts(store, [signed_receipt(a, net.domain), signed_receipt(b, net.domain)])
    first = s.close_epoch()
    assert first is not None
    _claim_all(net, epoch_claims(store.epoch_record(1)))  # type: ignore[arg-type]

    store_receipts(store, [signed_receipt(a, net.domain, work_units=2 * SPARK)])
    second = s.close_epoch()
    assert second is not None and second.epoch == 2
    assert second.payouts == {a.address: 2 * WORKER_PER_SPARK}  # only this epoch's work
    claims = epoch_claims(store.epoch_record(2))  # type: ignore[arg-type]
    leaves = {c["account"]: int(c["cumulativeAmount"]) for c in claims["claims"]}
    assert leaves == {a.address: 3 * WORKER_PER_SPARK, b.address: WORKER_PER_SPARK}
    assert second.total == 4 * WORKER_PER_SPARK
    by = {c["account"]: c for c in claims["claims"]}
    tx = net.d.distributor.claim(
        a.address, leaves[a.address], by[a.address]["proof"], sender=net.treasury
    )
    assert tx.event("Claimed")["amount"] == 2 * WORKER_PER_SPARK  # the difference only
    with pytest.raises(ChainRevert) as err:  # b earned nothing new: nothing to claim
        net.d.distributor.claim(
            b.address, leaves[b.address], by[b.address]["proof"], sender=net.treasury
        )
    assert err.value.error == "NothingToClaim"


def test_skipped_epochs_claim_once_with_latest_proof(
    net: Net, store: Store, tmp_path: Path
) -> None:
    a = worker(1)
    s = settler(store, net, tmp_path)
    for _ in range(3):
        store_receipts(store, [signed_receipt(a, net.domain)])
        assert s.close_epoch() is not None
    claims = epoch_claims(store.epoch_record(3))  # type: ignore[arg-type]
    assert _claim_all(net, claims) == {a.address: 3 * WORKER_PER_SPARK}


def test_nothing_new_closes_nothing(net: Net, store: Store, tmp_path: Path) -> None:
    s = settler(store, net, tmp_path)
    assert s.close_epoch() is None
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    assert s.close_epoch() is not None
    assert s.close_epoch() is None  # closing twice posts one root
    assert [r["epoch"] for r in net.d.distributor.roots_posted()] == [1]


def test_stake_tier_lowers_take_rate(net: Net, store: Store, tmp_path: Path) -> None:
    staker, plain = worker(1), worker(2)
    net.chain.send_eth(staker.address, 10**18, sender=net.treasury)
    net.d.token.transfer(staker.address, 10_000 * SOGNI, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, 10_000 * SOGNI, sender=staker)
    net.d.staking.stake(10_000 * SOGNI, sender=staker)
    store_receipts(store, [signed_receipt(staker, net.domain), signed_receipt(plain, net.domain)])
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    # 10,000 SOGNI staked: tier 2 (20% take) instead of tier 0 (30%); creator 5% either way
    assert result.payouts == {staker.address: SOGNI * 75 // 100, plain.address: WORKER_PER_SPARK}
    takes = {e.worker: e.take_bps for e in decode_batch(result.receipts_file.read_bytes()).receipts}
    assert takes == {staker.address: 2000, plain.address: 3000}


def test_creator_share_is_a_leaf_of_its_own(net: Net, store: Store, tmp_path: Path) -> None:
    creator = worker(9)
    r = rules(model_creators={"sogni-tiny-sd": creator.address}, creator_share_bps=1000)
    store_receipts(store, [signed_receipt(worker(1), net.domain, work_units=10 * SPARK)])
    result = settler(store, net, tmp_path, rules=r).close_epoch()
    assert result is not None
    assert result.payouts == {worker(1).address: 6 * SOGNI, creator.address: 1 * SOGNI}
    # the platform's take (3 SOGNI) is not in the tree: total is what can be claimed
    assert result.total == 7 * SOGNI


def test_receipts_for_another_domain_are_refused_and_never_paid(
    net: Net, store: Store, tmp_path: Path
) -> None:
    a = worker(1)
    from sogni_protocol.eip712 import Domain

    other_chain = Domain(net.domain.chain_id + 1, net.domain.verifying_contract)
    other_distributor = Domain(net.domain.chain_id, "0x" + "11" * 20)
    good = signed_receipt(a, net.domain)
    store_receipts(
        store, [good, signed_receipt(a, other_chain), signed_receipt(a, other_distributor)]
    )
    s = settler(store, net, tmp_path)
    result = s.close_epoch()
    assert result is not None and result.paid_receipts == 1 and result.refused_receipts == 2
    assert result.payouts == {a.address: WORKER_PER_SPARK}
    batch = decode_batch(result.receipts_file.read_bytes())
    assert [e.job_id for e in batch.receipts] == ["0x" + good[0].job_id.hex()]
    assert len(batch.refused) == 2 and "chain" in batch.refused[0].reason
    assert store.unsettled_receipts() == []  # refused once, not reconsidered
    assert s.close_epoch() is None


def test_only_refused_receipts_make_no_epoch(net: Net, store: Store, tmp_path: Path) -> None:
    from sogni_protocol.eip712 import Domain

    bad = signed_receipt(worker(1), Domain(1, net.domain.verifying_contract))
    store_receipts(store, [bad])
    assert settler(store, net, tmp_path).close_epoch() is None
    settled = store.receipt_settlement(bad[0].job_id)
    assert settled is not None and settled[:2] == (None, "refused") and "chain" in settled[2]
    assert net.d.distributor.roots_posted() == []
