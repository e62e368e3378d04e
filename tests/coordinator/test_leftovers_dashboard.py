"""The shipped Grafana dashboard (deploy/grafana) shows the coordinator's newer metrics: render
requests by outcome, nodes barred, receipts refused, storage failures (what keeps `/readyz`
at 503) and failed stream handlers; every coordinator metric it queries exists in a scrape
of a metered coordinator, and its panels do not overlap."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from .test_obs_metrics import MeteredHarness, view_of

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "sogni-dashboard.json"
SHOWN = {
    "sogni_coordinator_requests_accepted_total",
    "sogni_coordinator_requests_refused_total",
    "sogni_coordinator_requests_failed_total",
    "sogni_coordinator_nodes_barred",
    "sogni_coordinator_receipts_refused_total",
    "sogni_coordinator_db_commit_failures_total",
    "sogni_coordinator_result_failures_total",
    "sogni_coordinator_handler_failures_total",
}


def queried() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {name for e in exprs for name in re.findall(r"\bsogni_coordinator_[a-z0-9_]+", e)}


@pytest.fixture
async def metered_coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[MeteredHarness]:
    h = MeteredHarness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


def test_the_dashboard_shows_the_newer_coordinator_metrics() -> None:
    assert SHOWN - queried() == set()


def test_panels_have_their_own_ids_and_places() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['id']} overlaps another"
        cells |= mine


async def test_every_coordinator_metric_it_queries_is_exposed(
    metered_coord: MeteredHarness, nursery: trio.Nursery
) -> None:
    """(tests/e2e/test_health_metrics.py checks a live scrape after a render.)"""
    view_of(metered_coord, nursery)  # registers the gauges read at scrape time
    exposed: set[str] = set()
    for family in metered_coord.dispatcher.metrics.registry.collect():
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "histogram":
            exposed |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            exposed.add(family.name)
    assert queried() - exposed == set()
