"""Sogni's official Python SDK (`sogni-client` 5.70.0, unmodified): the calls of the
conformance review (tests/gateway/test_conformance_sdk.py), run in its own process like
py_sdk_scenarios.py (the SDK is asyncio and pins `websockets<17`).

argv[1]: JSON `{url, key, appId, otherAppId, model}`. Prints one JSON object on its last line
of stdout: each step's outcome (`ok` plus what the test checks, or `error`); a step that
fails records its error and the next one still runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from sogni_client import SogniClient

PROMPT = "a red circle on a blue background"


async def _client(cfg: dict[str, Any], app_id: str) -> Any:
    return await SogniClient.create(
        api_key=cfg["key"],
        app_id=app_id,
        rest_endpoint=cfg["url"],
        socket_endpoint=cfg["url"].replace("http://", "ws://", 1),
        network="fast",
    )


async def _step(out: dict[str, Any], name: str, body: Callable[[], Awaitable[Any]]) -> None:
    try:
        out[name] = {"ok": True, "value": await asyncio.wait_for(body(), 30)}
    except BaseException as exc:  # recorded: the test reports every step
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        traceback.print_exc(file=sys.stderr)


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = await _client(cfg, cfg["appId"])
    other = await _client(cfg, cfg["otherAppId"])
    try:

        async def models() -> list[str]:
            return sorted(m["id"] for m in await client.projects.wait_for_models(timeout=10))

        await _step(out, "models", models)

        async def switched() -> dict[str, Any]:
            network = await client.account.switch_network("relaxed")
            listed = await client.projects.wait_for_models(timeout=5)
            return {"network": network, "models": sorted(m["id"] for m in listed)}

        await _step(out, "switch_then_wait_for_models", switched)

        async def available() -> list[dict[str, Any]]:
            got = await client.projects.get_available_models("relaxed")
            return [{"id": m["id"], "workerCount": m["workerCount"]} for m in got]

        await _step(out, "get_available_models", available)

        async def waiting_project() -> str:
            project = await client.projects.create(
                type="image",
                model_id=cfg["model"],
                positive_prompt=PROMPT,
                number_of_media=1,
            )
            await asyncio.sleep(1.0)  # accepted: its `queued` came back
            return str(project.id)

        await _step(out, "create", waiting_project)

        async def synced() -> list[str]:
            result = await client.projects.sync()
            return [p["id"] for p in result["snapshot"]["activeProjects"]]

        await _step(out, "sync", synced)

        async def elsewhere() -> list[dict[str, Any]]:
            got = await other.projects.list_projects_elsewhere()
            return [{"id": p["id"], "appId": p["appId"]} for p in got]

        await _step(out, "list_projects_elsewhere", elsewhere)
    finally:
        await client.aclose()
        await other.aclose()
    return out


async def restarted(cfg: dict[str, Any]) -> dict[str, Any]:
    """An app renders a project, then stops at once (before it stored the URLs, say) and
    starts again with the same app id: the new client rebuilds the project from
    `authenticated.unclaimedCompletedProjects` and has its result URLs."""
    out: dict[str, Any] = {}
    first = await _client(cfg, cfg["appId"])
    try:

        async def rendered() -> dict[str, Any]:
            await first.projects.wait_for_models(timeout=10)
            project = await first.projects.create(
                type="image", model_id=cfg["model"], positive_prompt=PROMPT, number_of_media=2
            )
            urls = await project.wait_for_completion(timeout=60)
            return {"id": str(project.id), "urls": len(urls)}

        await _step(out, "first", rendered)
    finally:
        await first.aclose()
    again = await _client(cfg, cfg["appId"])
    try:

        async def recovered() -> dict[str, Any]:
            job = out["first"]["value"]["id"]
            while True:  # rebuilt from `authenticated`, in the background of `create`
                found = [p for p in again.projects.tracked_projects if p.id == job]
                if found and found[0].finished:
                    break
                await asyncio.sleep(0.1)
            return {
                "id": found[0].id,
                "status": str(found[0].status),
                "recovered": bool(found[0].recovered),
                "urls": list(found[0].result_urls),
            }

        await _step(out, "restarted", recovered)
    finally:
        await again.aclose()
    return out


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    run = restarted if config.get("mode") == "restart" else main
    print(json.dumps(asyncio.run(run(config))))
