"""`sogni-coordinator leaderboard BOARD --season N [--json]`: one season board, with prizes."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from sogni_coordinator.seasons.boards import BOARD_RULES, BOARDS, Row
from sogni_coordinator.seasons.stakers import StakeChange
from sogni_coordinator.seasons.tally import board_rows


def _stakes_file(path: Path) -> list[StakeChange]:
    """A JSON list of {"at": unix seconds, "account": "0x..", "active_wei": "int"}."""
    from sogni_protocol.cli_errors import BadUsage

    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, list):
            raise TypeError("not a list")
        return [
            StakeChange(float(c["at"]), str(c["account"]).lower(), int(c["active_wei"]))
            for c in raw
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadUsage(
            f"{path}: not a list of stake changes ({type(exc).__name__})",
            'write [{"at": 1700000000, "account": "0x..", "active_wei": "1000"}, ...]',
        ) from None


def _chain_stakes(config: Path | None, chain_url: str | None) -> Callable[[], list[StakeChange]]:
    """A reader of the Staking contract's history on the configured shared chain."""
    from sogni_coordinator.chain_cli import _config, _deployment, _shared_chain
    from sogni_coordinator.seasons.stakers import stake_changes

    def read() -> list[StakeChange]:
        cfg = _config(config)
        return stake_changes(_deployment(cfg, _shared_chain(cfg, chain_url)))

    return read


def _row_json(r: Row) -> dict[str, object]:
    return {
        "rank": r.rank,
        "address": r.address,
        "points": r.points,
        "points_micro": r.points_micro,
        "jobs": r.jobs,
        "days_active": r.days_active,
        "hardware": r.hardware,
        "prize_wei": str(r.prize_wei),
    }


def leaderboard_cmd(
    board: Annotated[str, typer.Argument(help=f"One of: {', '.join(BOARDS)}.")],
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
            help="Catalog TOML whose seasons table dates the seasons and sets their prize "
            "pools (default: $SOGNI_CATALOG, else configs/catalog.toml).",
        ),
    ] = None,
    stakes: Annotated[
        Path | None,
        typer.Option(
            help="stakers: a JSON list of stake changes to rank instead of reading the chain.",
            exists=True,
        ),
    ] = None,
    chain_url: Annotated[
        str | None,
        typer.Option(help="stakers: the shared chain's JSON-RPC url (default: chain_url)."),
    ] = None,
) -> None:
    """Rank a season board (points, days active, prize) from the coordinator's ledger; the
    stakers board from the Staking contract's events (or --stakes)."""
    from sogni_coordinator.config import load_coordinator_config
    from sogni_coordinator.ledger import Ledger
    from sogni_protocol.catalog import Catalog, load_catalog
    from sogni_protocol.cli_errors import BadUsage, Unavailable
    from sogni_protocol.settings import SettingsError

    if board not in BOARDS and board not in ("workers",):
        raise typer.BadParameter(f"expected one of {', '.join(BOARDS)}", param_hint="BOARD")
    try:
        cfg = load_coordinator_config(config)
        cat: Catalog = load_catalog(catalog)
        s = cat.season(season) if season is not None else cat.season_at(dt.datetime.now(dt.UTC))
    except (SettingsError, ValueError, OSError) as exc:
        raise BadUsage(str(exc)) from None
    source: Sequence[StakeChange] | Callable[[], list[StakeChange]] | None = None
    if board == "stakers":
        source = _stakes_file(stakes) if stakes is not None else _chain_stakes(config, chain_url)
    if not cfg.database.exists():
        raise Unavailable(
            f"no database at {cfg.database}", "start the coordinator once, or pass --config"
        )
    ledger = Ledger(cfg.database)
    try:
        rows = board_rows(ledger, board, s, None, stakes=source, now=time.time())
    finally:
        ledger.close()
    rule = BOARD_RULES.get(board)
    pool = s.prize_pool(board)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "board": board,
                    "season": s.number,
                    "start": s.start.isoformat(),
                    "end": s.end.isoformat(),
                    "prize_pool_sogni": pool,
                    "top_cut": rule.cut if rule else None,
                    "rows": [_row_json(r) for r in rows[:limit]],
                }
            )
        )
        return
    title = rule.title if rule else board
    typer.echo(
        f"{title}, season {s.number} ({s.start:%Y-%m-%d} to {s.end:%Y-%m-%d}): "
        f"{pool:,} SOGNI" + (f" to the top {rule.cut}" if rule and rule.cut else " by share")
    )
    for r in rows[:limit]:
        hardware = f"  {(r.hardware or '-')[:28]:<28}" if board.startswith("workers") else ""
        typer.echo(
            f"{r.rank:>4}  {r.address:<44}{hardware} {r.points:>16.6f}  {r.days_active:>3} days"
            f"  {r.prize:>14.6f} SOGNI"
        )
