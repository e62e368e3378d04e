"""`POST /v1/report` on the SDK gateway, on a live in-process coordinator with a real node:
authenticated like every REST call, validated field by field, a project of another key is
unknown, a project is reported once; resolving the report with `block-payer` (the operator's
CLI) refuses the key's next project before anything is charged."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.reports import Reports
from tests.e2e.conftest import MODEL, start_net, until
from tests.gateway.conftest import create_key, spark_of
from tests.gateway.sdk_wire import connect, job_request

TINY = {"steps": 3, "sizePreset": "custom", "width": 64, "height": 64}
SENTINEL = "wombat-sentinel-4410"
NOTE = "ibis-note-8823"
runner = CliRunner()


async def test_gateway_reports_and_a_blocked_key(tmp_path: Path, backend: Any) -> None:
    async with start_net(tmp_path) as net:
        node = await net.add_node(backend, "node0")
        url = net.coordinator.http_url
        assert url is not None
        database = net.config.database
        key, account = create_key(database, "reporter")
        other_key, _ = create_key(database, "other")
        ledger = Ledger(database)
        try:
            ledger.credit_purchase(account, 1)
        finally:
            ledger.close()
        async with connect(url, key) as ws:
            await ws.until("swarmModels")
            req = job_request(MODEL, 2, positivePrompt=f"a red circle {SENTINEL}", **TINY)
            await ws.send("jobRequest", req)
            assert (await ws.project(req["jobID"]))[-1][1]["type"] == "jobCompleted"
        job = req["jobID"]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def post(body: Any, api_key: str | None = key) -> httpx.Response:
                headers = {} if api_key is None else {"api-key": api_key}
                return await http.post("/v1/report", json=body, headers=headers)

            assert (await post({"jobID": job, "reason": "other"}, None)).status_code == 401
            bad_bodies = (
                ({"jobID": job, "reason": "rude", "note": NOTE}, "reason"),
                ({"jobID": job}, "reason"),
                ({"reason": "other"}, "jobID"),
                ({"jobID": job, "reason": "other", "imageIndex": "1"}, "imageIndex"),
                ({"jobID": job, "reason": "other", "note": "x" * 1001}, "note"),
                ({"jobID": job, "reason": "other", "extra": 1}, "extra"),
                ([job], "object"),
            )
            for body, field in bad_bodies:
                answer = await post(body)
                assert answer.status_code == 400, body
                assert field in answer.json()["message"] and answer.json()["errorCode"] == 4000
                assert NOTE not in answer.text  # errors never echo what was sent
            huge = await http.post(
                "/v1/report", content=b"{" + b" " * 20_000 + b"}", headers={"api-key": key}
            )
            assert huge.status_code == 400 and "at most" in huge.json()["message"]
            deep = await http.post(  # stdlib json recursed into a RecursionError: a 500
                "/v1/report", content=b"[" * 8000, headers={"api-key": key}
            )
            assert deep.status_code == 400 and "deeper" in deep.json()["message"]
            # another key's view: the project is not its own, so it is unknown there
            assert (await post({"jobID": job, "reason": "other"}, other_key)).status_code == 404
            assert (await post({"jobID": "NO-SUCH-JOB", "reason": "other"})).status_code == 404
            answer = await post({"jobID": job, "reason": "sexual", "imageIndex": 1, "note": NOTE})
            assert answer.status_code == 200, answer.text
            report_id = answer.json()["data"]["reportId"]
            again = await post({"jobID": job, "reason": "hate"})
            assert again.status_code == 409 and again.json()["errorCode"] == 4009

            env = {
                "SOGNI_COORDINATOR_DATA_DIR": str(net.config.data_dir),
                "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
            }
            shown = runner.invoke(
                coordinator_app, ["reports", "show", str(report_id), "--json"], env=env
            )
            assert shown.exit_code == 0, shown.output
            kept = json.loads(shown.output)
            assert kept["payer"] == account.lower() and kept["via"] == "gateway"
            assert kept["imageIndex"] == 1 and [i["index"] for i in kept["images"]] == [1]
            assert kept["promptHash"] and SENTINEL not in shown.output
            listed = runner.invoke(coordinator_app, ["reports", "list", "--open"], env=env)
            assert listed.exit_code == 0 and f"{report_id:>5}" in listed.output
            done = runner.invoke(
                coordinator_app,
                ["reports", "resolve", str(report_id), "--action", "block-payer", "--note", "t"],
                env=env,
            )
            assert done.exit_code == 0 and f"blocked payer {account.lower()}" in done.output
            twice = runner.invoke(
                coordinator_app, ["reports", "resolve", str(report_id), "--action", "none"], env=env
            )
            assert twice.exit_code != 0 and "already resolved" in twice.output
            still_open = runner.invoke(
                coordinator_app, ["reports", "list", "--open", "--json"], env=env
            )
            assert json.loads(still_open.output) == []

        dispatcher = net.coordinator.dispatcher
        await until(lambda: account.lower() in dispatcher.blocked_payers, 10)
        before = spark_of(database, account)
        async with connect(url, key) as ws:
            await ws.until("swarmModels")
            req = job_request(MODEL, 1, **TINY)
            await ws.send("jobRequest", req)
            kind, err = (await ws.project(req["jobID"]))[-1]
            assert kind == "jobError" and "blocked" in err["error_message"]
        assert spark_of(database, account) == before  # refused before anything was reserved
        # the operator files its own report on the same request and blocks its node
        filed = runner.invoke(
            coordinator_app,
            ["reports", "file", kept["requestId"], "--reason", "minor", "--note", "email"],
            env=env,
        )
        assert filed.exit_code == 0, filed.output
        found = re.search(r"^report (\d+) filed$", filed.output, re.MULTILINE)
        assert found is not None, filed.output
        operator_report = int(found.group(1))
        done = runner.invoke(
            coordinator_app,
            ["reports", "resolve", str(operator_report), "--action", "block-node"],
            env=env,
        )
        wallet = node.wallet.address.lower()
        assert done.exit_code == 0 and f"blocked node {wallet}" in done.output

        await until(
            lambda: all(link.wallet.lower() != wallet for link in dispatcher.nodes.values()), 10
        )
        assert wallet in dispatcher.router.blocked_nodes
    reports = Reports(database)
    try:
        rows = reports._db.execute("SELECT * FROM reports").fetchall()
    finally:
        reports.close()
    assert SENTINEL not in repr(rows)
