"""The stable log events (docs/EVENTS.md) and `/healthz`, read the way an operator reads them.

A real coordinator and node in-process, HTTP listeners on free ports of 127.0.0.1, logs as
the JSON lines the daemons write to stderr, `/healthz` fetched over real HTTP.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from starlette.applications import Starlette
from starlette.routing import Route

from sogni_app.api import render
from sogni_net import TransportError, health_endpoint, parse_listen, serve_http
from sogni_protocol.logs import configure_logging

from .conftest import MODEL, start_net, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")

STABLE: dict[str, set[str]] = {
    "host_started": {"peer", "addrs"},
    "http_started": {"url"},
    "coordinator_ready": {"peer", "addrs", "signer", "http"},
    "node_ready": {"peer", "addrs", "wallet", "device", "slots", "coordinators", "http"},
    "coordinator_connected": {"coordinator", "peer"},
    "job_started": {"job", "model", "steps"},
    "job_finished": {"job", "outcome", "seconds", "steps"},
}


@pytest.fixture
def json_logs() -> Iterator[None]:
    """JSON lines on stderr, as a daemon logs when not on a terminal; levels restored after."""
    levels = {
        name: logging.getLogger(name).level
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("sogni", "bench", "hypercorn"))
    }
    configure_logging("info", json=True)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def with_fields(seen: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Events called `name` that carry every stable field of it."""
    return [e for e in seen if e.get("event") == name and STABLE[name] <= e.keys()]


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 and friends still carry the JSON body
        return exc.code, json.loads(exc.read())


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    return await trio.to_thread.run_sync(get, url)


async def test_stable_events_and_healthz_of_both_daemons(
    tmp_path: Path, backend: Any, json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async with start_net(tmp_path) as net:
        coordinator_url = net.coordinator.http_url
        assert coordinator_url is not None and coordinator_url.startswith("http://127.0.0.1:")
        code, body = await get_json(coordinator_url + "/healthz")
        assert code == 200 and body["status"] == "degraded" and body["nodes"] == 0

        node = await net.add_node(backend, "node0")
        assert node.http is not None and node.http.startswith("http://127.0.0.1:")
        with trio.fail_after(60):
            result = await render(net.addr, tiny_request(1))
        assert len(result.images) == 1

        code, body = await get_json(coordinator_url + "/healthz")
        assert code == 200
        assert body["status"] == "ok" and body["role"] == "coordinator"
        assert body["peerId"] == net.coordinator.peer_id
        assert body["signer"] == net.signer.address
        assert (body["nodes"], body["queuedJobs"]) == (1, 0)
        assert body["uptimeSeconds"] >= 0

        code, body = await get_json(node.http + "/healthz")
        assert code == 200
        assert body["status"] == "ok" and body["role"] == "node"
        assert body["wallet"] == node.wallet.address
        assert (body["coordinators"], body["configuredCoordinators"]) == (1, 1)
        assert (body["slots"], body["runningJobs"]) == (1, 0)

        node.stop.set()
        with trio.fail_after(20):
            await node.done.wait()

    seen = events(capsys.readouterr().err)
    for name in STABLE:
        assert with_fields(seen, name), f"no {name} event with fields {sorted(STABLE[name])}"
    (ready,) = with_fields(seen, "coordinator_ready")
    assert ready["signer"] == net.signer.address and ready["http"] == coordinator_url
    assert ready["addrs"] == net.coordinator.addrs
    (node_ready,) = with_fields(seen, "node_ready")
    assert node_ready["http"] == node.http and node_ready["wallet"] == node.wallet.address
    urls = {e["url"] for e in with_fields(seen, "http_started")}
    assert urls == {coordinator_url, node.http}
    hosts = {e["peer"] for e in with_fields(seen, "host_started")}
    assert {net.coordinator.peer_id, node_ready["peer"]} <= hosts
    (connected,) = with_fields(seen, "coordinator_connected")
    assert connected == connected | {
        "coordinator": net.signer.address,
        "peer": net.coordinator.peer_id,
    }
    (started,) = with_fields(seen, "job_started")
    (finished,) = with_fields(seen, "job_finished")
    assert started["job"] == finished["job"] == result.images[0].job_id.hex()[:16]
    assert (started["model"], started["steps"]) == (MODEL, 3)
    assert finished["outcome"] == "done" and finished["steps"] == 3
    assert 0 < finished["seconds"] < 60
    # Never a prompt in an event.
    prompt = tiny_request(1).positive_prompt
    assert not [e for e in seen if prompt in json.dumps(e)]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_listener_reports_its_port_503_when_unhealthy_and_refuses_a_taken_port() -> None:
    status = {"status": "draining", "role": "node"}
    app = Starlette(routes=[Route("/healthz", health_endpoint(lambda: status))])
    wanted = ["127.0.0.1:0"] + (["[::1]:0"] if has_ipv6_loopback() else [])
    async with trio.open_nursery() as nursery:
        for listen in wanted:
            url: str = await nursery.start(serve_http, app, listen)
            _, port = parse_listen(url.removeprefix("http://")) or ("", 0)
            assert port > 0 and url.startswith("http://" + listen.removesuffix(":0"))
            assert await get_json(url + "/healthz") == (503, status)
            with pytest.raises(TransportError, match=r"cannot listen for HTTP on .*in use"):
                await serve_http(app, f"{listen.removesuffix(':0')}:{port}")
        status["status"] = "ok"
        assert (await get_json(url + "/healthz"))[0] == 200
        nursery.cancel_scope.cancel()


def test_listen_values() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:9860") == ("localhost", 9860)
    assert parse_listen(" off ") is None and parse_listen("OFF") is None
    for bad, why in [
        ("8080", "not host:port"),
        (":8080", "not host:port"),
        ("::1:8080", "in brackets"),
        ("[nope]:1", "not an IPv6 address"),
        ("127.0.0.1:65536", "port must be 0-65535"),
        ("127.0.0.1:http", "port must be"),
        ("a b:80", "not a host name"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_listen(bad)
