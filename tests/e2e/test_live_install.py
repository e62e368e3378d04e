"""A LoRA added while the node runs is served without a restart, and a capabilities update
the coordinator cannot verify is refused while the session goes on.

Real parts: coordinator and node over libp2p on 127.0.0.1, the tiny diffusers model, and
`sogni-node loras add` through its CLI (typer's runner, the same code as the command), which
changes only the index on disk, as a separate process would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from typer.testing import CliRunner

from sogni_app.api import RenderRefused, render
from sogni_node.cli import app
from sogni_node.models.tiny import write_tiny_lora
from sogni_protocol import eip712
from sogni_protocol.messages import (
    Capabilities,
    CapabilitiesUpdate,
    Goodbye,
    HelloRefused,
    LoraRef,
    Ready,
    Welcome,
)

from .conftest import MODEL, receive_skipping, rogue_node, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")


async def _wait_for(condition: Any, what: str, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


async def test_a_lora_added_while_the_node_runs_is_used_without_a_restart(
    net_factory: Any, backend: Any, tmp_path: Path
) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        request = tiny_request(1, seed=5, loras=[LoraRef(id="glow", strength=0.8)])
        with trio.fail_after(10), pytest.raises(RenderRefused, match=r"LoRAs \['glow'\]"):
            await render(net.addr, request)

        lora = write_tiny_lora(tmp_path / "glow.safetensors", seed=1)
        models_dir = net.tmp / "node0" / "models"
        added = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                app, ["loras", "add", str(lora), "--models-dir", str(models_dir)]
            )
        )
        assert added.exit_code == 0, added.output
        [link] = net.coordinator.dispatcher.nodes.values()
        await _wait_for(lambda: "glow" in link.loras, "the coordinator hears of the LoRA")

        styled = await render(net.addr, request)
        plain = await render(net.addr, tiny_request(1, seed=5))
        assert len(styled.images) == 1
        assert styled.images[0].image != plain.images[0].image  # the LoRA was applied


def _caps(peer_id: str, wallet: str, **kw: Any) -> Capabilities:
    fields: dict[str, Any] = {
        "peer_id": peer_id,
        "wallet": wallet,
        "expiry": int(time.time()) + 600,
        "models": [MODEL],
        "slots": 1,
        "backend": "rogue",
        "device": "cpu",
        "max_pixels": 1 << 20,
    }
    return Capabilities(**{**fields, **kw})


async def test_a_bad_capabilities_update_is_refused_and_the_session_goes_on(
    net_factory: Any,
) -> None:
    async with net_factory() as net, rogue_node(net) as (channel, acct):
        [link] = net.coordinator.dispatcher.nodes.values()
        other = Account.create()
        stolen = _caps(link.peer_id, other.address, loras=["glow"])  # another wallet's binding
        update = CapabilitiesUpdate(
            capabilities=stolen,
            binding_signature=eip712.sign_binding(bytes(other.key), net.domain, stolen),
        )
        await channel.send(update)
        refused = await receive_skipping(channel, (HelloRefused,))
        assert "another wallet" in refused.reason
        assert link.loras == frozenset()

        unsigned = _caps(link.peer_id, acct.address, loras=["glow"])
        forged = eip712.sign_binding(bytes(other.key), net.domain, unsigned)
        await channel.send(CapabilitiesUpdate(capabilities=unsigned, binding_signature=forged))
        refused = await receive_skipping(channel, (HelloRefused,))
        assert "not signed by its wallet" in refused.reason

        good = _caps(link.peer_id, acct.address, loras=["glow"], models=[MODEL, "other"])
        sig = eip712.sign_binding(bytes(acct.key), net.domain, good)
        await channel.send(CapabilitiesUpdate(capabilities=good, binding_signature=sig))
        await _wait_for(lambda: link.loras == {"glow"}, "the good update applies")
        assert link.models == {MODEL, "other"}
        assert net.coordinator.dispatcher.nodes.get(link.peer_id) is link  # same session
        await channel.send(Ready(slots=1))


async def test_the_coordinator_says_why_it_ends_a_session(net_factory: Any) -> None:
    async with net_factory() as net, rogue_node(net) as (channel, _acct):
        welcome = Welcome(
            coordinator=net.signer.address,
            chain_id=1,
            verifying_contract="0x" + "00" * 20,
            heartbeat_interval=1.0,
        )
        await channel.send(welcome)  # not a node's message: the coordinator ends the session
        bye = await receive_skipping(channel, (Goodbye,))
        assert "unexpected Welcome" in bye.reason
