"""A won dispute's pay reaches the epoch roots exactly once (the epoch close's
`Restorations` hook): planned into an epoch, marked paid only when that epoch is posted; a
plan that was never saved, or never posted, leaves it owed; an epoch of restorations alone
closes; the payee's stake tier sets the take rate."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from sogni_chain import ChainRevert, connect
from sogni_coordinator.disputes import DisputeBook, Restorations
from sogni_coordinator.settlement.epochs import EpochConflict, SettlementError, Settler
from sogni_coordinator.store import Store
from tests.chain_rollback import rolled_back
from tests.settlement.settle_env import (
    Net,
    make_net,
    rules,
    settler,
    signed_receipt,
    store_receipts,
    won_case,
    worker,
)

SPARK = 43_200  # work units of one Spark: 1 SOGNI at the default rate
SOGNI = 10**18
CASE = b"\x0c" * 32


@pytest.fixture(scope="module")
def _net() -> Net:
    return make_net("embedded", connect(accounts=4))


@pytest.fixture
def net(_net: Net) -> Iterator[Net]:
    with rolled_back(_net.chain):
        yield _net


def _won(book: DisputeBook, payee: str) -> None:
    """A refused 1-Spark receipt whose worker then won its dispute."""
    won_case(book, payee, CASE, SPARK)
    assert not book.settle(CASE, worker_won=True)  # decided once


def _setup(net: Net, tmp: Path) -> tuple[Store, DisputeBook, Settler, str]:
    store = Store(tmp / "coordinator.db")
    book = DisputeBook(tmp / "coordinator.db")
    honest = worker(1).address
    _won(book, honest)
    s = settler(store, net, tmp)
    s.restorations = Restorations(book)
    return store, book, s, honest


def _share(take_bps: int) -> int:
    return rules().split(SOGNI, "sogni-test", take_bps).worker


def test_paid_in_the_next_epoch_once(net: Net, tmp_path: Path) -> None:
    store, book, s, honest = _setup(net, tmp_path)
    other = worker(2)
    store_receipts(store, [signed_receipt(other, net.domain, work_units=SPARK)])
    first = s.close_epoch()
    assert first is not None
    share = _share(rules().take_rates_bps[0])
    assert first.payouts[honest] == share  # listed, with no receipt of its own
    assert first.total == first.payouts[other.address] + share
    assert net.d.distributor.total_of(1) == first.total
    (row,) = book.restorations()
    assert row["epoch"] == 1 and int(row["amount"]) == share
    store_receipts(store, [signed_receipt(other, net.domain, work_units=SPARK)])
    second = s.close_epoch()
    assert second is not None and honest not in second.payouts
    assert second.total == first.total + second.payouts[other.address]


def test_an_epoch_of_restorations_alone_closes(net: Net, tmp_path: Path) -> None:
    _store, book, s, honest = _setup(net, tmp_path)
    result = s.close_epoch()  # no receipt at all: the won dispute is still paid
    assert result is not None and result.paid_receipts == 0
    assert result.payouts == {honest: _share(rules().take_rates_bps[0])}
    assert net.d.distributor.total_of(1) == result.total
    assert book.restorations()[0]["epoch"] == 1
    assert s.close_epoch() is None  # nothing owed any more


def test_a_plan_that_was_not_saved_leaves_it_owed(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, book, s, honest = _setup(net, tmp_path)

    def lost_race(*_a: object, **_k: object) -> None:
        raise sqlite3.IntegrityError("UNIQUE constraint failed: epochs.epoch")

    with monkeypatch.context() as m:
        m.setattr(store, "save_epoch_plan", lost_race)
        with pytest.raises(EpochConflict):
            s.close_epoch()
    assert book.restorations()[0]["epoch"] is None  # planned, never saved: still owed
    result = s.close_epoch()
    assert result is not None and result.payouts == {honest: _share(rules().take_rates_bps[0])}
    assert book.restorations()[0]["epoch"] == 1


def test_marked_paid_only_when_posted(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store, book, s, _honest = _setup(net, tmp_path)

    def refused(*_a: object, **_k: object) -> None:
        raise ChainRevert("paused")

    with monkeypatch.context() as m:
        m.setattr(s.distributor, "post_root", refused)
        with pytest.raises(SettlementError):
            s.close_epoch()
    assert book.restorations()[0]["epoch"] is None  # planned into epoch 1, not on chain
    assert s.close_epoch() is not None  # the kept plan is posted: now it is paid
    assert book.restorations()[0]["epoch"] == 1
    assert s.close_epoch() is None  # and not planned again


def test_a_crash_after_posting_is_repaired_not_paid_twice(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, book, s, honest = _setup(net, tmp_path)
    assert s.restorations is not None
    with monkeypatch.context() as m:  # posted, then the process died before marking it
        m.setattr(s.restorations, "posted", lambda epoch, paid=None: None)
        first = s.close_epoch()
    assert first is not None and book.restorations()[0]["epoch"] is None
    other = worker(2)
    store_receipts(store, [signed_receipt(other, net.domain, work_units=SPARK)])
    second = s.close_epoch()
    assert second is not None and honest not in second.payouts
    assert book.restorations()[0]["epoch"] == 1


def test_the_payee_stake_tier_sets_the_take(net: Net, tmp_path: Path) -> None:
    _store, _book, s, honest = _setup(net, tmp_path)
    stake = 10_000 * SOGNI  # tier 2 of the default [0, 1000, 10000, 100000]
    net.d.token.transfer(honest, stake)
    net.chain.send_eth(honest, SOGNI, sender=net.treasury)
    net.d.token.approve(net.d.addresses.staking, stake, sender=worker(1))
    net.d.staking.stake(stake, sender=worker(1))
    result = s.close_epoch()
    assert result is not None
    assert rules().take_rates_bps[2] < rules().take_rates_bps[0]
    assert result.payouts == {honest: _share(rules().take_rates_bps[2])}


def test_an_epoch_paying_a_won_dispute_passes_the_audit_and_a_forged_one_does_not(
    net: Net, tmp_path: Path
) -> None:
    """The restored pay is published in the batch (case, payee, model, value, take, amount)
    and recomputed by the audit. Before, its leaf was one no receipt paid: every node's
    audit refused the coordinator's epochs for good after its first won dispute."""
    from sogni_protocol.epoch_audit import audit_folder
    from tests.settlement import forge

    store, _book, s, honest = _setup(net, tmp_path)
    store_receipts(store, [signed_receipt(worker(2), net.domain, work_units=SPARK)])
    assert s.close_epoch() is not None
    folder = tmp_path / "epochs"
    report = audit_folder(folder)
    assert report.ok, report.first_problem
    batch = forge.batch_of(folder, 1)
    (restored,) = batch.restorations
    assert restored.payee == honest and int(restored.amount) == _share(rules().take_rates_bps[0])
    assert restored.case_id == "0x" + CASE.hex()
    more = forge.replace(restored, amount=str(int(restored.amount) + 1))  # a wei more
    forge.publish_batch(folder, 1, forge.replace(batch, restorations=[more]))
    report = audit_folder(folder)
    assert not report.ok and "restoration of case" in (report.first_problem or "")


def test_a_restoration_planned_into_an_epoch_that_went_out_without_it_stays_owed(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restoration is planned into epoch 1, the plan fails its growth check, and another
    plan (here one without restorations; a season's airdrop or a racing closer alike) takes
    epoch 1. Epoch 1's batch does not pay the case, so it stays owed and epoch 2 pays it.
    Before, it was marked paid by epoch 1 (posted) and never paid at all."""
    store, book, s, honest = _setup(net, tmp_path)

    def over_cap(growth: int) -> None:
        raise SettlementError("over the distributor's cap")

    with monkeypatch.context() as m:
        m.setattr(s, "_check_growth", over_cap)
        with pytest.raises(SettlementError):
            s.close_epoch()
    assert book.restorations()[0]["epoch"] is None  # planned into 1, not saved
    restorations, s.restorations = s.restorations, None
    store_receipts(store, [signed_receipt(worker(2), net.domain, work_units=SPARK)])
    first = s.close_epoch()  # epoch 1, without the restoration
    assert first is not None and first.epoch == 1 and honest not in first.payouts
    s.restorations = restorations
    second = s.close_epoch()
    assert second is not None and second.epoch == 2
    assert second.payouts == {honest: _share(rules().take_rates_bps[0])}
    assert book.restorations()[0]["epoch"] == 2
