"""`settle_and_claim` (what the local demo calls) and the epoch timer."""

from __future__ import annotations

from pathlib import Path

import trio

from sogni_coordinator.settlement import EpochResult, run_epoch_timer
from sogni_coordinator.store import Store
from sogni_devnet.settlement_demo import embedded_deployment, settle_and_claim
from sogni_protocol.eip712 import Domain

from .settle_env import Net, settler, signed_receipt, store_receipts, worker


def test_settle_and_claim_on_a_fresh_embedded_chain(tmp_path: Path) -> None:
    d = embedded_deployment(tmp_path / "addresses.json")
    assert (tmp_path / "addresses.json").is_file()
    domain = Domain(d.addresses.chain_id, d.addresses.distributor)
    a, b, idle = worker(1), worker(2), worker(3)
    db = tmp_path / "coordinator" / "coordinator.db"
    store = Store(db)
    store_receipts(
        store,
        [
            signed_receipt(a, domain),
            signed_receipt(a, domain),
            signed_receipt(b, domain, work_units=3 * 43_200),
        ],
    )
    store.close()

    out = settle_and_claim(db, d, [a.key, b.key, idle.key])
    assert out.epoch is not None and out.epoch.epoch == 1
    per_spark = 650_000_000_000_000_000
    assert out.claimed == {a.address: 2 * per_spark, b.address: 3 * per_spark, idle.address: 0}
    assert out.claimed[a.address] == out.epoch.payouts[a.address]
    assert d.token.balance_of(b.address) == 3 * per_spark
    assert (db.parent / "epochs" / "epoch-000001.json").is_file()

    again = settle_and_claim(db, d, [a.key, b.key])
    assert again.epoch is None and set(again.claimed.values()) == {0}


async def test_timer_closes_epochs(net: Net, store: Store, tmp_path: Path) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    closed: list[EpochResult] = []
    s = settler(store, net, tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_epoch_timer, s, 0.05, closed.append)
            while not closed:
                await trio.sleep(0.05)
            store_receipts(store, [signed_receipt(worker(2), net.domain)])
            while len(closed) < 2:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert [r.epoch for r in closed] == [1, 2]


async def test_an_epoch_takes_at_most_its_cap_and_the_timer_closes_the_rest_at_once(
    net: Net, store: Store, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An epoch took every unsettled receipt: a busy hour's batch outgrew the 64 MiB every
    node's fetch allows, and no node could audit or claim that epoch or any after it. An
    epoch takes `max_receipts`, oldest first; the timer closes the next one at once, not an
    hour later (the clock is trio's mock: sleeps are skipped, and their time counted)."""
    store_receipts(store, [signed_receipt(worker(i), net.domain) for i in range(1, 6)])
    closed: list[tuple[EpochResult, float]] = []
    three = trio.Event()

    def on_closed(result: EpochResult) -> None:
        closed.append((result, trio.current_time()))
        if len(closed) == 3:
            three.set()

    s = settler(store, net, tmp_path)
    s.max_receipts = 2
    async with trio.open_nursery() as nursery:
        await nursery.start(run_epoch_timer, s, 3600.0, on_closed)  # hourly
        await three.wait()
        nursery.cancel_scope.cancel()
    assert [(r.epoch, r.paid_receipts) for r, _ in closed] == [(1, 2), (2, 2), (3, 1)]
    assert store.unsettled_receipts() == []
    first, last = closed[0][1], closed[-1][1]
    assert last - first < 3600  # one hour's wait, not three
