"""The prompt policy through the SDK gateway: it calls the dispatcher's `submit`, so a refused
prompt is one `jobError` naming the category, with no prompt echoed and nothing charged.

A live in-process coordinator and a real node (it only advertises the tiny model: nothing is
rendered). The refused prompts are built from the shipped policy's own lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.content_policy import policy_lists
from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.ledger import Ledger
from tests.e2e.conftest import MODEL, start_net

from .conftest import create_key, spark_of
from .sdk_wire import connect, job_request

TINY = {"steps": 3, "sizePreset": "custom", "width": 64, "height": 64}


async def test_the_gateway_refuses_by_category_and_charges_nothing(
    tmp_path: Path, backend: Any
) -> None:
    lists = policy_lists()
    young, lewd = lists["minors"]["underage"][0], lists["adult"]["sexual"][0]
    sentinel = "okapi-sentinel-2291"
    async with start_net(tmp_path) as net:
        await net.add_node(backend, "node0")
        url = net.coordinator.http_url
        assert url is not None
        database = net.config.database
        key, account = create_key(database)
        ledger = Ledger(database)
        try:
            ledger.credit_purchase(account, 1)
        finally:
            ledger.close()
        before = spark_of(database, account)
        async with connect(url, key) as ws:
            await ws.until("swarmModels")
            cases = (
                (f"{sentinel} {young}, {lewd}", False, "minors"),
                (f"{sentinel} {young}, {lewd}", True, "minors"),  # never allowed
                (f"{sentinel}, {lewd}", True, "adult"),  # the operator did not allow adult
            )
            for prompt, disable_safety, category in cases:
                req = job_request(MODEL, 1, positivePrompt=prompt, **TINY)
                req["disableSafety"] = disable_safety
                await ws.send("jobRequest", req)
                frames = await ws.project(req["jobID"])
                kind, err = frames[-1]
                assert kind == "jobError", frames
                assert f"category: {category}" in err["error_message"]
                text = json.dumps(frames)
                assert sentinel not in text and f"{young}, {lewd}" not in text
            # the control: a clean prompt on the same socket renders and is charged
            req = job_request(MODEL, 1, **TINY)
            await ws.send("jobRequest", req)
            assert (await ws.project(req["jobID"]))[-1][1]["type"] == "jobCompleted"
        spent = before - spark_of(database, account)
        assert 0 < spent < 1_000_000  # only the clean project was paid for
        keys = ApiKeys(database)
        try:
            record = keys.lookup(key)
            assert record is not None
            assert keys.spent_today(record.account) == spent  # refused holds were returned
        finally:
            keys.close()
