"""The SDKs' control frames are answered, not a 1008 close: `changeNetwork` (their
`switchNetwork`, which waits for the reply) switches the socket's network,
`setSocketEventSubscriptions` is acknowledged with the resulting set, `llmJobRequest` (chat)
gets `llmJobError`, and any other well-formed frame is ignored; `forceWorkerId` picks the
socket's first network (fast asked for fast, even where the operator's default is relaxed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sogni_coordinator.gateway.socket import MAX_IGNORED, network_of
from tests.e2e.conftest import start_net

from .conftest import create_key
from .sdk_wire import connect


async def test_control_frames_get_their_replies_and_the_socket_stays(tmp_path: Path) -> None:
    async with start_net(tmp_path) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = create_key(net.config.database, "app")
        async with connect(url, key) as ws:
            await ws.until("balanceUpdate")  # the hello is done
            await ws.send("changeNetwork", "relaxed")
            assert (await ws.until("changeNetwork"))["network"] == "relaxed"
            await ws.send("setSocketEventSubscriptions", {"subscriptions": {"projectQueue": True}})
            got = await ws.until("socketEventSubscriptionsUpdated")
            assert got["socketEventSubscriptions"] == {"projectQueue": True}
            await ws.send("llmJobRequest", {"jobID": "chat1", "model": "any-llm"})
            refused = await ws.until("llmJobError")
            assert refused["jobID"] == "chat1" and refused["error"] == "llmNotSupported"
            await ws.send("someFutureEvent", {"x": 1})  # ignored
            await ws.send("changeNetwork", "fast")  # still open: answered
            assert (await ws.until("changeNetwork"))["network"] == "fast"
            for _ in range(MAX_IGNORED):  # a flood of them, not an SDK: closed
                await ws.send("someFutureEvent", {"x": 1})
            assert await ws.close_code() == 1008


def test_force_worker_id_picks_the_network() -> None:
    relaxed_default = SimpleNamespace(default_network="relaxed")
    assert network_of("fast", relaxed_default) == "fast"  # it was the default: relaxed
    assert network_of("", relaxed_default) == "relaxed"
    assert network_of(None, relaxed_default) == "relaxed"
    assert network_of(None, SimpleNamespace(default_network="fast")) == "fast"
