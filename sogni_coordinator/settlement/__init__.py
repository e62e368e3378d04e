"""Settlement: stored receipts -> per-epoch cumulative payouts -> a Merkle root on chain.

    settler = Settler(store, deployment, sender=key, rules=cfg.settlement.rules(),
                      publish_dir=cfg.data_dir / "epochs")
    result = settler.close_epoch()          # idempotent; resumes a crashed close

Exports are loaded lazily, so importing this package does not import web3 and the chain
layer. The payout rules and the epoch file formats are shared with nodes and live in
`sogni_protocol.payout_rules` and `sogni_protocol.epoch_files`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .epochs import EpochConflict, EpochResult, SettlementError, Settler, epoch_claims
    from .timer import run_epoch_timer

__all__ = [
    "EpochConflict",
    "EpochResult",
    "SettlementError",
    "Settler",
    "epoch_claims",
    "run_epoch_timer",
]

_WHERE = {
    "EpochConflict": "epochs",
    "EpochResult": "epochs",
    "SettlementError": "epochs",
    "Settler": "epochs",
    "epoch_claims": "epochs",
    "run_epoch_timer": "timer",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
