"""One epoch closer at a time across the coordinators of a network on one PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sogni_coordinator.settlement.epochs import SettlementBusy
from sogni_coordinator.storage.session_lock import LockHeld, exclusive
from sogni_coordinator.store import Store

from .settle_env import Net, settler, signed_receipt, store_receipts, worker


def test_the_lock_admits_one_holder_then_the_next(pg_url: str) -> None:
    with exclusive(pg_url, "epoch-close"):
        with pytest.raises(LockHeld), exclusive(pg_url, "epoch-close"):
            pass
        with exclusive(pg_url, "another-lock"):  # other names are independent
            pass
    with exclusive(pg_url, "epoch-close"):  # released on exit
        pass


def test_a_second_coordinator_waits_its_turn_and_nothing_is_paid_twice(
    net: Net, pg_url: str, tmp_path: Path
) -> None:
    a = worker(1)
    first, second = Store(pg_url), Store(pg_url)  # two coordinators, one database
    try:
        store_receipts(first, [signed_receipt(a, net.domain, work_units=43_200)])
        busy = pytest.raises(SettlementBusy, match="another coordinator")
        with exclusive(pg_url, "epoch-close"), busy:  # the first one is closing right now
            settler(second, net, tmp_path / "second").close_epoch()
        result = settler(second, net, tmp_path / "second").close_epoch()
        assert result is not None and result.epoch == 1 and result.paid_receipts == 1
        assert settler(first, net, tmp_path / "first").close_epoch() is None  # paid once
    finally:
        first.close()
        second.close()


def test_sqlite_takes_no_lock(tmp_path: Path) -> None:
    with exclusive(tmp_path / "c.db", "epoch-close"), exclusive(tmp_path / "c.db", "epoch-close"):
        pass


def test_every_coordinator_of_a_network_publishes_every_epoch(
    net: Net, pg_url: str, tmp_path: Path
) -> None:
    """A closes epoch 1, B epoch 2, each into its own folder: at its next close each
    publishes what the other closed, from the network's database (the epoch file, its tree
    and its receipts batch), so a node fetching from either audits 1, 2 clean. Before,
    each folder had a gap (B lacked 1, A lacked 2): nodes refused them."""
    from sogni_protocol.epoch_audit import audit_folder

    first, second = Store(pg_url), Store(pg_url)
    try:
        at_a, at_b = settler(first, net, tmp_path / "a"), settler(second, net, tmp_path / "b")
        store_receipts(first, [signed_receipt(worker(1), net.domain, work_units=43_200)])
        assert (r := at_a.close_epoch()) is not None and r.epoch == 1
        store_receipts(second, [signed_receipt(worker(2), net.domain, work_units=43_200)])
        assert (r := at_b.close_epoch()) is not None and r.epoch == 2
        assert at_a.close_epoch() is None  # nothing new to pay: it publishes epoch 2 all the same
        for folder in (tmp_path / "a" / "epochs", tmp_path / "b" / "epochs"):
            report = audit_folder(folder)
            assert report.ok and [e.epoch for e in report.epochs] == [1, 2], report.problems
    finally:
        first.close()
        second.close()
