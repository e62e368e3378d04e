"""Settlement: stored receipts -> per-epoch cumulative payouts -> a Merkle root on chain.

    settler = Settler(store, deployment, sender=key, rules=cfg.settlement.rules(),
                      publish_dir=cfg.data_dir / "epochs")
    result = settler.close_epoch()          # idempotent; resumes a crashed close
    settle_and_claim(db_path, deployment, node_keys)   # the local demo, in one process

Exports are loaded lazily: the coordinator's config imports `rules` from here, and loading a
config must not import web3 and the chain layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sogni_protocol.epoch_files import EpochFile, ReceiptsBatch
    from sogni_protocol.payout_rules import PayoutRules, SettlementConfig

    from .demo import SettleAndClaim, embedded_deployment, settle_and_claim
    from .epochs import EpochConflict, EpochResult, SettlementError, Settler, epoch_claims
    from .timer import run_epoch_timer

__all__ = [
    "EpochConflict",
    "EpochFile",
    "EpochResult",
    "PayoutRules",
    "ReceiptsBatch",
    "SettleAndClaim",
    "SettlementConfig",
    "SettlementError",
    "Settler",
    "embedded_deployment",
    "epoch_claims",
    "run_epoch_timer",
    "settle_and_claim",
]

_WHERE = {
    "SettleAndClaim": "demo",
    "embedded_deployment": "demo",
    "settle_and_claim": "demo",
    "EpochConflict": "epochs",
    "EpochResult": "epochs",
    "SettlementError": "epochs",
    "Settler": "epochs",
    "epoch_claims": "epochs",
    "EpochFile": "formats",
    "ReceiptsBatch": "formats",
    "PayoutRules": "rules",
    "SettlementConfig": "rules",
    "run_epoch_timer": "timer",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
