"""Board ids, their prize rules, and ranking points into rows with prizes.

Points are integer micro-points (shown with 6 decimals). A board's prize pool (whole SOGNI,
`[seasons.prizes]`) is shared in proportion to points: on `artists`, `workers-relaxed` and
`workers-fast` among the top 200 only, on `ambassadors` and `stakers` among every account.
Prizes are rounded down to the wei; the dust stays undistributed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from sogni_protocol.airdrop import points_of, prizes
from sogni_protocol.catalog import SEASON_BOARDS, Season
from sogni_protocol.pricing import MICRO

WEI_PER_SOGNI = 10**18
TOP_CUT = 200
"""Boards paid to the top 200 only (leaderboard page)."""


@dataclass(frozen=True)
class BoardRule:
    """How a board is titled and paid."""

    title: str
    points: str
    """What its points measure, in words."""
    cut: int | None
    """Only ranks 1..cut share the pool; None: every account with points."""


BOARD_RULES: dict[str, BoardRule] = {
    "artists": BoardRule(
        "Artists", "1 per free Spark, 10 per paid Spark or Spark-equivalent of SOGNI", TOP_CUT
    ),
    "ambassadors": BoardRule(
        "Ambassadors",
        "1 per Spark bought by you or your referrals, 0.2 per Spark of theirs",
        None,
    ),
    "stakers": BoardRule("Stakers", "Staking Power: SOGNI x days staked", None),
    "workers-relaxed": BoardRule(
        "Relaxed Workers", "job value in Spark (free Daily Boost jobs 1/10)", TOP_CUT
    ),
    "workers-fast": BoardRule(
        "Fast Workers", "job value in Spark (free Daily Boost jobs 1/10)", TOP_CUT
    ),
}
LEGACY_WORKERS = BoardRule("Workers (both tiers)", "job value in Spark", None)
"""`workers`: the board before tiers were split, both tiers together, with no prize pool."""
BOARDS: tuple[str, ...] = SEASON_BOARDS
assert set(BOARDS) == set(BOARD_RULES)


@dataclass(frozen=True)
class Row:
    rank: int
    address: str
    points_micro: int
    jobs: int
    """What the points came from: jobs (artists, workers), purchases (ambassadors), stake
    changes (stakers)."""
    days_active: int = 0
    """UTC days of the season with activity that scored (stakers: days with stake)."""
    prize_wei: int = 0
    hardware: str = ""
    """Workers boards: the device the worker last advertised ("": unknown)."""

    @property
    def points(self) -> float:
        return self.points_micro / MICRO

    @property
    def prize(self) -> float:
        return self.prize_wei / WEI_PER_SOGNI


def utc_day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def rank(
    board: str,
    season: Season,
    points: Mapping[str, int],
    counts: Mapping[str, int],
    days: Mapping[str, int],
    limit: int | None = None,
) -> list[Row]:
    """Rows by points (ties: by address), each with its share of the board's prize pool."""
    rule = BOARD_RULES.get(board, LEGACY_WORKERS)
    ordered = sorted((a for a, p in points.items() if p > 0), key=lambda a: (-points[a], a))
    won = prizes(season.prize_pool(board) * WEI_PER_SOGNI, rule.cut, points)
    shown = ordered if limit is None else ordered[:limit]
    return [
        Row(i + 1, a, points[a], counts.get(a, 0), days.get(a, 0), won.get(a, 0))
        for i, a in enumerate(shown)
    ]


@dataclass(frozen=True)
class Inputs:
    """A board's per-account inputs to the points (`sogni_protocol.airdrop.BOARD_INPUTS`),
    with what the leaderboard shows beside them: counts (jobs, purchases) and days active."""

    by_account: dict[str, dict[str, int]]
    counts: dict[str, int]
    days: dict[str, int]

    def points(self, board: str) -> dict[str, int]:
        return {a: points_of(board, i) for a, i in self.by_account.items()}

    def rank(
        self, board: str, season: Season, limit: int | None = None, *, scored_as: str = ""
    ) -> list[Row]:
        """The board's rows; `scored_as`: whose points formula (default: the board's)."""
        points = self.points(scored_as or board)
        return rank(board, season, points, self.counts, self.days, limit)
