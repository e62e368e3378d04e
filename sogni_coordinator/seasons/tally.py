"""Any board's rows, by id: the one entry point the CLI and the status page call."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons import ambassadors, artists, stakers, workers
from sogni_coordinator.seasons.boards import BOARDS, Row
from sogni_coordinator.seasons.stakers import StakeChange
from sogni_protocol.catalog import Season


def board_rows(
    ledger: Ledger,
    board: str,
    season: Season,
    limit: int | None = None,
    *,
    stakes: Sequence[StakeChange] | Callable[[], Sequence[StakeChange]] | None = None,
    now: float | None = None,
) -> list[Row]:
    """The ranked rows of `board` for `season`. `stakes`: the Staking contract's changes
    (or a reader of them), which only the `stakers` board needs; `now` ends an open season."""
    if board == "artists":
        return artists.board(ledger, season, limit)
    if board in ("workers-relaxed", "workers-fast", "workers"):
        return workers.board(ledger, season, board, limit)
    if board == "ambassadors":
        return ambassadors.board(ledger, season, limit)
    if board == "stakers":
        if stakes is None:
            raise ValueError("the stakers board needs the Staking contract's stake changes")
        changes = stakes() if callable(stakes) else stakes
        return stakers.board(changes, season, limit, now=now)
    raise ValueError(f"unknown board {board!r}; expected one of {', '.join(BOARDS)}")
