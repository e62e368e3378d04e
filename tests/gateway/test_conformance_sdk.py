"""Conformance with SOGNI_SDK_PROTOCOL.md, what an app of the official SDKs tripped on:

- after `switchNetwork` the SDKs empty their model list and wait for the next `swarmModels`;
  none came (the counts had not changed), so `waitForModels` timed out;
- `swarmModels` counted every node, whatever networks it may serve: a relaxed app saw
  fast-only nodes as its workers;
- `GET /api/v1/status/network/{network}/models` (the SDKs' `getAvailableModels`) and
  `GET /api/v1/artist/projects/sync` (`sync()`, `listProjectsElsewhere()`) were 404s, which
  the SDKs raise to the app;
- a 429 said neither `retryAfter` nor `Retry-After`: the SDKs' `ApiError.retryAfter` was
  undefined, so an app could not know when to try again.

The Python SDK runs in its own process (tests/gateway/sdk/py_sdk_conformance.py), skipped
when it is not installed (`make test` installs it); the rest is the raw wire.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from sogni_coordinator.gateway.config import GatewayConfig
from sogni_coordinator.gateway.models import sid_of
from sogni_coordinator.jobs import NodeLink
from tests.e2e.conftest import start_net

from .conftest import funded_key
from .sdk_wire import SdkSocket, connect

TINY = "sogni-tiny-sd"
SDXL = "sdxl-base-1.0"
MODELS = [SDXL, TINY]
ROOT = Path(__file__).resolve().parents[2]
PY_SDK_DIR = ROOT / ".cache" / "sogni-sdk-py"


@dataclass
class _Env:
    net: Any
    url: str
    """The gateway's base URL."""
    key: str
    """A funded API key."""


@asynccontextmanager
async def _net(tmp: Path, **gateway: Any) -> AsyncIterator[_Env]:
    """A coordinator serving MODELS with no node (projects wait a minute for one), its
    gateway's URL, and a funded key."""
    async with start_net(
        tmp, models=MODELS, no_node_grace=60.0, gateway=GatewayConfig(**gateway)
    ) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = funded_key(net.config.database, spark=50)
        yield _Env(net, url, key)


async def _hello(sock: SdkSocket) -> dict[str, Any]:
    """Read `authenticated`, `swarmModels`, `balanceUpdate`; the `swarmModels` payload."""
    assert (await sock.next())[0] == "authenticated"
    kind, swarm = await sock.next()
    assert kind == "swarmModels"
    assert (await sock.next())[0] == "balanceUpdate"
    return swarm


def _fake_node(peer: str, device: str, models: set[str]) -> NodeLink:
    send, _ = trio.open_memory_channel[Any](1)
    return NodeLink(
        peer_id=peer,
        wallet="0x" + peer.encode().hex().ljust(40, "0")[:40],
        models=frozenset(models),
        slots=1,
        outbox=send,
        device=device,
    )


async def test_switch_network_is_followed_by_that_networks_swarm_models(tmp_path: Path) -> None:
    async with _net(tmp_path) as env, connect(env.url, env.key) as sock:
        assert set(await _hello(sock)) == set(MODELS)
        await sock.send("changeNetwork", "relaxed")
        assert await sock.until("changeNetwork", timeout=5) == {"network": "relaxed"}
        # the SDKs emptied their model list on `changeNetwork`: the next frame fills it
        kind, swarm = await sock.next(timeout=3)
        assert kind == "swarmModels" and set(swarm) == set(MODELS)


async def test_swarm_models_count_only_the_nodes_of_the_sockets_network(tmp_path: Path) -> None:
    async with _net(tmp_path) as env:
        url, key = env.url, env.key
        d = env.net.coordinator.dispatcher
        d.router.tiers = "enforced"  # as on the public network: fast needs a GPU (here: cuda)

        def classify(device: str, wallet: str) -> tuple[frozenset[str], float]:
            return frozenset({"fast"} if device == "cuda" else {"relaxed"}), 1.0

        d.router.classify = classify  # type: ignore[method-assign]
        nodes = [
            _fake_node("gpu-1", "cuda", {TINY, SDXL}),
            _fake_node("gpu-2", "cuda", {SDXL}),
            _fake_node("cpu-1", "cpu", {TINY}),
        ]
        for node in nodes:
            d.nodes[node.peer_id] = node
        try:
            async with connect(url, key) as fast:
                assert await _hello(fast) == {SDXL: 2, TINY: 1}
            relaxed_url = SdkSocket.url(url).replace("forceWorkerId=fast", "forceWorkerId=")
            async with open_websocket_url(
                relaxed_url, extra_headers=[(b"api-key", key.encode())]
            ) as ws:
                assert await _hello(SdkSocket(ws)) == {SDXL: 0, TINY: 1}
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                auth = {"api-key": key}
                for network, want in (
                    ("fast", {SDXL: 2, TINY: 1}),
                    ("relaxed", {SDXL: 0, TINY: 1}),
                ):
                    got = await http.get(f"/api/v1/status/network/{network}/models", headers=auth)
                    assert got.status_code == 200, got.text
                    assert got.json() == {str(sid_of(m)): n for m, n in want.items()}
                listing = (await http.get("/api/v1/models/list", headers=auth)).json()
                assert {m["SID"]: m["id"] for m in listing} == {sid_of(m): m for m in MODELS}
                bad = await http.get("/api/v1/status/network/moon/models", headers=auth)
                assert bad.status_code == 400 and "network" in bad.json()["message"]
                anon = await http.get("/api/v1/status/network/fast/models")
                assert anon.status_code == 401
        finally:
            for node in nodes:
                d.nodes.pop(node.peer_id, None)


def test_sids_do_not_move_when_models_come_and_go() -> None:
    """The SDKs cache the model list for 24 h and look the counts' SIDs up in it: a SID is
    the model's own, not its place in today's list."""
    sids = {m: sid_of(m) for m in MODELS}
    assert sid_of(TINY) == sids[TINY] and len(set(sids.values())) == len(MODELS)
    assert all(0 < s < 2**31 for s in sids.values())


async def test_recovery_snapshot_lists_the_keys_projects_in_flight(tmp_path: Path) -> None:
    from .sdk_wire import job_request

    async with _net(tmp_path) as env, connect(env.url, env.key, app_id="app-a") as sock:
        url, key = env.url, env.key
        await _hello(sock)
        request = job_request(TINY, 1)
        await sock.send("jobRequest", request)
        queued = await sock.until("jobState", timeout=10, type="queued")
        job = request["jobID"]
        assert queued["jobID"] == job
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            auth = {"api-key": key}
            mine = await http.get(
                "/api/v1/artist/projects/sync", headers=auth, params={"appId": "app-a"}
            )
            assert mine.status_code == 200, mine.text
            body = mine.json()
            assert [p["id"] for p in body["activeProjects"]] == [job]
            entry = body["activeProjects"][0]
            assert entry["appId"] == "app-a" and entry["model"]["id"] == TINY
            assert entry["imageCount"] == 1 and entry["status"] == "queued"
            assert body["unclaimedCompletedProjects"] == []
            assert isinstance(body["serverTime"], int)
            everyone = await http.get("/api/v1/artist/projects/sync", headers=auth)
            assert [p["id"] for p in everyone.json()["activeProjects"]] == [job]
            other = await http.get(
                "/api/v1/artist/projects/sync", headers=auth, params={"appId": "app-b"}
            )
            assert other.json()["activeProjects"] == []
            assert (await http.get("/api/v1/artist/projects/sync")).status_code == 401
            # what the SDKs' prompt-free entry never carries
            assert "a red circle" not in mine.text


async def test_a_429_says_how_long_to_wait(tmp_path: Path) -> None:
    async with (
        _net(tmp_path, requests_per_minute=6) as env,
        httpx.AsyncClient(base_url=env.url, timeout=30) as http,
    ):
        key = env.key
        answers = [await http.get("/v1/account/me", headers={"api-key": key}) for _ in range(12)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited, [r.status_code for r in answers]
        body = limited[0].json()
        assert body["errorCode"] == 4029 and body["retryAfter"] == 10  # 60 s / 6 calls
        assert limited[0].headers["Retry-After"] == "10"
        ok = next(r for r in answers if r.status_code == 200)
        assert "retry-after" not in ok.headers and "retryAfter" not in ok.json()


async def test_a_429_for_failed_keys_says_how_long_to_wait(tmp_path: Path) -> None:
    async with (
        _net(tmp_path, failed_auth_per_minute=1) as env,
        httpx.AsyncClient(base_url=env.url, timeout=30) as http,
    ):
        for _ in range(3):
            got = await http.get("/v1/account/me", headers={"api-key": "wrong-key-123"})
        assert got.status_code == 429
        assert got.json()["retryAfter"] == 60 and got.headers["Retry-After"] == "60"
        wrong = await http.get("/v1/account/me", headers={"api-key": "wrong-key-456"})
        assert wrong.status_code == 429


async def _python_sdk(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run tests/gateway/sdk/py_sdk_conformance.py with `cfg`; its outcome (skips when the
    official Python SDK is not installed)."""
    if not (PY_SDK_DIR / "sogni_client").is_dir():
        pytest.skip(f"official Python SDK not installed in {PY_SDK_DIR} (run `make test`)")
    penv = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    penv["PYTHONPATH"] = str(PY_SDK_DIR)  # first: its websockets 16 shadows the venv's 17
    script = Path(__file__).resolve().parent / "sdk" / "py_sdk_conformance.py"
    with trio.fail_after(150):
        done = await trio.run_process(
            [sys.executable, str(script), json.dumps(cfg)],
            capture_stdout=True,
            capture_stderr=True,
            env=penv,
            check=False,
            cwd=str(ROOT),
        )
    stdout = done.stdout.decode(errors="replace").strip()
    stderr = done.stderr.decode(errors="replace")[-3000:]
    assert done.returncode == 0 and stdout, f"exit {done.returncode}\n{stdout}\n{stderr}"
    out: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    print(json.dumps(out, indent=1))  # shown on failure
    return out


async def test_the_python_sdk_switches_network_lists_workers_and_syncs(tmp_path: Path) -> None:
    async with _net(tmp_path) as env:
        out = await _python_sdk(
            {
                "url": env.url,
                "key": env.key,
                "appId": "app-a",
                "otherAppId": "app-b",
                "model": TINY,
            }
        )
        assert out["models"] == {"ok": True, "value": sorted(MODELS)}
        assert out["switch_then_wait_for_models"] == {
            "ok": True,
            "value": {"network": "relaxed", "models": sorted(MODELS)},
        }
        assert out["get_available_models"]["ok"], out["get_available_models"]
        assert sorted(m["id"] for m in out["get_available_models"]["value"]) == sorted(MODELS)
        assert out["create"]["ok"], out["create"]
        job = out["create"]["value"]
        assert out["sync"] == {"ok": True, "value": [job]}
        assert out["list_projects_elsewhere"] == {
            "ok": True,
            "value": [{"id": job, "appId": "app-a"}],
        }


async def test_a_project_whose_end_may_not_have_been_read_is_listed_unclaimed(
    tmp_path: Path, backend: Any
) -> None:
    """An app's new socket within `REPLAY_TOLD` of a project's end (its end was written,
    maybe not read: the app crashed, its socket dropped) gets it in
    `authenticated.unclaimedCompletedProjects`, with result URLs, and in the snapshot's: a
    restarted app that lost its state rebuilds it from there. Before, the list was always
    empty and the project's replayed frames went to a client that did not track it (the
    SDKs ignore those): its images were charged and never returned."""
    from tests.e2e.conftest import MODEL

    from .sdk_wire import job_request

    tiny = {"steps": 2, "sizePreset": "custom", "width": 64, "height": 64}
    async with start_net(tmp_path, models=[MODEL], no_node_grace=120) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = funded_key(net.config.database)
        await net.add_node(backend, "node0")
        request = job_request(MODEL, 2, **tiny)
        job = request["jobID"]
        async with connect(url, key, app_id="app-r") as sock:
            await sock.until("swarmModels", timeout=20)
            await sock.send("jobRequest", request)
            first = await sock.project(job)
            assert first[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            auth = {"api-key": key}
            async with connect(url, key, app_id="app-r") as sock:  # the app, restarted
                kind, hello = await sock.next()
                assert kind == "authenticated" and hello["activeProjects"] == []
                [entry] = hello["unclaimedCompletedProjects"]
                assert entry["id"] == job and entry["status"] == "completed"
                assert entry["appId"] == "app-r" and entry["imageCount"] == 2
                jobs = entry["completedWorkerJobs"]
                assert [j["status"] for j in jobs] == ["jobCompleted", "jobCompleted"]
                assert all(
                    j["performedSteps"] == 2 and isinstance(j["seedUsed"], int) for j in jobs
                )
                results = {d["imgID"]: d for k, d in first if k == "jobResult"}
                assert {j["imgID"] for j in jobs} == set(results)
                for j in jobs:  # the URLs download without auth, as the SDKs fetch them
                    assert int(j["seedUsed"]) == int(results[j["imgID"]]["lastSeed"])
                    got = await http.get(j["resultUrl"])
                    assert got.status_code == 200 and got.content[:4] == b"\x89PNG"
                # its frames still follow (a client that tracks it ignores them once done)
                again = await sock.project(job)
                assert again[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
            snap = await http.get(
                "/api/v1/artist/projects/sync", headers=auth, params={"appId": "app-r"}
            )
            assert [p["id"] for p in snap.json()["unclaimedCompletedProjects"]] == [job]
            other = await http.get(
                "/api/v1/artist/projects/sync", headers=auth, params={"appId": "app-x"}
            )
            assert other.json()["unclaimedCompletedProjects"] == []
            assert "a red circle" not in snap.text


async def test_a_restarted_python_sdk_app_gets_the_urls_of_a_project_it_lost(
    tmp_path: Path, backend: Any
) -> None:
    from tests.e2e.conftest import MODEL

    async with start_net(tmp_path, models=[MODEL]) as net:
        url = net.coordinator.http_url
        assert url is not None
        key = funded_key(net.config.database)
        await net.add_node(backend, "node0")
        out = await _python_sdk(
            {"mode": "restart", "url": url, "key": key, "appId": "app-r", "model": MODEL}
        )
        assert out["first"]["ok"] and out["first"]["value"]["urls"] == 2, out["first"]
        again = out["restarted"]
        assert again["ok"], again
        assert again["value"]["id"] == out["first"]["value"]["id"]
        assert again["value"]["recovered"] and len(again["value"]["urls"]) == 2
        async with httpx.AsyncClient(timeout=30) as http:
            for link in again["value"]["urls"]:
                got = await http.get(link)
                assert got.status_code == 200 and got.content[:4] == b"\x89PNG"
