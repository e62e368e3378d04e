"""The Workers boards' Hardware column: the device a worker's node last advertised, recorded
by the dispatcher's handshake into the coordinator database and read back by the boards."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons import board_rows
from sogni_coordinator.seasons.hardware import HardwareLog
from sogni_coordinator.store import Store
from sogni_devnet.paid_work import signed_receipt, store_receipts, worker
from sogni_protocol.catalog import load_catalog
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import Capabilities

DOMAIN = Domain(31337, "0x" + "5a" * 20)
NODE, PAYOUT, UNSEEN = worker(31), worker(32), worker(33)


def _caps(device: str, payout: str | None = None) -> Capabilities:
    return Capabilities(
        peer_id="12D3KooWtest",
        wallet=NODE.address,
        expiry=2_000_000_000,
        models=["sogni-tiny-sd"],
        slots=1,
        backend="cuda",
        device=device,
        max_pixels=1 << 20,
        payout=payout,
    )


def test_workers_board_shows_the_last_advertised_device(tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.db")
    store_receipts(
        store,
        [
            signed_receipt(NODE, DOMAIN),
            signed_receipt(UNSEEN, DOMAIN),
        ],
    )
    log = HardwareLog(store.path)
    log.seen(_caps("NVIDIA GeForce RTX 3090"))
    log.seen(_caps("NVIDIA GeForce RTX 4090", payout=PAYOUT.address))  # an upgrade: latest wins
    season = load_catalog().season_at(dt.datetime.now(dt.UTC))
    ledger = Ledger(store.path)
    try:
        rows = {r.address: r for r in board_rows(ledger, "workers-fast", season)}
        artists = board_rows(ledger, "artists", season)
        by_payout = log.devices([PAYOUT.address, UNSEEN.address])
    finally:
        ledger.close()
        log.close()
        store.close()
    assert rows[NODE.address.lower()].hardware == "NVIDIA GeForce RTX 4090"
    assert by_payout == {PAYOUT.address.lower(): "NVIDIA GeForce RTX 4090"}  # payee rows too
    assert rows[UNSEEN.address.lower()].hardware == ""  # never handshaken here
    assert [r.hardware for r in artists] == [""]  # not a workers board
