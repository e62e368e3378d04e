"""LoRAs and output formats across the real network: routing by advertised LoRA, format checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import RenderRefused, render
from sogni_net import open_host
from sogni_node.models.loras import LoraLibrary
from sogni_node.models.tiny import write_tiny_lora
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.image_types import format_of
from sogni_protocol.messages import (
    LoraRef,
    Offer,
    Ready,
    RenderRequest,
    RequestAccepted,
    ResultAck,
)

from .conftest import receive_skipping, rogue_node, tiny_request
from .test_network import _result_for

pytestmark = pytest.mark.filterwarnings("ignore")


def _request(n: int, **kw: Any) -> RenderRequest:
    return tiny_request(n, seed=5, **kw)


async def test_lora_jobs_go_only_to_nodes_that_have_the_lora(
    net_factory: Any, backend: Any, tmp_path: Path
) -> None:
    async with net_factory() as net:
        library = LoraLibrary(net.tmp / "with-lora" / "models")
        library.add(write_tiny_lora(tmp_path / "glow.safetensors", seed=1))
        with_lora = await net.add_node(backend, "with-lora")
        await net.add_node(backend, "plain", slots=2)

        styled = await render(
            net.addr, _request(4, loras=[LoraRef(id="glow", strength=0.8)], output_format="jpeg")
        )
        assert len(styled.images) == 4
        assert {img.receipt.worker for img in styled.images} == {with_lora.wallet.address}
        assert {format_of(img.image) for img in styled.images} == {"jpeg"}

        same_seed = await render(net.addr, _request(1, output_format="jpeg"))
        assert same_seed.images[0].image != styled.images[0].image  # the LoRA changed it

        with trio.fail_after(10), pytest.raises(RenderRefused, match=r"LoRAs \['missing'\]"):
            await render(net.addr, _request(1, loras=[LoraRef(id="missing")]))


async def test_webp_and_png_come_back_in_the_format_asked_for(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        webp = await render(net.addr, _request(2, output_format="webp"))
        png = await render(net.addr, _request(1))
        assert [format_of(img.image) for img in webp.images] == ["webp", "webp"]
        assert format_of(png.images[0].image) == "png"


async def test_a_result_in_another_format_is_refused(net_factory: Any) -> None:
    async with net_factory() as net, rogue_node(net) as (channel, acct):
        await channel.send(Ready(slots=1))
        async with open_host(key_path=None, listen=()) as client:
            cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await cchan.send(_request(1, output_format="webp"))
            assert isinstance(await cchan.receive(timeout=10), RequestAccepted)
            offer = await receive_skipping(channel, (Offer,))
            assert offer.params.output_format == "webp"
            png = _result_for(offer, acct, net.domain, b"\x89PNG\r\n\x1a\n not webp")
            await channel.send(png, limit=RESULT_FRAME_LIMIT)
            ack = await receive_skipping(channel, (ResultAck,))
            assert not ack.accepted and ack.reason == "image is not the webp the job asked for"
            assert net.coordinator.dispatcher.store.counts()["receipts"] == 0
