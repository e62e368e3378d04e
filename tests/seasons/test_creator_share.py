"""Model creators' share: a creator registered in the catalog is paid its share of its own
model's jobs in the work epoch (a leaf like a worker's), never of another model's; a model
with no creator leaves the share with the network."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.settlement.rules import payout_rules
from sogni_coordinator.store import Store
from sogni_protocol import epoch_math
from sogni_protocol.catalog import CatalogError, parse_catalog
from sogni_protocol.epoch_audit import audit_folder
from sogni_protocol.epoch_files import decode_batch
from sogni_protocol.payout_rules import SettlementConfig
from tests.settlement.settle_env import Net, settler, signed_receipt, store_receipts, worker

CREATOR = worker(21).address
OTHER_CREATOR = worker(22).address
WORKER = worker(23)
TINY = {"class": "tiny"}


def _catalog(creator: object) -> dict[str, object]:
    return {
        "classes": {
            "tiny": {
                "baseline_render_seconds": 0.0432,
                "default_steps": 4,
                "default_width": 64,
                "default_height": 64,
            }
        },
        "models": {
            "sogni-tiny-sd": {**TINY, "creator": creator},
            "sogni-shapes-64": dict(TINY),
        },
    }


def test_catalog_validates_creator_addresses() -> None:
    cat = parse_catalog(_catalog(CREATOR.lower()))
    assert cat.models["sogni-tiny-sd"].creator == CREATOR  # checksummed
    assert cat.models["sogni-shapes-64"].creator is None
    bad_checksum = CREATOR[:2] + CREATOR[2:].swapcase()
    for bad in ("0x1234", "not an address", 42, "0x" + "0" * 40, bad_checksum, CREATOR[2:]):
        with pytest.raises(CatalogError, match="sogni-tiny-sd: creator must be a 0x address"):
            parse_catalog(_catalog(bad))


def test_creator_is_paid_for_its_model_only(net: Net, store: Store, tmp_path: Path) -> None:
    cfg = CoordinatorConfig(
        data_dir=tmp_path / "c", settlement=SettlementConfig(creator_share_bps=1_000)
    )
    rules = payout_rules(cfg, parse_catalog(_catalog(CREATOR)))
    assert rules.model_creators == {"sogni-tiny-sd": CREATOR}
    own = [signed_receipt(WORKER, net.domain, model="sogni-tiny-sd") for _ in range(2)]
    other = signed_receipt(WORKER, net.domain, model="sogni-shapes-64")
    store_receipts(store, [*own, other])
    result = settler(store, net, tmp_path, rules=rules).close_epoch()
    assert result is not None

    batch = decode_batch(result.receipts_file.read_bytes())
    by_model = {e.model_id: e for e in batch.receipts}
    shares = [int(e.creator_amount) for e in batch.receipts if e.model_id == "sogni-tiny-sd"]
    assert result.payouts[CREATOR] == sum(shares) > 0
    # the other model has no creator: its share stays with the network (no leaf, no payee)
    assert by_model["sogni-shapes-64"].creator is None
    assert set(result.payouts) == {CREATOR, WORKER.address}
    assert audit_folder(tmp_path / "epochs").problems == []

    # cheat: the creator paid for the other model's job, or another creator for its own
    stolen = msgspec.structs.replace(by_model["sogni-shapes-64"], creator=CREATOR)
    assert "creator share goes to" in (epoch_math.entry_problem(batch, stolen) or "")
    moved = msgspec.structs.replace(by_model["sogni-tiny-sd"], creator=OTHER_CREATOR)
    assert "creator share goes to" in (epoch_math.entry_problem(batch, moved) or "")


def test_config_overrides_the_catalog(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(
        data_dir=tmp_path / "c",
        settlement=SettlementConfig(model_creators={"sogni-tiny-sd": OTHER_CREATOR}),
    )
    rules = payout_rules(cfg, parse_catalog(_catalog(CREATOR)))
    assert rules.model_creators == {"sogni-tiny-sd": OTHER_CREATOR}
