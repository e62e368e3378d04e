"""The payout rules a coordinator settles with: `[settlement]` plus the catalog's creators.

A model's creator registers in the catalog (`creator = "0x..."` on the model); its creator
share of every job of that model is paid to that address in the work epoch, as a leaf like a
worker's. `[settlement].model_creators` (operator config) overrides the catalog per model; a
model with neither pays its share to `creator_fund`, else the network keeps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from sogni_protocol.catalog import Catalog, default_catalog
from sogni_protocol.payout_rules import PayoutRules

if TYPE_CHECKING:
    from sogni_coordinator.config import CoordinatorConfig

__all__ = ["catalog_creators", "payout_rules"]


def catalog_creators(catalog: Catalog) -> dict[str, str]:
    """Model id -> its registered creator (models with one only)."""
    return {m: e.creator for m, e in sorted(catalog.models.items()) if e.creator is not None}


def payout_rules(cfg: CoordinatorConfig, catalog: Catalog | None = None) -> PayoutRules:
    """`cfg.settlement.rules()` with the catalog's creators merged in (config wins)."""
    rules = cfg.settlement.rules(local=cfg.local)
    creators = catalog_creators(catalog if catalog is not None else default_catalog())
    merged = dict(sorted({**creators, **rules.model_creators}.items()))
    return msgspec.structs.replace(rules, model_creators=merged)
