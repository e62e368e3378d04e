"""A coordinator whose every table is in PostgreSQL (`database = "postgresql://..."`):
a real node renders on 127.0.0.1, the payer is charged, and the epoch over its receipts
settles on the in-process EVM, all read back from the PostgreSQL database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from eth_account import Account

from sogni_app.api import render
from sogni_chain import connect
from sogni_coordinator.ledger import ASSETS, Ledger
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.storage import is_postgres
from sogni_coordinator.store import Store
from sogni_protocol.payout_rules import SettlementConfig

from ..settlement.settle_env import make_net
from .conftest import start_net, tiny_request


async def test_a_coordinator_on_postgresql_renders_and_settles(
    tmp_path: Path, backend: Any, pg_url: str
) -> None:
    chain = await trio.to_thread.run_sync(connect)
    net_chain = await trio.to_thread.run_sync(make_net, "embedded", chain)
    domain = net_chain.domain
    where = {"chain_id": domain.chain_id, "verifying_contract": domain.verifying_contract}
    payer = Account.create()
    async with start_net(tmp_path, database=pg_url, **where) as net:
        assert is_postgres(net.config.database)
        assert not list((tmp_path / "coordinator").glob("*.db"))  # no SQLite file at all
        await net.add_node(backend, "node0", **where)
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
        finally:
            ledger.close()
        with trio.fail_after(90):
            result = await render(
                net.addr, tiny_request(2), payer_key=bytes(payer.key), domain=domain
            )
        assert len(result.images) == 2

    ledger = Ledger(pg_url)
    store = Store(pg_url)
    try:
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)  # double-entry, in PostgreSQL
        assert ledger.balance(payer.address)["spark_paid"] < 1_000_000  # charged
        assert len(store.receipts()) == 2
        settler = Settler(
            store,
            net_chain.d,
            sender=net_chain.settler,
            rules=SettlementConfig().rules(local=True),
            publish_dir=tmp_path / "epochs",
        )
        closed = settler.close_epoch()
        assert closed is not None and closed.paid_receipts == 2, closed
        assert net_chain.d.distributor.root_of(closed.epoch) == closed.root
        record = store.last_epoch_record(state="posted")
        assert record is not None and record.root == closed.root
    finally:
        store.close()
        ledger.close()
