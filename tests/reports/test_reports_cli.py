"""The operator's side: `sogni-coordinator reports ...` (the real CLI, in-process), blocks that
survive reopening the database, and a blocked wallet that the router never picks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from typer.testing import CliRunner

import sogni_coordinator.reports as reports_module
from sogni_app.cli import app as sogni_app
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.reports import ReportRefused, Reports
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import Router
from sogni_coordinator.store import Store
from sogni_protocol.messages import split_request
from sogni_protocol.pricing import quote
from tests.e2e.conftest import tiny_request

runner = CliRunner()


def _env(tmp: Path) -> dict[str, str]:
    return {"SOGNI_COORDINATOR_DATA_DIR": str(tmp), "SOGNI_COORDINATOR_LOG_LEVEL": "warning"}


def test_blocks_persist_across_reopening_and_the_cli_manages_them(tmp_path: Path) -> None:
    payer, node = Account.create().address, Account.create().address
    env = _env(tmp_path)
    done = runner.invoke(coordinator_app, ["reports", "block", "payer", payer], env=env)
    assert done.exit_code == 0, done.output
    done = runner.invoke(coordinator_app, ["reports", "block", "node", node], env=env)
    assert done.exit_code == 0, done.output
    # a fresh open of the database (a restarted coordinator) reads the same blocks
    reports = Reports(tmp_path / "coordinator.db")
    try:
        payers, nodes = reports.refresh()
        assert payers == {payer.lower()} and nodes == {node.lower()}
    finally:
        reports.close()
    listed = runner.invoke(coordinator_app, ["reports", "blocks", "--json"], env=env)
    assert {(b["kind"], b["account"]) for b in json.loads(listed.output)} == {
        ("payer", payer.lower()),
        ("node", node.lower()),
    }
    done = runner.invoke(coordinator_app, ["reports", "unblock", payer], env=env)
    assert done.exit_code == 0 and "unblocked" in done.output
    again = runner.invoke(coordinator_app, ["reports", "unblock", payer], env=env)
    assert again.exit_code != 0 and "is not blocked" in again.output  # one line, no traceback
    assert "Traceback" not in again.output
    reports = Reports(tmp_path / "coordinator.db")
    try:
        assert reports.refresh() == (frozenset(), frozenset({node.lower()}))
    finally:
        reports.close()


def test_the_cli_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cases = (
        (["reports", "show", "7"], "no report 7"),
        (["reports", "resolve", "7", "--action", "none"], "no report 7"),
        (["reports", "resolve", "7", "--action", "ban"], "--action must be one of"),
        (["reports", "block", "payer", "nope"], "usage: reports block"),
    )
    for args, expected in cases:
        done = runner.invoke(coordinator_app, args, env=env)
        assert done.exit_code != 0, args
        assert expected in done.output and "Traceback" not in done.output, done.output
    listed = runner.invoke(coordinator_app, ["reports", "list", "--open", "--json"], env=env)
    assert listed.exit_code == 0 and json.loads(listed.output) == []


def test_sogni_report_refuses_bad_input_before_connecting(tmp_path: Path) -> None:
    cases = (
        (["report", "zz", "--reason", "other"], "JOB is a request id"),
        (["report", "ab" * 32, "--reason", "rude"], "--reason must be one of"),
        (["report", "ab" * 32, "--reason", "other", "--note", "x" * 1001], "at most 1000"),
    )
    for args, expected in cases:
        done = runner.invoke(sogni_app, args, env={"HOME": str(tmp_path)})
        assert done.exit_code == 2, (args, done.output)
        assert expected in done.output and "Traceback" not in done.output


def test_the_router_never_picks_a_blocked_wallet() -> None:
    send, _recv = trio.open_memory_channel[object](1)
    wallet = Account.create().address
    link = NodeLink("peer-1", wallet, frozenset({"sogni-tiny-sd"}), 1, send)  # type: ignore[arg-type]
    router = Router(Reputation(":memory:"))
    request = tiny_request(1)
    assert router.capable(link, "fast", request)
    router.blocked_nodes = frozenset({wallet.lower()})
    assert not router.capable(link, "fast", request)


def _paid_request(store: Store, ledger: Ledger, payer: str, n: int) -> bytes:
    """A stored request of `payer` (a real reservation) whose images were never delivered."""
    request_id = os.urandom(32)
    req = tiny_request(1, positive_prompt=f"a red circle {n}")
    ledger.reserve(request_id, payer, quote(req))
    params = split_request(req)
    store.add_request(
        request_id,
        model_id=req.model_id,
        network=req.network,
        token_type=req.token_type,
        client_peer="peer",
        jobs=[(os.urandom(32), params[0], 1)],
    )
    return request_id


def test_reports_are_rate_limited_per_reporter(tmp_path: Path, monkeypatch: Any) -> None:
    """Past the hourly limit a reporter is refused before any evidence is read; the limit is
    per reporter, and an undelivered request has nothing to report."""
    monkeypatch.setattr(reports_module, "REPORTS_PER_HOUR", 0)
    path = tmp_path / "coordinator.db"
    store, ledger, reports = Store(path), Ledger(path), Reports(path)
    try:
        payer = Account.create().address
        ledger.credit_purchase(payer, 1)
        first = _paid_request(store, ledger, payer, 1)
        with pytest.raises(ReportRefused) as info:
            reports.file(first, reporter=payer, via="client", reason="other")
        assert info.value.code == "rate_limited"
        monkeypatch.setattr(reports_module, "REPORTS_PER_HOUR", 20)
        with pytest.raises(ReportRefused) as info:
            reports.file(first, reporter=payer, via="client", reason="other")
        assert info.value.code == "not_delivered"
        assert reports.find() == []
    finally:
        reports.close()
        ledger.close()
        store.close()
