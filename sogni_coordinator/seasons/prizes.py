"""Every board's per-account inputs for one season: what its airdrop pays from."""

from __future__ import annotations

from collections.abc import Sequence

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons import ambassadors, artists, stakers, workers
from sogni_coordinator.seasons.boards import Inputs
from sogni_coordinator.seasons.stakers import StakeChange
from sogni_protocol.catalog import SEASON_BOARDS, Season


def season_inputs(
    ledger: Ledger, season: Season, stakes: Sequence[StakeChange]
) -> dict[str, Inputs]:
    """Board id -> its inputs over the whole season (all five boards)."""
    out = {
        "artists": artists.inputs(ledger, season),
        "ambassadors": ambassadors.inputs(ledger, season),
        "stakers": stakers.inputs(stakes, season),
        "workers-relaxed": workers.inputs(ledger, season, "workers-relaxed"),
        "workers-fast": workers.inputs(ledger, season, "workers-fast"),
    }
    assert tuple(sorted(out)) == tuple(sorted(SEASON_BOARDS))
    return out
