"""`sogni-coordinator leaderboard BOARD`, the season prize pools of the catalog, and the
status page's boards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_coordinator.cli import app
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons import BOARDS, Row
from sogni_coordinator.status_page import StatusSnapshot, render
from sogni_protocol.catalog import CatalogError, parse_catalog

A, B = "0x" + "a" * 40, "0x" + "b" * 40


def _config(tmp_path: Path) -> Path:
    db = tmp_path / "coordinator.db"
    ledger = Ledger(db)
    ledger.refer(B, A)
    ledger.credit_purchase(A, 10)
    ledger.credit_purchase(B, 30)
    ledger.close()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\ndatabase = "{db}"\n')
    return cfg


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["leaderboard", *args])
    return result.exit_code, result.output


def test_every_board_answers_in_json(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    stakes = tmp_path / "stakes.json"
    stakes.write_text(
        json.dumps([{"at": time.time() - 3600, "account": A, "active_wei": str(10**21)}])
    )
    for board in BOARDS:
        extra = ["--stakes", str(stakes)] if board == "stakers" else []
        code, out = _run(board, "--json", "--config", str(cfg), *extra)
        assert code == 0, out
        data = json.loads(out)
        assert data["board"] == board and data["prize_pool_sogni"] > 0
    code, out = _run("ambassadors", "--json", "--config", str(cfg))
    rows = json.loads(out)["rows"]
    assert [(r["address"], r["points"]) for r in rows] == [(A, 40.0), (B, 30.0)]
    assert int(rows[0]["prize_wei"]) == 3_000_000 * 10**18 * 40 // 70
    code, out = _run("stakers", "--config", str(cfg), "--stakes", str(stakes))
    assert code == 0 and A in out and "by share" in out


def test_bad_boards_and_missing_chain_are_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    code, out = _run("workers-slow", "--config", str(cfg))
    assert code != 0 and "workers-fast" in out
    code, out = _run("stakers", "--config", str(cfg))  # no chain_url configured
    assert code != 0 and "Traceback" not in out and "chain" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, out = _run("stakers", "--config", str(cfg), "--stakes", str(bad))
    assert code != 0 and "stake changes" in out


def test_prize_pools_from_the_catalog() -> None:
    cat = parse_catalog(
        {
            "seasons": {
                "prizes": {"artists": 7, "stakers": 0},
                "fixed": [
                    {
                        "number": 7,
                        "start": "2025-06-02",
                        "end": "2025-07-14",
                        "prizes": {"workers-fast": 9},
                    },
                ],
            }
        }
    )
    assert cat.season(1).prize_pool("artists") == 7 and cat.season(1).prize_pool("ambassadors") == 0
    assert (
        cat.season(7).prize_pool("workers-fast") == 9 and cat.season(7).prize_pool("artists") == 0
    )
    assert parse_catalog({}).season(1).prize_pool("ambassadors") == 3_000_000
    with pytest.raises(CatalogError, match="unknown board"):
        parse_catalog({"seasons": {"prizes": {"painters": 1}}})
    with pytest.raises(CatalogError, match="whole SOGNI"):
        parse_catalog({"seasons": {"prizes": {"artists": -1}}})


def test_status_page_shows_each_board() -> None:
    row = Row(1, A, 2_500_000, 3, 2, 10**18)
    boards: dict[str, list[Row] | None] = {b: [row] for b in BOARDS}
    boards["workers-fast"] = [Row(1, A, 2_500_000, 3, 2, 10**18, hardware="RTX 4090")]
    boards["stakers"] = None
    page = render(
        StatusSnapshot(
            generated_at=time.time(),
            peer_id="p",
            signer="s",
            nodes=0,
            nodes_by_tier={},
            nodes_by_model={},
            jobs={},
            throughput=[0] * 12,
            epochs=[],
            season=5,
            boards=boards,
        )
    )
    for board in ("artists", "ambassadors", "workers-relaxed", "workers-fast"):
        assert f'<table id="{board}">' in page
    assert "Fast Workers, season 5" in page and "2.500" in page and "1.00" in page
    assert 'id="stakers" class="empty">needs the chain' in page
    fast = page.split('<table id="workers-fast">')[1].split("</table>")[0]
    relaxed = page.split('<table id="workers-relaxed">')[1].split("</table>")[0]
    artists = page.split('<table id="artists">')[1].split("</table>")[0]
    assert "hardware" in fast and "RTX 4090" in fast  # the page's Hardware column
    assert "hardware" in relaxed and "hardware" not in artists
