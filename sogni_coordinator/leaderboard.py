"""Season leaderboards: kept as the entry point `sogni_coordinator.cli` registers; the boards
live in `sogni_coordinator.seasons` (docs/ECONOMICS.md, "Seasons")."""

from __future__ import annotations

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.artists import artist_points_micro
from sogni_coordinator.seasons.boards import BOARDS, Row
from sogni_coordinator.seasons.command import leaderboard_cmd
from sogni_coordinator.seasons.tally import board_rows
from sogni_coordinator.seasons.workers import worker_points_micro
from sogni_protocol.catalog import Season

__all__ = [
    "BOARDS",
    "Row",
    "artist_points_micro",
    "leaderboard",
    "leaderboard_cmd",
    "worker_points_micro",
]


def leaderboard(ledger: Ledger, board: str, season: Season, limit: int = 200) -> list[Row]:
    """Ranked rows of a ledger board (`artists`, `ambassadors`, `workers-relaxed`,
    `workers-fast`, or `workers`: both tiers) for `season`."""
    return board_rows(ledger, board, season, limit)
