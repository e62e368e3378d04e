"""An SDK project the coordinator cannot store (disk full, the database away) is refused as
the libp2p client's request is (`unavailable`): one project-level `jobError` with the
gateway's 503 code (5003) and the same one line ("nothing was charged; try again later or
another coordinator"), counted `requests_refused_total{code="unavailable"}`, and the socket
serves on. Before, the raw storage error ended the session (1011, "server restarting"): the
SDK reconnected and re-sent the project into the same full disk."""

from __future__ import annotations

import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.dispatch import Dispatcher
from sogni_coordinator.key_projects import KeyProjects
from tests.e2e.conftest import MODEL, start_net
from tests.gateway.sdk_wire import connect, job_request

SENTINEL = "qx-sentinel-gateway-disk-5521"


def _refused(url: str) -> tuple[float, float]:
    """(`requests_refused_total{code="unavailable"}`, `requests_failed_total`)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {"unavailable": 0.0, "failed": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sogni_coordinator_requests_refused_total":
                if s.labels.get("code") == "unavailable":
                    found["unavailable"] = s.value
            elif s.name == "sogni_coordinator_requests_failed_total":
                found["failed"] = s.value
    return found["unavailable"], found["failed"]


async def _refused_project(sdk: Any, request: dict[str, Any]) -> dict[str, Any]:
    await sdk.send("jobRequest", request)
    frames = await sdk.project(request["jobID"], timeout=20)
    (kind, error), *_ = frames
    assert kind == "jobError" and "imgID" not in error
    return error


async def test_a_project_that_cannot_be_stored_is_refused_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Dispatcher, "submit", full)  # under the metered one: it counts
    begin = KeyProjects.begin
    broken = [False]

    def begin_or_fail(self: KeyProjects, *args: Any, **kwargs: Any) -> Any:
        if broken[0]:  # the gateway's own record, before the dispatcher sees anything
            raise sqlite3.OperationalError("disk I/O error")
        return begin(self, *args, **kwargs)

    monkeypatch.setattr(KeyProjects, "begin", begin_or_fail)
    async with start_net(tmp_path, models=[MODEL]) as net:
        url = net.coordinator.http_url
        assert url is not None
        keys = ApiKeys(net.config.database)
        try:
            key, _account = keys.create("app")
        finally:
            keys.close()
        async with connect(url, key) as sdk:
            await sdk.until("authenticated")
            request = job_request(MODEL, 1, positivePrompt=f"a red circle {SENTINEL}")
            error = await _refused_project(sdk, request)
            assert error["error"] == 5003 and error["isFromWorker"] is False
            message = error["error_message"]
            assert "disk full" in message and "nothing was charged" in message
            assert "try again later" in message and SENTINEL not in message
            assert await trio.to_thread.run_sync(_refused, url) == (1.0, 0.0)

            broken[0] = True
            error = await _refused_project(sdk, job_request(MODEL, 1))
            assert error["error"] == 5003 and "I/O error" in error["error_message"]
            assert await trio.to_thread.run_sync(_refused, url) == (2.0, 0.0)

            await sdk.send("changeNetwork", "relaxed")  # the socket serves on
            assert await sdk.until("changeNetwork", timeout=10) == {"network": "relaxed"}
