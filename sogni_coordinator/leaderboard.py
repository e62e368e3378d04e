"""Season leaderboards from the ledger's settled jobs (leaderboard page, seed 003).

- Workers: points = job value in Spark (SOGNI jobs at their Spark equivalent); Spark from a
  free Daily Boost counts 1/10.
- Artists: 1 point per free Spark, 10 per paid Spark, 10 per Spark-equivalent paid in SOGNI.

Points are computed in integer micro-points and shown with 6 decimals.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from sogni_coordinator.ledger import Ledger
from sogni_protocol.catalog import Catalog, Season, load_catalog
from sogni_protocol.pricing import MICRO

Board = Literal["workers", "artists"]


@dataclass(frozen=True)
class Row:
    rank: int
    address: str
    points_micro: int
    jobs: int

    @property
    def points(self) -> float:
        return self.points_micro / MICRO


def worker_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Worker micro-points of one job: full for paid Spark and SOGNI, 1/10 for free Spark."""
    return paid + sogni_as_spark + free // 10


def artist_points_micro(free: int, paid: int, sogni_as_spark: int) -> int:
    """Artist micro-points of one job: 1 per free Spark, 10 per paid Spark or SOGNI-Spark."""
    return free + 10 * (paid + sogni_as_spark)


def leaderboard(ledger: Ledger, board: Board, season: Season, limit: int = 200) -> list[Row]:
    """Ranked rows of `board` for the jobs settled within `season`."""
    points: dict[str, int] = defaultdict(int)
    jobs: dict[str, int] = defaultdict(int)
    for payer, worker, free, paid, sogni, sogni_spark in ledger.settled_jobs(
        season.start.timestamp(), season.end.timestamp()
    ):
        del sogni
        if board == "workers":
            who, pts = worker, worker_points_micro(free, paid, sogni_spark)
        else:
            who, pts = payer, artist_points_micro(free, paid, sogni_spark)
        points[who] += pts
        jobs[who] += 1
    ordered = sorted(points, key=lambda a: (-points[a], a))[:limit]
    return [Row(i + 1, a, points[a], jobs[a]) for i, a in enumerate(ordered)]


def leaderboard_cmd(
    board: Annotated[str, typer.Argument(help="workers or artists.")],
    season: Annotated[
        int | None, typer.Option(help="Season number (default: the current one).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Coordinator TOML config.", exists=True)
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="Catalog TOML whose seasons table dates the seasons "
            "(default: $SOGNI_CATALOG, else configs/catalog.toml).",
        ),
    ] = None,
) -> None:
    """Rank workers or artists by season points, from the ledger in the coordinator database."""
    from sogni_coordinator.config import load_coordinator_config
    from sogni_protocol.cli_errors import BadUsage, Unavailable
    from sogni_protocol.settings import SettingsError

    if board not in ("workers", "artists"):
        raise typer.BadParameter("expected workers or artists", param_hint="BOARD")
    try:
        cfg = load_coordinator_config(config)
        cat: Catalog = load_catalog(catalog)
        s = cat.season(season) if season is not None else cat.season_at(dt.datetime.now(dt.UTC))
    except (SettingsError, ValueError, OSError) as exc:
        raise BadUsage(str(exc)) from None
    if not cfg.database.exists():
        raise Unavailable(
            f"no database at {cfg.database}", "start the coordinator once, or pass --config"
        )
    ledger = Ledger(cfg.database)
    try:
        rows = leaderboard(ledger, board, s, limit)  # type: ignore[arg-type]
    finally:
        ledger.close()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "board": board,
                    "season": s.number,
                    "start": s.start.isoformat(),
                    "end": s.end.isoformat(),
                    "rows": [
                        {"rank": r.rank, "address": r.address, "points": r.points, "jobs": r.jobs}
                        for r in rows
                    ],
                }
            )
        )
        return
    typer.echo(f"{board} leaderboard, season {s.number} ({s.start:%Y-%m-%d} to {s.end:%Y-%m-%d})")
    for r in rows:
        typer.echo(f"{r.rank:>4}  {r.address:<44} {r.points:>16.6f}  {r.jobs} jobs")
