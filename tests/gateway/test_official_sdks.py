"""Sogni's official client SDKs, unmodified, render against a live local network.

A coordinator (gateway on its HTTP listener, 127.0.0.1, a free port) and a real node with the
embedded trained model run in this process; an API key is created and credited like an
operator would. Each SDK then runs in its own process (the Python SDK is asyncio and pins
`websockets<17`: it is installed in `.cache/sogni-sdk-py`, outside the venv; the JS SDK is
pinned in tests/gateway/sdk/js/package-lock.json) and goes through: a wrong key, a project
without funds, one over its key's daily limit, auth, models, two images rendered and
downloaded without auth headers, a forged URL, a socket dropped mid-project with the request
re-sent (charged once), a cancel, queue positions (a model the gateway offers and no node
serves: its projects wait), a project whose every image fails (the real reason reaches the
app, not a generic one) and an app restarted while its project waits (listed in
`authenticated.activeProjects`, tracked again by the new client).
`make test` installs both SDKs. The scenarios are in tests/gateway/sdk/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_protocol.pricing import MICRO
from tests.e2e.conftest import MODEL as UNSERVED

ROOT = Path(__file__).resolve().parents[2]
SDK = Path(__file__).resolve().parent / "sdk"
PY_SDK_DIR = ROOT / ".cache" / "sogni-sdk-py"
JS_DIR = SDK / "js"
CREDIT_SPARK = 50
SDK_DEADLINE = 150.0
"""Seconds one SDK's scenarios may take (about 30 s here); past it the test fails."""
NO_NODE_GRACE = 5.0
"""Seconds the unserved model's images wait before they fail (`no_node_grace`): long
enough to see their queue positions, short enough for the test."""
NO_WORKERS = "noWorkers"
"""The code of an image no connected node can render (`gateway.failures`)."""

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sogni_coordinator.gateway") is None,
    reason="the SDK gateway (sogni_coordinator.gateway) is not built yet",
)


def _runner(sdk: str, cfg: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run one SDK's scenarios; skips when the SDK is not
    installed (`make test` installs both)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    if sdk == "python":
        if not (PY_SDK_DIR / "sogni_client").is_dir():
            pytest.skip(f"official Python SDK not installed in {PY_SDK_DIR} (run `make test`)")
        env["PYTHONPATH"] = str(PY_SDK_DIR)  # first: its websockets 16 shadows the venv's 17
        return [sys.executable, str(SDK / "py_sdk_scenarios.py"), json.dumps(cfg)], env
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@sogni-ai" / "sogni-client").is_dir():
        pytest.skip("official JS SDK or Node not installed (run `make test`)")
    return [node, str(JS_DIR / "scenarios.mjs"), json.dumps(cfg)], env


async def _start_node(net: Any, tmp: Path, backend: Any, model: str) -> trio.Event:
    """A real node serving `model`, connected to the net's coordinator."""
    from sogni_node.config import NodeConfig
    from sogni_node.daemon import run_node
    from sogni_wallet.keystore import Wallet

    acct = Account.create()
    config = NodeConfig(
        data_dir=tmp / "node",
        coordinators=[net.addr],
        trusted_coordinators=[net.signer.address],
        threads=1,
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
        http_listen="off",
    )
    connected, stop = trio.Event(), trio.Event()

    def on_event(event: dict[str, object]) -> None:
        if event["event"] == "connected":
            connected.set()

    async def run() -> None:
        await run_node(
            config,
            Wallet(acct.address, bytes(acct.key)),
            backend,
            [model],
            stop=stop,
            on_event=on_event,
        )

    net.nursery.start_soon(run)
    with trio.fail_after(30):
        await connected.wait()
    return stop


def _check(sdk: str, r: dict[str, Any], account: str, model: str) -> list[str]:
    """Every way the SDK's run fell short of the protocol, as readable lines."""
    bad: list[str] = []

    def need(cond: object, what: str) -> None:
        if not cond:
            bad.append(what)

    need("main_error" not in r, f"main flow crashed: {r.get('main_error')}")
    key = r.get("bad_key", {})
    need(key.get("refused") is True, f"a wrong key was not refused: {key}")
    if "create_error" not in key:  # (Python's create may raise on the close instead)
        need(
            key.get("closeCode") == 4021 or key.get("signedOut") is True,
            f"wrong key: socket close code {key.get('closeCode')} and not signed out",
        )
        status = key.get("meStatus", key.get("me_status"))
        need(status == 401, f"wrong key: /v1/account/me gave {status}")
    poor = r.get("insufficient", {})
    need(
        poor.get("ok") is True if sdk == "python" else poor.get("failed") is True,
        f"a project without funds did not fail: {poor}",
    )
    limited = r.get("over_limit", {})
    need(
        (limited.get("ok") if sdk == "python" else limited.get("failed")) is True
        and limited.get("code") == 4025,
        f"a project over the key's daily limit was not refused with 4025: {limited}",
    )
    for name in ("auth", "models", "render", "reconnect", "cancel"):
        step = r.get(name, {})
        need(
            step.get("ok"),
            f"{name} failed: {step.get('error')}\n{step.get('trace') or step.get('stack') or ''}",
        )
    auth = r.get("auth", {})
    need(
        str(auth.get("walletAddress", "")).lower() == account.lower(),
        f"/v1/account/me names {auth.get('walletAddress')}, not the key's account {account}",
    )
    models = r.get("models", {}).get("models", {})
    need((models.get(model) or 0) >= 1, f"{model} not listed with a worker: {models}")
    render = r.get("render", {})
    urls = render.get("urls") or []
    need(len(urls) == 2 and len(set(urls)) == 2, f"render gave {urls}, not two distinct URLs")
    for got in render.get("downloads") or []:
        need(
            got["status"] == 200 and got["png"] and str(got["type"]).startswith("image/png"),
            f"a result download gave {got}",
        )
    need(
        render.get("forgedStatus") in (403, 404), f"a forged URL gave {render.get('forgedStatus')}"
    )
    charged = render.get("charged") or 0
    need(charged > 0, f"two images were charged {charged} Spark")
    again = r.get("reconnect", {})
    need(len(again.get("urls") or []) == 2, f"after a reconnect: {again.get('urls')}")
    need(
        abs((again.get("charged") or 0) - charged) < 1e-6,
        f"the re-sent project was charged {again.get('charged')} Spark, one render costs {charged}",
    )
    cancel = r.get("cancel", {})
    need(
        "canceled" in str(cancel.get("outcome", "")).lower() and cancel.get("status") == "canceled",
        f"cancel: {cancel}",
    )
    need(0 <= (cancel.get("charged") or 0) <= 2 * charged, f"a canceled project cost {cancel}")
    for name in ("queue", "failed", "recover"):
        step = r.get(name, {})
        need(
            step.get("ok"),
            f"{name} failed: {step.get('error')}\n{step.get('trace') or step.get('stack') or ''}",
        )
    queue = r.get("queue", {})
    need(queue.get("first") == 0, f"the first queued project is not at position 0: {queue}")
    need(
        (queue.get("seen") or [])[-2:] == [1, 0],
        f"the second project's queue positions went {queue.get('seen')}, not 1 then 0",
    )
    failed = r.get("failed", {})
    need(failed.get("status") == "failed", f"a project with no image made: {failed}")
    real = {"code": 5000, "originalCode": NO_WORKERS}
    for what in ("rejected", "projectError"):  # the project's error once the project-level
        got = failed.get(what) or {}  # jobError came: it used to be a generic one
        need(
            {k: got.get(k) for k in real} == real and "no connected node" in str(got["message"]),
            f"a project whose images all failed (no node): {what} is {got}, not the real reason",
        )
    need(
        len(failed.get("jobErrors") or []) == 2
        and all((e or {}).get("originalCode") == NO_WORKERS for e in failed["jobErrors"]),
        f"its images' errors: {failed.get('jobErrors')}",
    )
    again = r.get("recover", {})
    need(
        again.get("params") == {"modelId": UNSERVED, "numberOfMedia": 2},
        f"a restarted app did not track its waiting project again: {again}",
    )
    listed = again.get("recovered")  # (the SDK's event may fire before the app listens)
    entry = {"model": UNSERVED, "imageCount": 2, "status": "queued"}
    need(
        listed is None or listed == {**entry, "appId": f"sogni-test-{sdk}-recover"},
        f"activeProjects entry: {listed}",
    )
    need(
        again.get("status") == "failed"
        and (again.get("rejected") or {}).get("originalCode") == NO_WORKERS,
        f"the recovered project's events did not follow: {again}",
    )
    return bad


@pytest.mark.parametrize("sdk", ["python", "javascript"])
async def test_official_sdk_renders_through_the_gateway(tmp_path: Path, sdk: str) -> None:
    from sogni_coordinator.api_keys import ApiKeys
    from sogni_coordinator.ledger import Ledger
    from sogni_node.models.defaults import default_registry
    from sogni_node.models.registry import SHAPES_MODEL_ID
    from sogni_node.render.diffusers_backend import DiffusersBackend
    from tests.e2e.conftest import start_net

    model = SHAPES_MODEL_ID  # the trained embedded model
    cfg: dict[str, Any] = {
        "model": model,
        "unservedModel": UNSERVED,
        "appId": f"sogni-test-{sdk}",
        "cancelSteps": None,
    }
    command, env = _runner(sdk, cfg)  # skip before starting anything
    backend = DiffusersBackend(default_registry(tmp_path / "models"), device="cpu", threads=1)
    models = [model, UNSERVED]  # the node renders the first only
    async with start_net(tmp_path, models=models, no_node_grace=NO_NODE_GRACE) as net:
        assert net.coordinator.http_url, "the coordinator serves no HTTP listener"
        keys = ApiKeys(net.config.database)
        ledger = Ledger(net.config.database)
        try:
            key, account = keys.create(f"{sdk} sdk test")
            poor_key, poor_account = keys.create(f"{sdk} sdk test, no funds")
            limit_key, limit_account = keys.create(f"{sdk} sdk test, limited", 0.001)
            for funded in (account, limit_account):
                ledger.credit_purchase(funded, CREDIT_SPARK)
            await _start_node(net, tmp_path, backend, model)
            cfg |= {
                "url": net.coordinator.http_url.rstrip("/"),
                "key": key,
                "poorKey": poor_key,
                "limitKey": limit_key,
                "badKey": "sk-sogni-" + "x" * 43,
            }
            command, env = _runner(sdk, cfg)
            with trio.fail_after(SDK_DEADLINE):
                done = await trio.run_process(
                    command,
                    capture_stdout=True,
                    capture_stderr=True,
                    env=env,
                    check=False,
                    cwd=str(JS_DIR if sdk == "javascript" else ROOT),
                )
            stdout = done.stdout.decode(errors="replace").strip()
            stderr = done.stderr.decode(errors="replace")[-3000:]
            assert done.returncode == 0 and stdout, (
                f"{sdk} SDK run exited {done.returncode}\n{stdout[-2000:]}\n{stderr}"
            )
            result = json.loads(stdout.splitlines()[-1])
            print(f"{sdk} SDK outcome:", json.dumps(result, indent=1)[:6000])  # shown on failure
            problems = _check(sdk, result, account, model)
            # the ledger agrees with what the SDK was told, and the key without funds paid nothing
            held = ledger.balance(account)
            in_ledger = (held["spark_paid"] + held["spark_free"]) / MICRO
            told = result.get("final_balance")
            if abs(in_ledger - float(told if told is not None else -1)) > 1e-6:
                problems.append(f"ledger holds {in_ledger} Spark, the SDK was told {told}")
            if ledger.balance(limit_account)["spark_paid"] != CREDIT_SPARK * MICRO:
                problems.append(f"the key over its limit paid: {ledger.balance(limit_account)}")
            if any(ledger.balance(poor_account).values()) or ledger.reserved_for(poor_account) != {
                "spark_paid": 0,
                "spark_free": 0,
                "sogni": 0,
            }:
                problems.append(
                    f"the key without funds moved money: {ledger.balance(poor_account)}"
                )
            assert not problems, (
                f"{sdk} SDK against the gateway:\n- "
                + "\n- ".join(problems)
                + f"\n\nstderr:\n{stderr}"
            )
        finally:
            keys.close()
            ledger.close()
