"""Closing is idempotent: crashes anywhere, restarts and racing closers post one root per epoch
and pay every receipt once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sogni_coordinator.settlement.epochs import EpochConflict, SettlementError
from sogni_coordinator.store import Store
from sogni_protocol.epoch_files import decode_epoch

from .settle_env import Net, posted_epochs, rules, settler, signed_receipt, store_receipts, worker


class Crash(Exception):
    """Stands in for the process dying at a chosen point."""


def test_crash_between_persisting_plan_and_posting(
    any_net: Net, store: Store, tmp_path: Path
) -> None:
    net = any_net
    store_receipts(store, [signed_receipt(worker(1), net.domain) for _ in range(3)])
    planned = settler(store, net, tmp_path).plan_epoch()  # ... and the process dies here
    assert planned is not None and planned.state == "planned"
    assert net.d.distributor.root_of(1) is None
    store.close()

    restarted = Store(tmp_path / "coordinator.db")
    try:
        # new receipts arrived meanwhile: they wait for the next epoch, the plan is not redone
        store_receipts(restarted, [signed_receipt(worker(2), net.domain)])
        s = settler(restarted, net, tmp_path)
        result = s.close_epoch()
        assert result is not None and result.resumed and result.epoch == 1
        assert result.root == planned.root and result.paid_receipts == 3
        assert net.d.distributor.root_of(1) == planned.root
        nxt = s.close_epoch()
        assert nxt is not None and nxt.epoch == 2 and nxt.paid_receipts == 1
        assert s.close_epoch() is None
        assert posted_epochs(net) == [1, 2]
    finally:
        restarted.close()


def test_crash_after_posting_before_recording(
    any_net: Net, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = any_net
    store_receipts(store, [signed_receipt(worker(1), net.domain)])

    def die(*_args: object, **_kw: object) -> None:
        raise Crash

    monkeypatch.setattr(store, "mark_epoch_posted", die)
    with pytest.raises(Crash):
        settler(store, net, tmp_path).close_epoch()
    monkeypatch.undo()
    record = store.epoch_record(1)
    assert record is not None and record.state == "planned"  # DB does not know it was posted
    assert posted_epochs(net) == [1]

    result = settler(store, net, tmp_path).close_epoch()  # restart: the chain has our root
    assert result is not None and result.resumed and result.root == record.root
    assert posted_epochs(net) == [1]  # not posted again
    assert store.epoch_record(1).state == "posted"  # type: ignore[union-attr]


def test_crash_before_the_plan_commits_leaves_no_trace(
    net: Net, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain) for _ in range(2)])

    def die(*_args: object, **_kw: object) -> None:
        raise Crash

    monkeypatch.setattr(store, "save_epoch_plan", die)
    with pytest.raises(Crash):
        settler(store, net, tmp_path).close_epoch()
    monkeypatch.undo()
    assert store.last_epoch_record() is None and len(store.unsettled_receipts()) == 2
    orphan = sorted((tmp_path / "epochs" / "receipts").iterdir())

    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None and result.epoch == 1 and result.paid_receipts == 2
    # the batch is deterministic: the orphaned file of the crashed attempt is the same file
    assert sorted((tmp_path / "epochs" / "receipts").iterdir()) == orphan
    assert posted_epochs(net) == [1]


def test_epoch_file_rewritten_if_lost_after_commit(net: Net, store: Store, tmp_path: Path) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    s = settler(store, net, tmp_path)
    planned = s.plan_epoch()
    assert planned is not None
    for f in (tmp_path / "epochs").glob("epoch-*"):
        f.unlink()  # crash right after the commit, before the files were written
    result = s.close_epoch()
    assert result is not None and result.epoch_file.read_bytes() == planned.plan
    assert (tmp_path / "epochs" / "epoch-000001.tree.json").is_file()


def test_racing_closers_share_one_plan(net: Net, tmp_path: Path) -> None:
    first, second = Store(tmp_path / "coordinator.db"), Store(tmp_path / "coordinator.db")
    try:
        store_receipts(first, [signed_receipt(worker(1), net.domain)])
        a, b = settler(first, net, tmp_path), settler(second, net, tmp_path)
        plan_a = a.plan_epoch()
        plan_b = b.plan_epoch()  # sees the pending plan instead of making another
        assert plan_a is not None and plan_b is not None and plan_a.root == plan_b.root
        ra, rb = a.close_epoch(), b.close_epoch()
        assert ra is not None and ra.epoch == 1 and rb is None
        assert posted_epochs(net) == [1]
    finally:
        first.close()
        second.close()


def test_losing_the_commit_race_is_a_conflict_not_a_double_payment(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = Store(tmp_path / "coordinator.db"), Store(tmp_path / "coordinator.db")
    try:
        store_receipts(first, [signed_receipt(worker(1), net.domain)])
        b = settler(second, net, tmp_path)
        # b read the receipts and found no pending plan just before a committed its plan
        seen = second.unsettled_receipts()
        real = second.last_epoch_record
        monkeypatch.setattr(
            second, "unsettled_receipts", lambda stored_before=None, limit=None: seen
        )
        monkeypatch.setattr(
            second,
            "last_epoch_record",
            lambda state=None: None if state == "planned" else real(state=state),
        )
        planned = settler(first, net, tmp_path).plan_epoch()
        assert planned is not None
        with pytest.raises(EpochConflict, match="another closer"):
            b.plan_epoch()  # would be epoch 2 with the same receipt: refused by the database
        monkeypatch.undo()
        assert first.epoch_summaries() == [(1, "planned", planned.total, 1, 0)]
    finally:
        first.close()
        second.close()


def test_failed_post_keeps_the_plan_and_retries_it(net: Net, store: Store, tmp_path: Path) -> None:
    # a rate so high the distributor cannot cover the tree: postRoot reverts Underfunded
    greedy = rules(sogni_wei_per_spark=2_000_000 * 10**18)
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    s = settler(store, net, tmp_path, rules=greedy)
    with pytest.raises(SettlementError, match="Underfunded"):
        s.close_epoch()
    record = store.epoch_record(1)
    assert record is not None and record.state == "planned"
    net.d.token.transfer(net.d.distributor.address, 1_000_000 * 10**18, sender=net.treasury)
    result = s.close_epoch()
    assert result is not None and result.resumed and result.root == record.root
    assert decode_epoch(record.plan).total == str(result.total)


def test_chain_ahead_of_database_is_refused(net: Net, store: Store, tmp_path: Path) -> None:
    from eth_hash.auto import keccak

    net.d.distributor.post_root(1, keccak(b"x"), 0, keccak(b"y"), sender=net.settler)
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    with pytest.raises(EpochConflict, match="restore the database"):
        settler(store, net, tmp_path).close_epoch()
    assert len(store.unsettled_receipts()) == 1


def test_different_root_on_chain_for_our_epoch_is_a_conflict(
    net: Net, store: Store, tmp_path: Path
) -> None:
    from eth_hash.auto import keccak

    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    s = settler(store, net, tmp_path)
    assert s.plan_epoch() is not None
    net.d.distributor.post_root(1, keccak(b"someone else"), 0, keccak(b"y"), sender=net.settler)
    with pytest.raises(EpochConflict, match="on chain"):
        s.close_epoch()
    assert store.epoch_record(1).state == "planned"  # type: ignore[union-attr]
