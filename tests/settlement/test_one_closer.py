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
