"""What an SDK is told about projects that wait, fail or outlive their app's socket.

- `jobState queued` carries the project's real place in the coordinator's queue (projects of
  its network and model ahead of it), sent again as it changes while nothing of it renders;
- a project none of whose images could be made ends with a project-level `jobError`
  carrying the images' own reason (the SDKs take the project's error from that frame);
- `authenticated.activeProjects` lists the app's projects still in flight.

Driven by `sdk_wire` against a live in-process coordinator; the official SDKs go through the
same in `test_official_sdks.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from sogni_coordinator.billing import Refusal
from sogni_coordinator.gateway.failures import (
    FAILURES,
    failure_of,
    image_error,
    project_error,
)
from sogni_coordinator.key_projects import ImageOutcome
from sogni_node.models.registry import SHAPES_MODEL_ID
from tests.e2e.conftest import MODEL, start_net

from .conftest import funded_key
from .sdk_wire import SdkSocket, connect, job_request

TINY = {"steps": 2, "sizePreset": "custom", "width": 64, "height": 64}
SET_ASIDE = {"createTime", "updateTime", "model"}
"""Fields of an `activeProjects` entry checked on their own."""


def _funded(net: Any, name: str = "app") -> str:
    return funded_key(net.config.database, name)


def _cancel(job_id: str) -> dict[str, object]:
    return {"jobID": job_id, "error": "artistCanceled", "error_message": "artistCanceled"}


def _positions(ws: SdkSocket, job_id: str) -> list[int]:
    """The `queuePosition`s the socket was sent for a project, in order."""
    return [
        d["queuePosition"]
        for k, d in ws.frames
        if k == "jobState" and d.get("type") == "queued" and d["jobID"] == job_id
    ]


async def _read_until(ws: SdkSocket, done: Callable[[], bool], timeout: float = 60) -> None:
    """Read frames (kept in `ws.frames`) until `done()`."""
    with trio.fail_after(timeout):
        while not done():
            await ws.next(timeout)


def _ended(ws: SdkSocket, *job_ids: str) -> bool:
    ends = {d["jobID"] for k, d in ws.frames if k == "jobState" and d["type"] == "jobCompleted"}
    return ends >= set(job_ids)


async def test_queue_position_counts_the_projects_ahead_and_follows_the_queue(
    tmp_path: Path, backend: Any
) -> None:
    """Before, `queuePosition` was always 0."""
    async with start_net(tmp_path, models=[MODEL, SHAPES_MODEL_ID], no_node_grace=120) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = _funded(net)
        a, b = job_request(MODEL, 1, **TINY), job_request(MODEL, 2, **TINY)
        other = job_request(SHAPES_MODEL_ID, 1)  # another model: not behind them
        d = job_request(MODEL, 1, **TINY)
        async with connect(url, key) as ws:
            await ws.until("swarmModels")
            for req in (a, b, other, d):
                await ws.send("jobRequest", req)
                await ws.until("jobState", type="queued", jobID=req["jobID"])
            assert [_positions(ws, r["jobID"]) for r in (a, b, other, d)] == [[0], [1], [0], [2]]

            # the first leaves the queue: those behind it are told they moved up
            await ws.send("jobError", _cancel(a["jobID"]))
            await _read_until(
                ws,
                lambda: (
                    _positions(ws, b["jobID"]) == [1, 0] and _positions(ws, d["jobID"]) == [2, 1]
                ),
                timeout=5,
            )
            with trio.move_on_after(1):  # two more looks at the queue: nothing changed,
                while True:  # nothing sent
                    await ws.next()
            assert _positions(ws, other["jobID"]) == [0]
            assert _positions(ws, b["jobID"]) == [1, 0] and _positions(ws, d["jobID"]) == [2, 1]

            # a node takes them: once an image of a project renders, no more `queued` for it
            await net.add_node(backend, "node0")
            await _read_until(ws, lambda: _ended(ws, b["jobID"], d["jobID"]))
            for req in (b, d):
                job = req["jobID"]
                mine = [(k, x) for k, x in ws.frames if x.get("jobID") == job]
                first_start = next(i for i, (k, _) in enumerate(mine) if k == "jobProgress")
                assert not [x for k, x in mine[first_start:] if x.get("type") == "queued"]
                assert mine[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})


async def test_a_project_whose_images_all_fail_ends_with_their_reason(tmp_path: Path) -> None:
    """No node can render its model: each image's `jobError` names why (`noWorkers`), and so
    does the project-level one that ends it. Before, the images said "could not render" and
    the project "no image of this project could be rendered" (code 5000), which the SDKs
    then showed as the project's error."""
    async with start_net(tmp_path, models=[MODEL], no_node_grace=1) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = _funded(net)
        req = job_request(MODEL, 2, **TINY)
        async with connect(url, key) as ws:
            await ws.until("swarmModels")
            await ws.send("jobRequest", req)
            frames = await ws.project(req["jobID"], timeout=30)
    errors = [d for k, d in frames if k == "jobError"]
    reason = {"error": "noWorkers", "error_message": FAILURES["noWorkers"]}
    assert len(errors) == 3 and [("imgID" in e) for e in errors] == [True, True, False]
    for error in errors:
        assert {k: error[k] for k in reason} == reason
    assert errors[-1] == {"jobID": req["jobID"], **reason, "isFromWorker": False}


def test_failure_reasons_become_codes_and_fixed_messages() -> None:
    """The dispatcher's words (partly a node's) become a code; the message sent is written
    here, so nothing of the reason's text (a node's, or a prompt echoed) reaches the app."""
    secret = "a red circle"  # as if a node echoed the prompt back
    for reason, code in (
        (f"gave up after 3 attempts; last: node left: {secret}", "workerDisconnected"),
        ("gave up after 3 attempts; last: deadline missed", "jobTimedOut"),
        (f"gave up after 3 attempts; last: handed back: declined: {secret}", "workerCancelled"),
        (f"gave up after 3 attempts; last: bad result: {secret}", "resultRejected"),
        (f"gave up after 3 attempts; last: {secret}", "jobFailed"),
        ("no connected node can serve fast sogni-tiny-sd", "noWorkers"),
        ("the coordinator lost this image's file; its receipt is stored", "resultLost"),
        ("the coordinator gave up on this image", "jobFailed"),
        (secret, "jobFailed"),
    ):
        assert failure_of(reason) == code, reason
        sent = image_error(failure_of(reason))
        assert sent == {"error": code, "error_message": FAILURES[code]}
        assert secret not in str(sent)
    # codes stored by earlier versions, and unknown ones, still read as a known reason
    assert image_error("lost")["error"] == "imageLost"
    assert image_error("something else") == image_error("jobFailed")
    # the project's: its images' commonest reason, ties to the latest image's
    failed = {
        0: ImageOutcome(ok=False, error="jobTimedOut"),
        1: ImageOutcome(ok=False, error="noWorkers"),
        2: ImageOutcome(ok=False, error="jobTimedOut"),
    }
    assert project_error(failed)["error"] == "jobTimedOut"
    assert project_error({0: failed[0], 1: failed[1]})["error"] == "noWorkers"


async def test_authenticated_lists_the_apps_projects_still_in_flight(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """An app's new socket is told in `authenticated.activeProjects` which of its projects
    still run (their events follow): the SDKs track them again, even a restarted app that
    lost its own state. Before, the list was always empty. Another app of the key is not
    told, and a project listed that can no longer be resumed gets its project-level error
    instead of silence."""
    from sogni_coordinator.gateway.core import Gateway

    async with start_net(tmp_path, models=[MODEL], no_node_grace=120) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = _funded(net)
        req = job_request(MODEL, 2, **TINY)
        async with connect(url, key, app_id="app-one") as ws:
            kind, hello = await ws.next()
            assert kind == "authenticated" and hello["activeProjects"] == []
            await ws.send("jobRequest", req)
            await ws.until("jobState", type="queued", jobID=req["jobID"])

        async with connect(url, key, app_id="app-one") as ws:
            kind, hello = await ws.next()
            assert kind == "authenticated"
            (entry,) = hello["activeProjects"]
            assert entry["createTime"] <= entry["updateTime"]
            assert entry["model"]["id"] == MODEL and entry["model"]["name"]
            assert {k: v for k, v in entry.items() if k not in SET_ASIDE} == {
                "id": req["jobID"],
                "appId": "app-one",
                "jobType": "image",
                "imageCount": 2,
                "stepCount": 2,
                "status": "queued",
                "network": "fast",
                "tokenType": "spark",
                "workerJobs": [],
                "completedWorkerJobs": [],
            }
            assert "positivePrompt" not in str(entry) and "a red circle" not in str(entry)
            await ws.until("jobState", type="queued", jobID=req["jobID"])  # its events follow

        async with connect(url, key, app_id="app-two") as ws:  # another app: not its project
            kind, hello = await ws.next()
            assert kind == "authenticated" and hello["activeProjects"] == []

        async def gone(self: Gateway, project: Any) -> Any:
            raise Refusal("unknown_request", "no such request")

        monkeypatch.setattr(Gateway, "_resume", gone)
        async with connect(url, key, app_id="app-one") as ws:
            kind, hello = await ws.next()
            assert [p["id"] for p in hello["activeProjects"]] == [req["jobID"]]
            with trio.fail_after(10):
                error = await ws.until("jobError", jobID=req["jobID"])
            assert "imgID" not in error and "no longer knows" in error["error_message"]
