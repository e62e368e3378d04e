"""The Supernet end to end over libp2p on 127.0.0.1, and the bad input it must survive."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio
from eth_account import Account
from eth_account.messages import encode_typed_data
from PIL import Image

from sogni_app.api import RenderRefused, receipt_line, render
from sogni_net import Channel, ChannelClosed, open_host
from sogni_protocol import eip712
from sogni_protocol.ids import CLIENT_PROTOCOL, JOBS_PROTOCOL, RESULT_FRAME_LIMIT, WIRE_VERSION
from sogni_protocol.messages import (
    Goodbye,
    HandBack,
    HelloRefused,
    JobFailed,
    Offer,
    OfferDeclined,
    Progress,
    Receipt,
    RenderMeta,
    RequestAccepted,
    RequestDone,
    RequestRefused,
    Result,
    ResultAck,
)

from .conftest import MODEL, SlowBackend, receive_skipping, rogue_node, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")


request = tiny_request


async def test_images_come_back_with_receipts_any_eip712_library_verifies(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        nodes = [await net.add_node(backend, f"node{i}") for i in range(2)]
        with trio.fail_after(60):
            result = await render(net.addr, request(6))
        assert [im.index for im in result.images] == list(range(6))
        wallets = {n.wallet.address for n in nodes}
        for im in result.images:
            assert Image.open(io.BytesIO(im.image)).size == (64, 64)
            line = receipt_line(im, "x.png")
            signable = encode_typed_data(
                full_message={k: line[k] for k in ("domain", "types", "primaryType", "message")}
            )
            signer = Account.recover_message(signable, signature=line["signature"])
            assert signer == line["message"]["worker"]
            assert signer in wallets
            assert line["message"]["resultHash"] == "0x" + hashlib.sha256(im.image).hexdigest()
            assert line["message"]["coordinator"] == net.signer.address
            stored = net.coordinator.dispatcher.store.receipt(im.job_id)
            assert stored is not None and stored.signature == im.signature


async def test_unknown_model_and_image_counts_are_refused_naming_the_problem(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        with pytest.raises(RenderRefused, match="unknown model 'nope'"):
            await render(net.addr, request(1, model_id="nope"))
        async with open_host(key_path=None, listen=()) as client:
            for count in (0, 513):
                channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                raw = msgspec.msgpack.encode(
                    {
                        "type": "renderRequest",
                        "modelId": MODEL,
                        "positivePrompt": "x",
                        "numberOfImages": count,
                    }
                )
                await channel.send_raw(raw, limit=len(raw), timeout=5)
                refused = await channel.receive(timeout=10)
                assert isinstance(refused, RequestRefused)
                assert "$.numberOfImages" in refused.reason
        with trio.fail_after(60):
            result = await render(net.addr, request(1))  # still serving
        assert len(result.images) == 1


async def test_garbage_from_clients_never_takes_the_coordinator_down(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        async with open_host(key_path=None, listen=()) as client:
            # a frame announcing 100 MB: refused from the header alone, the stream is reset
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send_unframed((100 * 1024 * 1024).to_bytes(4, "big"), timeout=5)
            with pytest.raises(ChannelClosed):
                await channel.receive(timeout=10)
            # bytes that are not MessagePack
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send_raw(b"\xc1\xc1\xc1", timeout=5)
            refused = await channel.receive(timeout=10)
            assert isinstance(refused, RequestRefused) and "MessagePack" in refused.reason
            # a missing field and a wrong-typed field
            for bad, field in (
                ({"type": "renderRequest", "modelId": MODEL}, "positivePrompt"),
                (
                    {
                        "type": "renderRequest",
                        "modelId": MODEL,
                        "positivePrompt": "x",
                        "steps": "9",
                    },
                    "$.steps",
                ),
            ):
                channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await channel.send_raw(msgspec.msgpack.encode(bad), timeout=5)
                refused = await channel.receive(timeout=10)
                assert isinstance(refused, RequestRefused) and field in refused.reason
            # a newer client, and a newer node: told which version this coordinator speaks
            newer = {
                "type": "renderRequest", "v": WIRE_VERSION + 1, "modelId": MODEL,
                "positivePrompt": "x",
            }  # fmt: skip
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send_raw(msgspec.msgpack.encode(newer), timeout=5)
            refused = await channel.receive(timeout=10)
            assert isinstance(refused, RequestRefused) and refused.code == "unsupported_version"
            newer_v = f"wire version {WIRE_VERSION + 1} is not supported"
            assert f"{newer_v}: this coordinator speaks {WIRE_VERSION}" in refused.reason
            channel = await client.open_channel(net.addr, JOBS_PROTOCOL)
            hello = {
                "type": "nodeHello", "v": WIRE_VERSION + 1, "capabilities": {},
                "bindingSignature": b"",
            }  # fmt: skip
            await channel.send_raw(msgspec.msgpack.encode(hello), timeout=5)
            answer = await channel.receive(timeout=10)
            assert isinstance(answer, HelloRefused) and newer_v in answer.reason
        with trio.fail_after(60):
            assert len((await render(net.addr, request(1))).images) == 1


async def test_node_refuses_offers_from_untrusted_coordinators(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        stranger = Account.create().address
        node = await net.add_node(backend, "node0", trusted=[stranger])
        # the node never completes a session with a coordinator it does not trust
        with trio.move_on_after(3):
            await node.connected.wait()
        assert not node.connected.is_set()
        assert net.coordinator.dispatcher.nodes == {}
        node.stop.set()


async def test_offer_signed_by_another_key_is_declined(net_factory: Any, backend: Any) -> None:
    """A coordinator whose offers are not signed by its announced key gets nothing rendered."""
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        link = next(iter(net.coordinator.dispatcher.nodes.values()))
        forger = Account.create()
        dispatcher = net.coordinator.dispatcher
        real_key = dispatcher._key
        dispatcher._key = bytes(forger.key)  # the same coordinator, now signing with a wrong key
        try:
            async with open_host(key_path=None, listen=()) as client:
                channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await channel.send(request(1))
                assert isinstance(await channel.receive(timeout=10), RequestAccepted)
                failed = await receive_skipping(channel, (JobFailed,), timeout=30)
                done = await receive_skipping(channel, (RequestDone,), timeout=10)
        finally:
            dispatcher._key = real_key
        assert "offer signed by untrusted key" in failed.reason
        assert (done.delivered, done.failed) == (0, 1)
        assert dispatcher.store.receipts() == []
        assert link.peer_id in dispatcher.nodes


def _result_for(offer: Offer, acct: Any, domain: Any, image: bytes, **override: Any) -> Result:
    receipt = Receipt(
        job_id=offer.offer.job_id,
        offer_hash=eip712.offer_hash(domain, offer.offer),
        worker=acct.address,
        coordinator=offer.offer.coordinator,
        model_id=offer.offer.model_id,
        result_hash=hashlib.sha256(image).digest(),
        steps_done=offer.offer.steps,
        work_units=offer.offer.work_units,
        price_factor_bps=offer.offer.price_factor_bps,
        completed_at=int(time.time()),
    )
    receipt = msgspec.structs.replace(receipt, **override)
    sig = eip712.sign_receipt(bytes(acct.key), domain, receipt)
    meta = RenderMeta(backend="rogue", device="cpu", dtype="float32", threads=1)
    return Result(job_id=receipt.job_id, image=image, receipt=receipt, signature=sig, meta=meta)


async def test_bad_receipts_are_refused_and_the_job_is_receipted_once(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net, rogue_node(net) as (channel, acct):
        from sogni_protocol.messages import Ready

        await channel.send(Ready(slots=1))
        async with open_host(key_path=None, listen=()) as client:
            cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await cchan.send(request(1))
            assert isinstance(await cchan.receive(timeout=10), RequestAccepted)
            offer = await receive_skipping(channel, (Offer,))
            image = b"\x89PNG\r\n\x1a\n not really"
            # wrong hash
            bad_hash = _result_for(offer, acct, net.domain, image, result_hash=b"\x00" * 32)
            await channel.send(bad_hash, limit=RESULT_FRAME_LIMIT)
            ack = await receive_skipping(channel, (ResultAck,))
            assert not ack.accepted and "resultHash" in ack.reason
            # wrong signature: signed by a key that is not the bound wallet
            impostor = Account.create()
            forged = _result_for(offer, impostor, net.domain, image, worker=acct.address)
            await channel.send(forged, limit=RESULT_FRAME_LIMIT)
            ack = await receive_skipping(channel, (ResultAck,))
            assert not ack.accepted and "signature" in ack.reason
            assert net.coordinator.dispatcher.store.counts()["receipts"] == 0
            # the job went back to the queue; a real node now finishes it, exactly once
            await channel.send(Goodbye(reason="test"))
            await net.add_node(backend, "honest")
            msg = await receive_skipping(cchan, (RequestDone,), 60, RESULT_FRAME_LIMIT)
            assert msg.delivered == 1
            late = _result_for(offer, acct, net.domain, image)
            stored = net.coordinator.dispatcher.store.receipts()
            assert len(stored) == 1 and stored[0].receipt.worker != acct.address.lower()
            assert late.job_id == stored[0].receipt.job_id


async def test_node_that_disconnects_mid_job_loses_it_to_the_queue(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        async with rogue_node(net) as (channel, _acct):
            from sogni_protocol.messages import Ready

            await channel.send(Ready(slots=1))
            async with open_host(key_path=None, listen=()) as client:
                cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await cchan.send(request(1))
                accepted = await cchan.receive(timeout=10)
                assert isinstance(accepted, RequestAccepted)
                offer = await receive_skipping(channel, (Offer,))
                await channel.send(Progress(job_id=offer.offer.job_id, step=1))
                await channel.reset()  # vanishes mid-job
                await net.add_node(backend, "honest")
                msg = await receive_skipping(cchan, (RequestDone,), 60, RESULT_FRAME_LIMIT)
                assert (msg.delivered, msg.failed) == (1, 0)
        receipts = net.coordinator.dispatcher.store.receipts()
        assert [r.receipt.job_id for r in receipts] == accepted.job_ids


@pytest.mark.serial  # a 1 s job deadline: a render slowed by another test misses it
async def test_job_past_its_deadline_is_requeued_and_paid_once(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory(job_deadline_floor=1.0, job_deadline_base=0.0) as net:
        async with rogue_node(net) as (channel, acct):
            from sogni_protocol.messages import Cancel, Heartbeat, Ready

            await channel.send(Ready(slots=1))
            async with open_host(key_path=None, listen=()) as client:
                cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
                await cchan.send(request(1))
                accepted = await cchan.receive(timeout=10)
                assert isinstance(accepted, RequestAccepted)
                offer = await receive_skipping(channel, (Offer,))
                # keep heartbeating but never deliver: the coordinator cancels and requeues
                with trio.fail_after(10):
                    while True:
                        await channel.send(Heartbeat(seq=1))
                        msg = await channel.receive(timeout=5)
                        if isinstance(msg, Cancel):
                            break
                # the honest node's render (its first: a pipeline load) must not miss the
                # 1 s deadline too on a slow machine: only the rogue's deadline is tested
                net.coordinator.dispatcher.deadline_floor = 60.0
                await net.add_node(backend, "honest")
                msg = await receive_skipping(cchan, (RequestDone,), 60, RESULT_FRAME_LIMIT)
                # the late result from the first node is refused: the job is already receipted
                late = _result_for(offer, acct, net.domain, b"late image")
                await channel.send(late, limit=RESULT_FRAME_LIMIT)
                ack = await receive_skipping(channel, (ResultAck,))
                assert not ack.accepted and "already receipted" in ack.reason
        assert len(net.coordinator.dispatcher.store.receipts()) == 1
        assert accepted.job_ids[0] == net.coordinator.dispatcher.store.receipts()[0].receipt.job_id


async def test_client_that_disconnects_loses_nothing(net_factory: Any, backend: Any) -> None:
    async with net_factory() as net:
        slow = SlowBackend(backend, 0.3)
        await net.add_node(slow, "node0")
        async with open_host(key_path=None, listen=()) as client:
            cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await cchan.send(request(2))
            accepted = await cchan.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted)
            await slow.started.wait()
            await cchan.reset()
        store = net.coordinator.dispatcher.store
        with trio.fail_after(60):
            while store.counts().get("done", 0) < 2:
                await trio.sleep(0.05)
        results = net.config.data_dir / "results" / accepted.request_id.hex()
        # each image waits on disk, as the whole frame with its receipt, for a resume
        assert sorted(p.name[:4] for p in results.glob("*.jobimage")) == ["0000", "0001"]
        assert {r.receipt.job_id for r in store.receipts()} == set(accepted.job_ids)


@asynccontextmanager
async def _stopped_mid_render(
    net: Any, backend: Any, *, step_seconds: float, grace: float, steps: int
) -> AsyncIterator[tuple[Channel, RequestAccepted, Any]]:
    """One node rendering a 1-image request is stopped (what SIGTERM does in the daemon)
    while it renders; the client's stream, the acceptance and the node's shutdown report."""
    slow = SlowBackend(backend, step_seconds)
    node = await net.add_node(slow, "node0", shutdown_grace=grace)
    async with open_host(key_path=None, listen=()) as client:
        cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
        await cchan.send(request(1, steps=steps))
        accepted = await cchan.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted)
        await slow.started.wait()
        node.stop.set()
        with trio.fail_after(60):
            await node.done.wait()
        yield cchan, accepted, node.report[0]


async def test_sigterm_finishes_or_hands_back_running_jobs_and_says_which(
    net_factory: Any, backend: Any
) -> None:
    async with (
        net_factory() as net,
        _stopped_mid_render(net, backend, step_seconds=0.4, grace=0.2, steps=20) as stopped,
    ):
        cchan, accepted, report = stopped
        assert report.handed_back == [accepted.job_ids[0].hex()]
        assert report.finished == []
        # the coordinator requeued it; another node finishes it
        await net.add_node(backend, "node1")
        msg = await receive_skipping(cchan, (RequestDone,), 60, RESULT_FRAME_LIMIT)
        assert msg.delivered == 1


async def test_a_render_that_finishes_in_the_grace_reaches_the_coordinator_before_goodbye(
    net_factory: Any, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sogni_node.journal import Journal

    # A render's slot is free before its result is kept (a fsync'd journal write) and sent;
    # a slow disk there must not let the node's goodbye overtake the result.
    keep = Journal.keep_result

    def slow_keep(self: Journal, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        keep(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "keep_result", slow_keep)
    async with (
        net_factory() as net,
        _stopped_mid_render(net, backend, step_seconds=0.2, grace=30.0, steps=2) as stopped,
    ):
        cchan, accepted, report = stopped
        assert report.finished == [accepted.job_ids[0].hex()] and report.handed_back == []
        # delivered by this node alone: the coordinator had the result before the goodbye
        msg = await receive_skipping(cchan, (RequestDone,), 30, RESULT_FRAME_LIMIT)
        assert msg.delivered == 1
        assert len(net.coordinator.dispatcher.store.receipts()) == 1


async def test_coordinator_restart_requeues_accepted_jobs(tmp_path: Any, backend: Any) -> None:
    from .conftest import start_net

    async with (
        start_net(tmp_path, models=[MODEL]) as net,
        open_host(key_path=None, listen=()) as client,
    ):
        # no node yet: the jobs wait in the queue when the coordinator stops
        cchan = await client.open_channel(net.addr, CLIENT_PROTOCOL)
        await cchan.send(request(2))
        accepted = await cchan.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted)
    signer = net.signer
    from sogni_coordinator.service import run_coordinator

    from .conftest import Net

    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_coordinator, net.config, signer)
        net2 = Net(tmp_path, nursery, running, signer, net.config)
        await net2.add_node(backend, "node1")
        store = running.dispatcher.store
        with trio.fail_after(60):
            while store.counts().get("done", 0) < 2:
                await trio.sleep(0.05)
        assert {r.receipt.job_id for r in store.receipts()} == set(accepted.job_ids)
        nursery.cancel_scope.cancel()


def test_seed_of_image_i_is_seed_plus_i() -> None:
    from sogni_protocol.messages import job_params

    req = request(3, seed=2**32 - 1)
    assert [job_params(req, i).seed for i in range(3)] == [2**32 - 1, 0, 1]


_ = (HandBack, OfferDeclined, os)


async def test_nodes_gossip_signed_capability_adverts(net_factory: Any, backend: Any) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0", advert_interval=1.0)
        peer = next(iter(net.coordinator.dispatcher.nodes))
        with trio.fail_after(20):
            while peer not in net.coordinator.adverts.adverts:
                await trio.sleep(0.05)
        caps = net.coordinator.adverts.adverts[peer]
        assert caps.models == [MODEL] and caps.peer_id == peer


async def test_nodes_report_warm_models_with_their_free_slots(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory() as net:
        await net.add_node(backend, "node0")
        with trio.fail_after(60):
            await render(net.addr, request(1))
        link = next(iter(net.coordinator.dispatcher.nodes.values()))
        with trio.fail_after(10):
            while MODEL not in link.warm:
                await trio.sleep(0.05)


async def test_the_operators_max_pixels_is_what_the_node_advertises(
    net_factory: Any, backend: Any
) -> None:
    """`max_pixels` in the node's config overrides the probe's suggestion in its
    capabilities (it was read nowhere: the probe's guess was always advertised)."""
    async with net_factory() as net:
        await net.add_node(backend, "node0", max_pixels=128 * 128)
        (link,) = net.coordinator.dispatcher.nodes.values()
        assert link.max_pixels == 128 * 128


async def test_a_flood_of_capabilities_updates_is_dropped_then_the_session_ended(
    net_factory: Any,
) -> None:
    """Each `CapabilitiesUpdate` cost the coordinator a signature recovery on its loop (4-9
    ms for a long model list), a log line and a database write, with no limit: a joined
    node could send them back to back. Now a burst of `CAPS_BURST`, then one per 2 s; past
    `CAPS_DROPPED_LIMIT` dropped ones the session ends."""
    from sogni_coordinator.node_session import CAPS_BURST, CAPS_DROPPED_LIMIT
    from sogni_protocol.messages import Capabilities, CapabilitiesUpdate

    async with net_factory() as net, rogue_node(net) as (channel, acct):
        caps = Capabilities(
            peer_id="12D3KooWnotthisstream",  # bound to another peer: refused when checked
            wallet=acct.address,
            expiry=int(time.time()) + 600,
            models=[MODEL],
            slots=1,
            backend="rogue",
            device="cpu",
            max_pixels=1 << 20,
        )
        update = CapabilitiesUpdate(
            capabilities=caps,
            binding_signature=eip712.sign_binding(bytes(acct.key), net.domain, caps),
        )
        for _ in range(CAPS_BURST + CAPS_DROPPED_LIMIT + 1):
            await channel.send(update)
        refusals = 0
        with pytest.raises(ChannelClosed), trio.fail_after(20):
            while True:
                msg = await channel.receive(timeout=20)
                refusals += isinstance(msg, HelloRefused)
        assert refusals == CAPS_BURST  # the rest were dropped unchecked
