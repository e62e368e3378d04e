"""Sogni's official Python SDK (`sogni-client` 5.70.0, unmodified) against this network's
gateway, as an app would use it. Run by tests/gateway/test_official_sdks.py in its own
process: the SDK is asyncio, and it pins `websockets<17`, so it lives in its own folder
(`.cache/sogni-sdk-py`, made by `make test`) put first on PYTHONPATH.

argv[1]: JSON `{url, key, poorKey, limitKey, badKey, model, unservedModel, appId,
cancelSteps}` (`unservedModel`: offered by the gateway, rendered by no node: its images wait
in the queue, then fail with the dispatcher's "no node" reason). Prints one JSON object, the
outcome of each scenario (`ok` plus what the test checks), on its last line of stdout; logs
go to stderr. A scenario that fails records its error and the next one still runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sogni_client import SogniClient
from sogni_client.errors import ProjectError

TIMEOUT = 60.0
PROMPT = "a red circle on a blue background"


def _spark(balance: dict[str, Any]) -> float:
    return float(balance["spark"]["net"])


def _error_of(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {k: error.get(k) for k in ("code", "originalCode", "message")}


async def _until(cond: Callable[[], Any], seconds: float, what: str | Callable[[], str]) -> Any:
    deadline = time.monotonic() + seconds
    while not (got := cond()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if not got:
        raise TimeoutError(f"timeout: {what() if callable(what) else what}")
    return got


async def _client(cfg: dict[str, Any], key: str, app_id: str) -> SogniClient:
    return await SogniClient.create(
        api_key=key,
        app_id=app_id,
        rest_endpoint=cfg["url"],
        socket_endpoint=cfg["url"].replace("http://", "ws://", 1),
        network="fast",
    )


def _project(cfg: dict[str, Any], n: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "image",
        "modelId": cfg["model"],
        "positivePrompt": PROMPT,
        "numberOfMedia": n,
        "tokenType": "spark",
        **extra,
    }


async def bad_key(cfg: dict[str, Any]) -> dict[str, Any]:
    """A wrong key: the socket is closed (4021, the SDK signs out) and REST answers 401."""
    out: dict[str, Any] = {}
    try:
        client = await _client(cfg, cfg["badKey"], cfg["appId"] + "-bad")
    except Exception as exc:  # create may raise on the 4021 close
        return {"refused": True, "create_error": f"{type(exc).__name__}: {exc}"}
    closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_disconnected(data: Any) -> None:
        if not closed.done():
            closed.set_result(data.get("code") if isinstance(data, dict) else None)

    client.api_client.on("disconnected", on_disconnected)
    models = asyncio.ensure_future(client.projects.wait_for_models(timeout=8))
    await asyncio.wait([closed, models], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    out["closeCode"] = closed.result() if closed.done() else None
    out["models_seen"] = models.done() and not models.cancelled() and not models.exception()
    models.cancel()
    # the SDK's own /v1/account/me may get its 401 first and sign out, closing the socket
    # itself (then no 4021 arrives): either way the key is refused
    out["signedOut"] = not client.api_client.auth.is_authenticated
    try:
        await client.account.me()
        out["me"] = "answered"
    except Exception as exc:
        out["me_error"] = f"{type(exc).__name__}: {exc}"
        out["me_status"] = getattr(exc, "status", None)
    await client.aclose()
    out["refused"] = not out["models_seen"] and "me" not in out
    return out


async def main_flow(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    client = await _client(cfg, cfg["key"], cfg["appId"])
    sent: list[tuple[str, Any]] = []
    socket = client.api_client.socket
    real_send = socket.send

    async def recording_send(message_type: str, data: Any) -> None:
        sent.append((message_type, data))
        await real_send(message_type, data)

    socket.send = recording_send  # type: ignore[method-assign]

    async def step(name: str, fn: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        started = time.monotonic()
        try:
            result = await fn()
            out[name] = {"ok": True, **result}
        except Exception as exc:
            out[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=6)[-1500:],
            }
        out[name]["seconds"] = round(time.monotonic() - started, 2)

    async def auth() -> dict[str, Any]:
        me = await client.account.me()
        return {"walletAddress": me.get("walletAddress")}

    async def models() -> dict[str, Any]:
        listed = await client.projects.wait_for_models(timeout=15)
        return {"models": {m["id"]: m.get("workerCount") for m in listed}}

    async def render_and_download() -> dict[str, Any]:
        before = _spark(await client.account.refresh_balance())
        project = await client.projects.create(_project(cfg, 2))
        urls = await project.wait_for_completion(timeout=TIMEOUT)
        downloads = []
        async with httpx.AsyncClient(timeout=20, follow_redirects=True) as http:
            for url in urls:
                got = await http.get(url)  # no auth headers: the URL carries its signature
                downloads.append(
                    {
                        "status": got.status_code,
                        "type": got.headers.get("content-type"),
                        "png": got.content[:8] == b"\x89PNG\r\n\x1a\n",
                        "bytes": len(got.content),
                    }
                )
            forged = urls[0].replace("sig=", "sig=A", 1)
            forged_status = (await http.get(forged)).status_code
        after = _spark(await client.account.refresh_balance())
        return {
            "projectId": project.id,
            "urls": urls,
            "downloads": downloads,
            "forgedStatus": forged_status,
            "charged": round(before - after, 6),
        }

    async def reconnect() -> dict[str, Any]:
        """The socket drops mid-project; the SDK reconnects on its own and, without re-sending
        the accepted `jobRequest`, gets the rest of the project on its new socket (the gateway
        resumes an app's in-flight projects there)."""
        before = _spark(await client.account.refresh_balance())
        project = await client.projects.create(_project(cfg, 2))
        requests = [d for t, d in sent if t == "jobRequest" and d.get("jobID") == project.id]
        assert len(requests) == 1, f"{len(requests)} jobRequests recorded"
        deadline = time.monotonic() + 20
        while not project.jobs and not project.finished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the server took it and started a job
        connected = asyncio.Event()
        remove = client.api_client.on("connected", lambda _data: connected.set())
        ws = socket._socket
        assert ws is not None, "no socket to drop"
        ws.transport.abort()  # a dropped connection, not a close: the SDK reconnects
        await asyncio.wait_for(connected.wait(), 30)
        remove()
        deadline = time.monotonic() + 10
        while not socket.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        urls = await project.wait_for_completion(timeout=TIMEOUT)
        after = _spark(await client.account.refresh_balance())
        again = [d for t, d in sent if t == "jobRequest" and d.get("jobID") == project.id]
        return {
            "urls": urls,
            "charged": round(before - after, 6),
            "dropped": True,
            "sentAgain": len(again) - 1,
        }

    async def cancel() -> dict[str, Any]:
        before = _spark(await client.account.refresh_balance())
        slow = {"steps": cfg["cancelSteps"]} if cfg.get("cancelSteps") else {}
        project = await client.projects.create(_project(cfg, 4, **slow))
        await project.cancel()
        try:
            urls = await project.wait_for_completion(timeout=TIMEOUT)
            outcome = f"completed with {len(urls)} urls"
        except ProjectError as exc:
            outcome = f"ProjectError: {exc}"
        await asyncio.sleep(0.5)  # let a refund land before reading the balance
        after = _spark(await client.account.refresh_balance())
        return {"outcome": outcome, "status": project.status, "charged": round(before - after, 6)}

    waiting: list[Any] = []

    async def queue() -> dict[str, Any]:
        """Two projects of a model no node serves wait in the queue, the second behind the
        first; once the first is cancelled the second is told it moved up."""
        unserved = {"modelId": cfg["unservedModel"]}
        first = await client.projects.create(_project(cfg, 1, **unserved))
        second = await client.projects.create(_project(cfg, 2, **unserved))
        waiting.append(second)
        seen = [second.queue_position]

        def updated(_keys: Any) -> None:
            if seen[-1] != second.queue_position:
                seen.append(second.queue_position)

        second.on("updated", updated)
        await _until(
            lambda: first.queue_position == 0 and second.queue_position == 1,
            4,
            lambda: f"queue positions {first.queue_position}, {second.queue_position}",
        )
        await first.cancel()
        await _until(lambda: second.queue_position == 0, 4, "the second project moving up")
        return {"first": first.queue_position, "seen": seen}

    async def failed() -> dict[str, Any]:
        """Every image of the waiting project fails (no node): the error raised and the
        project's error once the project-level jobError came carry the images' own reason."""
        (project,) = waiting
        rejected: dict[str, Any] | None = None
        try:
            await project.wait_for_completion(timeout=TIMEOUT)
        except ProjectError as exc:
            rejected = exc.error
        await asyncio.sleep(0.5)  # the project-level jobError follows the images' own
        return {
            "status": project.status,
            "rejected": _error_of(rejected),
            "projectError": _error_of(project.error),
            "jobErrors": [_error_of(job.error) for job in project.jobs],
        }

    await step("auth", auth)
    await step("models", models)
    await step("render", render_and_download)
    await step("reconnect", reconnect)
    await step("cancel", cancel)
    await step("queue", queue)
    if waiting:
        await step("failed", failed)
    out["final_balance"] = _spark(await client.account.refresh_balance())
    await client.aclose()


async def recover(cfg: dict[str, Any]) -> dict[str, Any]:
    """An app restarts (a new client, the same appId) while its project waits in the queue:
    `authenticated` lists the project in `activeProjects`, the SDK tracks it again and its
    events follow (here: its images fail, no node serves the model)."""
    app_id = cfg["appId"] + "-recover"
    before = await _client(cfg, cfg["key"], app_id)
    try:
        await before.projects.wait_for_models(timeout=15)
        project = await before.projects.create(_project(cfg, 2, modelId=cfg["unservedModel"]))
        await _until(lambda: project.status == "queued", 4, "queued")
    finally:
        await before.aclose()
    after = await _client(cfg, cfg["key"], app_id)
    recovered: list[dict[str, Any]] = []
    after.projects.on("activeProjectsRecovered", lambda found: recovered.extend(found))
    try:
        tracked = await _until(
            lambda: next((p for p in after.projects.tracked_projects if p.id == project.id), None),
            10,
            "the project tracked again",
        )
        rejected: dict[str, Any] | None = None
        try:
            await tracked.wait_for_completion(timeout=TIMEOUT)
        except ProjectError as exc:
            rejected = exc.error
        mine = next((r for r in recovered if r.get("id") == project.id), None)
        return {
            "ok": True,
            "id": project.id,
            "recovered": mine
            and {
                "model": (mine.get("model") or {}).get("id"),
                "imageCount": mine.get("imageCount"),
                "status": mine.get("status"),
                "appId": mine.get("appId"),
            },
            "params": {
                "modelId": tracked.params.get("modelId"),
                "numberOfMedia": tracked.params.get("numberOfMedia"),
            },
            "status": tracked.status,
            "rejected": _error_of(rejected),
        }
    finally:
        await after.aclose()


async def insufficient(cfg: dict[str, Any]) -> dict[str, Any]:
    client = await _client(cfg, cfg["poorKey"], cfg["appId"] + "-poor")
    try:
        await client.projects.wait_for_models(timeout=15)
        project = await client.projects.create(_project(cfg, 1))
        try:
            urls = await project.wait_for_completion(timeout=TIMEOUT)
            return {"ok": False, "error": f"rendered {len(urls)} without funds"}
        except ProjectError as exc:
            return {"ok": True, "code": exc.code, "message": str(exc)}
    finally:
        await client.aclose()


async def over_limit(cfg: dict[str, Any]) -> dict[str, Any]:
    """A funded key whose daily limit is below one image's price."""
    client = await _client(cfg, cfg["limitKey"], cfg["appId"] + "-limit")
    try:
        await client.projects.wait_for_models(timeout=15)
        project = await client.projects.create(_project(cfg, 1))
        try:
            urls = await project.wait_for_completion(timeout=TIMEOUT)
            return {"ok": False, "error": f"rendered {len(urls)} over the daily limit"}
        except ProjectError as exc:
            return {"ok": True, "code": exc.code, "message": str(exc)}
    finally:
        await client.aclose()


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = (("bad_key", bad_key), ("insufficient", insufficient), ("over_limit", over_limit))
    for name, fn in steps:
        try:
            out[name] = await fn(cfg)
        except Exception as exc:
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        await main_flow(cfg, out)
    except Exception as exc:
        out["main_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    try:
        out["recover"] = await recover(cfg)
    except Exception as exc:
        out["recover"] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(limit=6)[-1500:],
        }
    return out


if __name__ == "__main__":
    result = asyncio.run(run(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
