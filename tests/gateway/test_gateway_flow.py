"""The SDK gateway against a live in-process network: a real coordinator and a real node
rendering the tiny model on 127.0.0.1, driven by `sdk_wire` as the official SDKs drive it."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.ledger import Ledger
from tests.e2e.conftest import MODEL, SlowBackend, start_net

from .conftest import create_key
from .sdk_wire import SdkSocket, connect, job_request

TINY = {"steps": 3, "sizePreset": "custom", "width": 64, "height": 64}


async def _close_code(next_frame: Callable[[], Awaitable[object]], seconds: float = 10) -> int:
    """Read frames until the gateway closes the socket: its close code."""
    with trio.fail_after(seconds):
        try:
            while True:
                await next_frame()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return int(exc.reason.code)


def _key(net: Any, name: str = "app", **kw: Any) -> tuple[str, str]:
    return create_key(net.config.database, name, **kw)


def _credit(net: Any, account: str, spark: int) -> None:
    ledger = Ledger(net.config.database)
    try:
        ledger.credit_purchase(account, spark)
    finally:
        ledger.close()


def _spark(net: Any, account: str) -> int:
    ledger = Ledger(net.config.database)
    try:
        have = ledger.balance(account)
    finally:
        ledger.close()
    return have["spark_free"] + have["spark_paid"]


async def test_sdk_flow_auth_models_images_download_errors(tmp_path: Path, backend: Any) -> None:
    async with start_net(tmp_path) as net:
        await net.add_node(backend, "node0")
        url = net.coordinator.http_url
        assert url is not None
        key, account = _key(net)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # a wrong key: 401 on REST, 4021 on the socket
            bad = await http.get("/v1/account/me", headers={"api-key": "sk_wrong-key-123"})
            assert bad.status_code == 401 and bad.json()["status"] == "error"
            async with connect(url, "sk_wrong-key-123") as ws:
                assert await ws.close_code() == 4021

            auth = {"api-key": key}
            me = (await http.get("/v1/account/me", headers=auth)).json()
            assert me["status"] == "success" and me["data"]["walletAddress"] == account
            models = (await http.get("/api/v1/models/list", headers=auth)).json()
            assert [m["id"] for m in models] == [MODEL] and models[0]["media"] == "image"
            tiers = (await http.get("/api/v2/models/tiers", headers=auth)).json()
            assert tiers[models[0]["tier"]]["steps"]["default"] == 4

            async with connect(url, key) as ws:
                kind, hello = await ws.next()
                assert kind == "authenticated" and hello["address"] == account
                assert await ws.until("swarmModels") == {MODEL: 1}

                # no balance yet: a project-level error, nothing rendered
                broke = job_request(MODEL, 2, **TINY)
                await ws.send("jobRequest", broke)
                frames = await ws.project(broke["jobID"])
                assert frames[-1][0] == "jobError" and frames[-1][1]["error"] == 4024

                # unknown model, out-of-range steps, bad size: clear errors
                for frame, words in (
                    ({"modelID": "no-such-model"}, "unknown model"),
                    ({"steps": 500}, "steps must be"),
                    ({"sizePreset": "custom", "width": 100, "height": 64}, "multiples of 8"),
                ):
                    req = job_request(MODEL, 1, **frame)
                    await ws.send("jobRequest", req)
                    err = (await ws.project(req["jobID"]))[-1][1]
                    assert words in err["error_message"]

                _credit(net, account, 1)
                before = _spark(net, account)
                req = job_request(MODEL, 2, **TINY)
                await ws.send("jobRequest", req)
                frames = await ws.project(req["jobID"])
                results = [d for k, d in frames if k == "jobResult"]
                assert len(results) == 2 and frames[-1][1]["type"] == "jobCompleted"
                assert len({r["imgID"] for r in results}) == 2
                assert any(k == "jobProgress" for k, _ in frames)
                update = await ws.until("balanceUpdate")
                spent = before - _spark(net, account)
                assert 0 < spent < 1_000_000
                assert float(update["spark"]["net"]) * 1_000_000 == before - spent

            # a key's daily spend limit, and a revoked key
            capped, capped_account = _key(net, "capped", daily_limit_spark=0.000001)
            _credit(net, capped_account, 1)
            async with connect(url, capped) as ws:
                req = job_request(MODEL, 1, **TINY)
                await ws.send("jobRequest", req)
                assert (await ws.project(req["jobID"]))[-1][1]["error"] == 4025
            assert _spark(net, capped_account) == 1_000_000
            keys = ApiKeys(net.config.database)
            try:
                record = keys.lookup(capped)
                assert record is not None and keys.revoke(record.key_id)
            finally:
                keys.close()
            async with connect(url, capped) as ws:
                assert await ws.close_code() == 4021
            revoked = await http.get("/v1/account/me", headers={"api-key": capped})
            assert revoked.status_code == 401

        # downloads: no auth header, right content type, a tampered URL refused
        async with httpx.AsyncClient(timeout=30) as plain:
            for result in results:
                got = await plain.get(result["resultUrl"])
                assert got.status_code == 200 and got.headers["content-type"] == "image/png"
                assert got.content.startswith(b"\x89PNG")
            forged = results[0]["resultUrl"].replace("sig=", "sig=0")
            assert (await plain.get(forged)).status_code == 403
            other = results[0]["resultUrl"].replace(results[0]["imgID"], results[1]["imgID"])
            assert (await plain.get(other)).status_code == 403
            balance = await plain.get(url + "/v4/account/balance", headers={"api-key": key})
            assert balance.json()["data"]["spark"]["net"] == update["spark"]["net"]

            # failed authentications are limited per address
            codes = [
                (
                    await plain.get(url + "/v1/account/me", headers={"api-key": f"sk_bad{i:06d}"})
                ).status_code
                for i in range(22)
            ]
            assert codes[0] == 401 and codes[-1] == 429
            assert (await plain.get(url + "/v1/account/me", headers=auth)).status_code == 429


async def test_hostile_frames_close_the_socket_not_the_gateway(
    tmp_path: Path, backend: Any
) -> None:
    async with start_net(tmp_path) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = _key(net)
        raw = [
            ("not json", 1008),
            (json.dumps([1, 2]), 1008),
            (json.dumps({"type": "jobRequest", "data": "%%%not-base64"}), 1008),
            (json.dumps({"type": "jobRequest", "data": base64.b64encode(b"[1]").decode()}), 1008),
            (
                json.dumps({"type": "jobRequest", "data": base64.b64encode(b"\xff\xfe").decode()}),
                1008,
            ),
            (json.dumps({"type": "jobRequest", "data": "A" * 400_000}), 1009),
            (b"\x00binary", 1003),
            # nesting that would overflow the C stack under the process's recursion limit
            (
                json.dumps(
                    {
                        "type": "jobRequest",
                        "data": base64.b64encode(b"[" * 50_000 + b"]" * 50_000).decode(),
                    }
                ),
                1008,
            ),
        ]
        for frame, code in raw:
            async with open_websocket_url(
                SdkSocket.url(url), extra_headers=[(b"api-key", key.encode())]
            ) as ws:
                await ws.send_message(frame)
                assert await _close_code(ws.get_message) == code, frame[:40]
        # the gateway still serves, and re-sends the worker counts when a node joins
        async with connect(url, key) as sdk:
            assert (await sdk.next())[0] == "authenticated"
            assert await sdk.until("swarmModels") == {}
            await net.add_node(backend, "node0")
            assert await sdk.until("swarmModels", timeout=20) == {MODEL: 1}


async def test_a_session_that_fails_on_this_side_closes_1011_and_the_gateway_serves_on(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A database outage (or a bug) inside one socket's session: that socket closes with
    1011, after which the SDKs reconnect (with 1000 they would not, and their projects would
    wait forever), one log line names the error's type, and the gateway serves the next."""
    from structlog.testing import capture_logs

    from sogni_coordinator.gateway.core import Gateway

    async with start_net(tmp_path) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = _key(net)
        balances = Gateway.balances
        failing = [True]

        async def flaky(self: Gateway, account: str) -> Any:
            if failing[0]:
                raise OSError("the database is away")
            return await balances(self, account)

        monkeypatch.setattr(Gateway, "balances", flaky)
        with capture_logs() as logs:
            async with open_websocket_url(
                SdkSocket.url(url), extra_headers=[(b"api-key", key.encode())]
            ) as ws:
                assert await _close_code(ws.get_message) == 1011
        (failed,) = [e for e in logs if e["event"] == "gateway_session_failed"]
        assert failed["error"] == "OSError" and "away" not in str(failed)
        failing[0] = False
        async with connect(url, key) as sdk:
            assert (await sdk.next())[0] == "authenticated"


async def test_a_job_request_that_fails_on_this_side_is_told_to_be_resent(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A jobRequest meets a database outage (or a bug): before the socket closes with 1011
    the SDK is sent `jobError` 1001 without `imgID` for it ("server restarting"), so it
    re-sends the request after reconnecting. Before, it waited for a project nobody had
    (about six minutes, until its watchdog failed it)."""
    from sogni_coordinator.gateway.core import Gateway

    async def away(*args: Any, **kwargs: Any) -> Any:
        raise OSError("the database is away")

    monkeypatch.setattr(Gateway, "open_project", away)
    async with start_net(tmp_path, models=[MODEL]) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = _key(net)
        request = job_request(MODEL, 1)
        async with connect(url, key) as sdk:
            await sdk.send("jobRequest", request)
            assert await _close_code(sdk.next) == 1011
    errors = [data for name, data in sdk.frames if name == "jobError"]
    assert errors == [
        {
            "jobID": request["jobID"],
            "error": 1001,
            "error_message": errors[0]["error_message"],
            "isFromWorker": False,
        }
    ]


async def test_a_coordinator_that_stops_closes_its_sdk_sockets_1012(tmp_path: Path) -> None:
    """The coordinator stops (SIGTERM, a restart) while an SDK is connected: its socket
    closes with 1012, after which the SDKs reconnect and their projects stream again. With
    1000 (what a cancelled session used to send) they never reconnect and every project in
    flight waits forever."""
    from eth_account import Account

    from sogni_coordinator.config import CoordinatorConfig
    from sogni_coordinator.service import Signer, run_coordinator

    acct = Account.create()
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator", listen="/ip4/127.0.0.1/tcp/0", http_listen="127.0.0.1:0"
    )
    key, _ = create_key(config.database)
    stopping = trio.CancelScope()

    async def coordinator(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with stopping:
            await run_coordinator(
                config, Signer(acct.address, bytes(acct.key)), task_status=task_status
            )

    async with trio.open_nursery() as nursery:
        running = await nursery.start(coordinator)
        assert running.http_url is not None
        async with open_websocket_url(
            SdkSocket.url(running.http_url), extra_headers=[(b"api-key", key.encode())]
        ) as ws:
            await ws.get_message()  # authenticated
            stopping.cancel()
            assert await _close_code(ws.get_message) == 1012


async def test_an_address_blocked_for_failed_keys_is_told_to_come_back_not_signed_out(
    tmp_path: Path,
) -> None:
    """Past `failed_auth_per_minute` failed keys from one address (behind a TLS proxy: every
    app's), a socket is closed with 1013 before any lookup: the SDKs reconnect with backoff.
    A 4000-4999 code (4029 before) signs every app behind that address out for good."""
    from sogni_coordinator.gateway.config import GatewayConfig

    async with start_net(tmp_path, gateway=GatewayConfig(failed_auth_per_minute=1)) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = _key(net)
        for presented, code in (("sk-not-a-key-of-this-network", 4021), (key, 1013)):
            async with open_websocket_url(
                SdkSocket.url(url), extra_headers=[(b"api-key", presented.encode())]
            ) as ws:
                assert await _close_code(ws.get_message) == code


async def test_a_sogni_paid_project_counts_its_spark_price_against_the_daily_limit(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The daily limit is in Spark. A project paid in SOGNI (worth 10x a Spark here) is
    counted at its Spark list price: before, the reservation's Spark was "corrected" to the
    charged micro-SOGNI, so the key spent 10x its limit."""
    from sogni_coordinator.api_keys import ApiKeys
    from sogni_protocol import catalog

    priced = tmp_path / "catalog.toml"
    text = (catalog.DEFAULT_CATALOG).read_text()
    priced.write_text(text.replace("sogni_usd_price = 0.005", "sogni_usd_price = 0.05", 1))
    assert priced.read_text() != text
    monkeypatch.setenv("SOGNI_CATALOG", str(priced))
    catalog.default_catalog.cache_clear()
    try:
        async with start_net(tmp_path, models=[MODEL]) as net:
            url = net.coordinator.http_url
            assert url is not None
            key, account = _key(net, daily_limit_spark=100.0)
            ledger = Ledger(net.config.database)
            try:
                ledger.deposit_sogni(account, 10**9)
            finally:
                ledger.close()
            req = job_request(MODEL, 1, steps=4, sizePreset="custom", width=64, height=64)
            req["tokenType"] = "sogni"
            async with connect(url, key) as sdk:
                await sdk.until("swarmModels")
                await sdk.send("jobRequest", req)
                await sdk.until("jobState", type="queued", timeout=20)
            keys = ApiKeys(net.config.database)
            try:
                spent = keys.spent_today(account)
            finally:
                keys.close()
            with sqlite3.connect(net.config.database) as db:
                ((token, charged),) = db.execute(
                    "SELECT token_type, amount FROM ledger_reservations"
                ).fetchall()
            assert token == "sogni" and charged > 0
            assert spent >= 9 * charged  # Spark, worth a tenth of SOGNI each: not micro-SOGNI
    finally:
        catalog.default_catalog.cache_clear()


async def test_an_api_key_holds_at_most_max_sockets_per_key_sockets(tmp_path: Path) -> None:
    """One key opening sockets under ever new appIds: past `max_sockets_per_key` the next is
    closed 1013 (each costs memory and a look at the swarm every second); the same appId
    reconnecting replaces its own socket and is never refused."""
    from sogni_coordinator.gateway.config import GatewayConfig

    async with start_net(tmp_path, gateway=GatewayConfig(max_sockets_per_key=1)) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = _key(net)
        async with connect(url, key, app_id="first") as first:
            assert (await first.next())[0] == "authenticated"
            async with open_websocket_url(
                SdkSocket.url(url, "second"), extra_headers=[(b"api-key", key.encode())]
            ) as ws:
                assert await _close_code(ws.get_message) == 1013
            async with connect(url, key, app_id="first") as again:  # replaces its own
                assert (await again.next())[0] == "authenticated"


async def test_reconnect_resumes_without_double_charge_then_cancel(
    tmp_path: Path, backend: Any
) -> None:
    slow = SlowBackend(backend, step_seconds=0.4)
    async with start_net(tmp_path) as net:
        await net.add_node(slow, "node0")
        url = net.coordinator.http_url
        assert url is not None
        key, account = _key(net)
        _credit(net, account, 1)
        before = _spark(net, account)
        req = job_request(MODEL, 2, steps=4, sizePreset="custom", width=64, height=64, seed=7)
        async with connect(url, key) as first:
            await first.send("jobRequest", req)
            await first.until("jobProgress", jobID=req["jobID"])
            held = before - _spark(net, account)
            assert held > 0
            # the SDK reconnects (same appId): the older socket is closed with 4015
            async with connect(url, key) as second:
                assert await first.close_code() == 4015
                # the new socket of the same app gets the project without asking (the SDKs do
                # not re-send an accepted jobRequest after a drop) ...
                while (await second.next())[1].get("jobID") != req["jobID"]:
                    pass
                await second.send("jobRequest", req)  # ... and a re-send adds nothing
                frames = await second.project(req["jobID"])
                results = [
                    d for k, d in second.frames if k == "jobResult" and d["jobID"] == req["jobID"]
                ]
                assert len(results) == 2 and frames[-1][1]["type"] == "jobCompleted"
                assert before - _spark(net, account) <= held  # charged once (refunds only)
                # the same jobID once more: replayed from memory, not rendered or charged
                spent = before - _spark(net, account)
                await second.send("jobRequest", req)
                again = await second.project(req["jobID"])
                assert [d["imgID"] for k, d in again if k == "jobResult"] == [
                    r["imgID"] for r in results
                ]
                assert before - _spark(net, account) == spent
                # a cancel of the finished project cancels nothing: its results still replay
                # (it said didCancel:true and turned every later replay into artistCanceled)
                await second.send("jobError", _cancel(req["jobID"]))
                nothing = await second.until("artistCancelConfirmation", jobID=req["jobID"])
                assert nothing["didCancel"] is False and "in flight" in nothing["error_message"]
                await second.send("jobRequest", req)
                replayed = await second.project(req["jobID"])
                assert [k for k, _ in replayed].count("jobResult") == 2

                # cancel: artistCancelConfirmation, then nothing more for that project
                slow.started = trio.Event()
                cancel = job_request(MODEL, 2, steps=20, sizePreset="custom", width=64, height=64)
                await second.send("jobRequest", cancel)
                await second.until("jobProgress", jobID=cancel["jobID"])
                await second.send("jobError", _cancel(cancel["jobID"]))
                confirm = await second.until("artistCancelConfirmation", jobID=cancel["jobID"])
                assert confirm["didCancel"] is True
                await second.until("balanceUpdate")  # the project's stream ended
                assert not any(
                    k == "jobResult" and d["jobID"] == cancel["jobID"] for k, d in second.frames
                )
                # the SDK re-sends the cancelled project (a reconnect before the confirmation
                # reached it): its final state, not `queued` and then silence
                await second.send("jobRequest", cancel)
                final = await second.project(cancel["jobID"])
                assert [k for k, _ in final] == ["artistCancelConfirmation", "jobError"]
                assert final[0][1]["didCancel"] is True
                assert final[1][1]["error"] == "artistCanceled" and "imgID" not in final[1][1]
                # the watchdog's list: nothing of this key is in flight any more
                async with httpx.AsyncClient(timeout=10) as http:
                    active = await http.get(
                        url + "/api/v1/artist/projects/active", headers={"api-key": key}
                    )
                assert active.status_code == 200 and active.json() == {"projects": []}

            # a project that ends while its app is away reaches the app's next socket
            store = net.coordinator.dispatcher.store
            done_before = store.counts().get("done", 0)
            away = job_request(MODEL, 2, steps=2, sizePreset="custom", width=64, height=64)
            async with connect(url, key, app_id="away") as gone:
                await gone.send("jobRequest", away)
                await gone.until("jobState", jobID=away["jobID"])  # accepted
            with trio.fail_after(60):
                while store.counts().get("done", 0) < done_before + 2:
                    await trio.sleep(0.1)
            async with connect(url, key, app_id="away") as back:
                frames = await back.project(away["jobID"])
                assert [k for k, _ in frames].count("jobResult") == 2
                assert frames[-1][1]["type"] == "jobCompleted"
            # written is not read (the socket may drop with it unread): a new socket of the
            # app within REPLAY_TOLD gets the same results again, the same images, nothing
            # rendered or charged (the SDKs ignore a project they finished)
            async with connect(url, key, app_id="away") as again:
                replay = await again.project(away["jobID"])
                assert [d["imgID"] for k, d in replay if k == "jobResult"] == [
                    d["imgID"] for k, d in frames if k == "jobResult"
                ]
                assert store.counts().get("done", 0) == done_before + 2


async def test_a_paid_project_is_recorded_resumable_before_it_is_submitted(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The record got its request id and resume token only after the dispatcher accepted
    (and charged) the request: a crash in between left a project the app could not resume
    while its request rendered and was charged. Now both are recorded first, from the hash
    the request is signed under (the dispatcher's id for a paid request)."""
    from sogni_coordinator.dispatch import Dispatcher

    seen: list[tuple[object, object]] = []
    submit = Dispatcher.submit

    async def checking(self: Dispatcher, req: Any, **kw: Any) -> Any:
        with sqlite3.connect(net.config.database) as db:  # the gateway's record, as it is
            seen.extend(db.execute("SELECT request_id, token_sealed FROM api_key_projects"))
        accepted = await submit(self, req, **kw)
        assert accepted.accepted.request_id == seen[0][0]  # the id recorded is the real one
        return accepted

    monkeypatch.setattr(Dispatcher, "submit", checking)
    async with start_net(tmp_path, models=[MODEL]) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, account = _key(net)
        _credit(net, account, 10)
        async with connect(url, key) as sdk:
            await sdk.until("swarmModels")
            await sdk.send("jobRequest", job_request(MODEL, 1, steps=4))
            await sdk.until("jobState", type="queued", timeout=20)
    assert len(seen) == 1 and seen[0][0] and seen[0][1]


def _cancel(job_id: str) -> dict[str, object]:
    """The SDKs' cancel of a project (a client-sent `jobError`)."""
    return {
        "jobID": job_id,
        "error": "artistCanceled",
        "error_message": "artistCanceled",
        "isFromWorker": False,
    }
