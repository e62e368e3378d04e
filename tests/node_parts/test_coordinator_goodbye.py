"""A node whose coordinator ends the session logs the coordinator's reason, not the closed
stream; a capabilities update is sent signed like the hello; models installed while the node
runs are registered and advertised.

The node is the real pull loop (`pull_forever`, libp2p on 127.0.0.1) against the scripted
coordinator of `test_node_resilience`, which says `Goodbye` when the test tells it to.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec
import trio
from eth_account import Account
from structlog.testing import capture_logs

from sogni_net import open_host
from sogni_node.journal import Journal
from sogni_node.live_install import InstalledModels, index_stamp
from sogni_node.models.registry import ModelRegistry
from sogni_node.models.store import ModelStore
from sogni_node.models.tiny import ensure_tiny_model
from sogni_node.pull import NodeIdentity, PullSession
from sogni_node.worker import Worker
from sogni_protocol import eip712
from sogni_protocol.messages import Capabilities, CapabilitiesUpdate, Goodbye

from .test_node_resilience import DOMAIN, MODEL, CountingBackend, coordinator, node


async def _logged(logs: list[dict[str, object]], event: str) -> dict[str, object]:
    with trio.fail_after(15):
        while True:
            found = [e for e in logs if e["event"] == event]
            if found:
                return found[0]
            await trio.sleep(0.05)


async def test_a_coordinator_goodbye_is_logged_as_its_refusal(tmp_path: Path) -> None:
    async with coordinator() as coord, node(tmp_path, coord, CountingBackend()):
        link = await coord.link()
        with capture_logs() as logs:
            await link.channel.send(Goodbye(reason="wallet 0xabc is blacklisted"))
            refused = await _logged(logs, "coordinator_refused")
        assert refused["error"] == "coordinator ended the session: wallet 0xabc is blacklisted"
        assert not [e for e in logs if e["event"] == "pull_session_ended"]  # not ChannelClosed
        link.done.set()
        again = await coord.link()  # the node reconnects as after any ended session
        again.done.set()


async def test_an_update_is_bound_to_the_wallet_like_the_hello(tmp_path: Path) -> None:
    acct = Account.create()
    journal = Journal(tmp_path / "journal.db", tmp_path / "results")
    async with coordinator() as coord, open_host(key_path=None, listen=()) as host:
        identity = NodeIdentity(
            acct.address, bytes(acct.key), DOMAIN, frozenset({coord.address.lower()})
        )
        caps = Capabilities(
            peer_id=host.peer_id,
            wallet=acct.address,
            expiry=int(time.time()) + 600,
            models=[MODEL],
            slots=1,
            backend="counting",
            device="cpu",
            max_pixels=1 << 20,
        )
        worker = Worker(CountingBackend(), slots=1)
        session = PullSession(host, coord.addr, identity, worker, journal, caps)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            link = await coord.link()
            newer = msgspec.structs.replace(caps, loras=["glow"])
            session.update_capabilities(newer)
            update = await link.next(CapabilitiesUpdate)
            assert update.capabilities == newer and session.caps == newer
            fault = eip712.check_binding(
                DOMAIN, newer, update.binding_signature, host.peer_id, time.time()
            )
            assert fault is None
            session.finish()
            await link.next(Goodbye)
            link.done.set()
    journal.close()


def test_models_added_while_running_are_registered_and_advertised(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    registry = ModelRegistry()
    models = ["built-in"]
    unloaded: list[str] = []
    installed = InstalledModels(models_dir, registry, models, unload=unloaded.append)
    before = index_stamp(models_dir)
    assert installed.apply(installed.installed_specs()) is False  # nothing installed yet

    ModelStore(models_dir).add(ensure_tiny_model(tmp_path / "src"), model_id="tiny")
    assert index_stamp(models_dir) != before
    assert installed.apply(installed.installed_specs()) is True
    assert models == ["built-in", "tiny"] and "tiny" in registry

    ModelStore(models_dir).remove("tiny")  # and added again under its id, other weights:
    other = tmp_path / "other"  # the old pipeline must go, never render for the new id
    shutil.copytree(ensure_tiny_model(tmp_path / "src"), other)
    weight = max(other.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(weight.read_bytes())
    data[-1] ^= 1
    weight.write_bytes(bytes(data))
    ModelStore(models_dir).add(other, model_id="tiny")
    assert installed.apply(installed.installed_specs()) is False  # same id, same list
    installed.unload_dropped()
    assert unloaded == ["tiny"]

    ModelStore(models_dir).remove("tiny")
    assert installed.apply(installed.installed_specs()) is True
    assert models == ["built-in"]  # a built-in model is never dropped
    installed.unload_dropped()
    assert "tiny" not in registry and unloaded == ["tiny", "tiny"]  # removed: forgotten

    store = ModelStore(models_dir)
    stored = store.add(ensure_tiny_model(tmp_path / "src"), model_id="damaged")
    weight = store.path(stored) / max(stored.files, key=lambda f: stored.files[f].size)
    weight.write_bytes(weight.read_bytes()[:-1])  # truncated after it was installed
    with capture_logs() as logs:
        assert installed.apply(installed.installed_specs()) is False
    assert "damaged" not in registry and models == ["built-in"]
    assert [e["model"] for e in logs if e["event"] == "model_not_served"] == ["damaged"]
