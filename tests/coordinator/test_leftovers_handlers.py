"""A libp2p stream whose handler fails (the host logs `handler_failed` and resets it) is
counted by protocol in `sogni_coordinator_handler_failures_total`: node, client, epochs and
relay. Before, a bug on the node, epochs or relay protocol was a log line only; the usual
ends of a stream (closed, timed out, a peer's bad frame) are not failures."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import sogni_coordinator.service as service
from sogni_coordinator.metrics import CoordinatorMetrics
from sogni_net import Channel, ChannelClosed, ReadTimeout, open_host
from sogni_protocol import ids
from sogni_protocol.errors import ProtocolError
from sogni_protocol.metrics import ModelLabels, new_registry
from sogni_protocol.relay_messages import EpochIndexRequest, encode
from tests.e2e.conftest import start_net

PROTOCOLS = ("node", "client", "epochs", "relay")


class Meter:
    """What `MeteredDispatcher.handler_failed` feeds."""

    def __init__(self) -> None:
        self.metrics = CoordinatorMetrics(new_registry(), ModelLabels(()))

    def handler_failed(self, protocol: str) -> None:
        self.metrics.handler_failed(protocol)

    def value(self, protocol: str) -> float:
        sample = self.metrics.registry.get_sample_value(
            "sogni_coordinator_handler_failures_total", {"protocol": protocol}
        )
        return sample or 0.0


async def test_a_failing_handler_is_counted_and_the_usual_ends_are_not() -> None:
    meter = Meter()
    assert [meter.value(p) for p in PROTOCOLS] == [0.0] * 4  # every series from the start
    ends: list[BaseException] = [
        ChannelClosed("closed by peer"),
        ReadTimeout("idle"),
        ProtocolError("a bad frame"),
    ]

    async def handler(_channel: Channel) -> None:
        raise ends.pop(0) if ends else RuntimeError("a bug")

    serve = service.counted("relay", handler, meter)
    for kind in (ChannelClosed, ReadTimeout, ProtocolError, RuntimeError):
        with pytest.raises(kind):  # still the host's to log and reset
            await serve(None)  # type: ignore[arg-type]
    assert meter.value("relay") == 1.0 and meter.value("epochs") == 0.0
    assert service.counted("relay", handler, object()) is handler  # metrics off


def _failures(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sogni_coordinator_handler_failures_total":
                out[s.labels["protocol"]] = s.value
    return out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


async def test_a_coordinator_counts_an_epochs_handler_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(channel: Channel, folder: Any) -> None:
        await channel.receive_raw(limit=ids.CONTROL_FRAME_LIMIT, timeout=10)
        raise RuntimeError("a bug in the epochs handler")

    monkeypatch.setattr(service, "serve_epochs", broken)
    async with start_net(tmp_path) as net:
        url = net.coordinator.http_url
        assert url is not None
        assert _failures(await trio.to_thread.run_sync(_scrape, url)) == dict.fromkeys(
            PROTOCOLS, 0.0
        )
        async with open_host(key_path=None, listen=()) as client:
            channel = await client.open_channel(net.addr, ids.EPOCHS_PROTOCOL)
            await channel.send_raw(encode(EpochIndexRequest(after=0)), limit=1 << 16)
            with trio.fail_after(10):
                while not _failures(await trio.to_thread.run_sync(_scrape, url)).get("epochs"):
                    await trio.sleep(0.05)
        counted = _failures(await trio.to_thread.run_sync(_scrape, url))
        assert counted == {"node": 0.0, "client": 0.0, "epochs": 1.0, "relay": 0.0}
