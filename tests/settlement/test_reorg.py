"""A chain reorganisation that drops a posted root: the next close posts it again from its
stored plan (same root, same published files), then goes on; stakes are read
`confirmations` blocks behind the head, so a recent stake does not move an epoch's tier.

The reorganisation is the chain's own: a snapshot taken before the post and reverted after
it drops the block that carried `postRoot` (py-evm's and anvil's `evm_revert`), as a reorg
that nobody re-mines would.
"""

from __future__ import annotations

from pathlib import Path

from sogni_coordinator.store import Store
from sogni_protocol.epoch_files import decode_batch
from sogni_protocol.payout_rules import SOGNI, SettlementConfig

from .settle_env import Net, posted_epochs, settler, signed_receipt, store_receipts, worker


def test_a_dropped_post_is_posted_again_before_the_next_epoch(
    any_net: Net, store: Store, tmp_path: Path
) -> None:
    net = any_net
    store_receipts(store, [signed_receipt(worker(1), net.domain) for _ in range(2)])
    before = net.chain.snapshot()
    s = settler(store, net, tmp_path)
    first = s.close_epoch()
    assert first is not None and first.epoch == 1 and net.d.distributor.latest_epoch() == 1
    published = first.epoch_file.read_bytes()
    net.chain.revert(before)  # the block with postRoot is gone
    assert net.d.distributor.latest_epoch() == 0

    store_receipts(store, [signed_receipt(worker(2), net.domain)])
    again = s.close_epoch()
    assert again is not None and again.epoch == 1 and again.resumed and again.posted
    assert again.root == first.root and again.paid_receipts == 2
    assert net.d.distributor.root_of(1) == first.root
    assert again.epoch_file.read_bytes() == published  # what nodes fetched still holds
    nxt = s.close_epoch()  # without the repost: epoch 2 refused (EpochNotNext) at every close
    assert nxt is not None and nxt.epoch == 2 and nxt.paid_receipts == 1
    assert s.close_epoch() is None
    assert posted_epochs(net) == [1, 2]


def test_two_dropped_posts_are_posted_again_in_order(
    net: Net, store: Store, tmp_path: Path
) -> None:
    before = net.chain.snapshot()
    s = settler(store, net, tmp_path)
    roots = []
    for i in (1, 2):
        store_receipts(store, [signed_receipt(worker(i), net.domain)])
        result = s.close_epoch()
        assert result is not None and result.epoch == i
        roots.append(result.root)
    net.chain.revert(before)
    reposted = [s.close_epoch(), s.close_epoch()]
    assert [(r.epoch, r.root) for r in reposted if r is not None] == [(1, roots[0]), (2, roots[1])]
    assert s.close_epoch() is None and posted_epochs(net) == [1, 2]


def test_a_dropped_post_with_an_offline_key_writes_its_transaction_again(
    net: Net, store: Store, tmp_path: Path
) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    before = net.chain.snapshot()
    posted = settler(store, net, tmp_path).close_epoch()
    assert posted is not None and posted.posted
    net.chain.revert(before)
    offline = settler(store, net, tmp_path, sender=net.settler.address)
    result = offline.close_epoch()
    assert result is not None and result.epoch == 1 and not result.posted
    assert result.unsigned_tx is not None and result.root == posted.root
    record = store.epoch_record(1)
    assert record is not None and record.state == "planned"  # `epoch submit` finishes it


def test_stakes_are_read_confirmations_behind_the_head(
    net: Net, store: Store, tmp_path: Path
) -> None:
    staker = worker(1)
    net.chain.send_eth(staker.address, 10**18, sender=net.treasury)
    net.d.token.transfer(staker.address, 10_000 * SOGNI, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, 10_000 * SOGNI, sender=staker)
    net.d.staking.stake(10_000 * SOGNI, sender=staker)  # the newest block: not yet final
    store_receipts(store, [signed_receipt(staker, net.domain)])
    head = net.chain.block_number()
    result = settler(store, net, tmp_path, confirmations=3).close_epoch()
    assert result is not None
    batch = decode_batch(result.receipts_file.read_bytes())
    assert batch.stake_block == head - 3
    assert [e.take_bps for e in batch.receipts] == [3000]  # tier 0: the stake is too recent


def test_confirmations_default_by_network() -> None:
    assert SettlementConfig().confirmations_on(local=True) == 0
    assert SettlementConfig().confirmations_on(local=False) == 64
    assert SettlementConfig(confirmations=5).confirmations_on(local=False) == 5
