"""The image check over libp2p (docs/IMAGE_CHECK.md): real nodes decode real final latents.

Every sampled check also opens the final leaf x_N; a node of another wallet decodes it with the
model's VAE (`VerifyDecode` -> `DecodeVerified`) and the coordinator compares that image with
the delivered one. Honest nodes pass (the decode is the delivered PNG, byte for byte; for a
JPEG or WebP job the coordinator's re-encode of it is the delivered file, byte for byte). A rogue
that commits an honest trajectory, so that every step and the seed check pass, but delivers
another image (another seed's render, or the honest image with a patch painted on it) is
caught: its receipt becomes evidence, it earns nothing, it is struck, and the honest node
renders the job again. A JPEG or WebP job's worker also opens the lossless pixels it encoded
(the pixels rule, docs/IMAGE_CHECK.md "Opened pixels"): honest nodes pass by it, and a rogue
that paints a 4 x 4 patch on its WebP, which block statistics miss on some jobs, is caught
because its file is not the encode of the pixels it opens.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio
from eth_account import Account
from PIL import Image

from sogni_app.api import render
from sogni_coordinator.dispatch import Dispatcher
from sogni_coordinator.evidence import decode_evidence
from sogni_coordinator.image_verify import PIXELS_RULE, verify_image
from sogni_net import Channel, open_host
from sogni_node.worker import _render_job
from sogni_protocol import eip712
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, JOBS_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.image_encoding import encode_rgb, encoder_build
from sogni_protocol.messages import (
    OPEN_PIXELS_FEATURE,
    Capabilities,
    Challenge,
    ChallengeAnswer,
    DecodeVerified,
    JobParams,
    NodeHello,
    PixelsOpening,
    StepOpeningWire,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
    VerifyStep,
    Welcome,
    job_params,
)

from .conftest import MODEL, Net, receive_skipping, tiny_request
from .rogue_kit import (
    EVERY,
    another_seeds_render,
    checks_of,
    heartbeats,
    honest_joins,
    open_faithfully,
    peer_of,
    real_render,
    rogue_rendering,
    spy_verifier_replies,
    stored_receipt,
    submit_result,
    take_offer,
    wire,
)

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red circle"  # tiny_request's prompt: it must never reach a log


def _patched(image: bytes) -> bytes:
    """`image` with one 8x8 patch painted far from what was there (>= 128 levels a channel)."""
    im = Image.open(io.BytesIO(image)).convert("RGB")
    r, g, b = im.getpixel((28, 28))  # type: ignore[misc]
    far = tuple(0 if c > 127 else 255 for c in (r, g, b))
    im.paste(far, (24, 24, 32, 32))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


async def _refuse_every_check(channel: Channel) -> None:
    """The rogue as a verifier: it refuses every step and decode it is asked (saying nothing
    about the worker), so the honest node's re-render is released."""
    while True:
        ask = await receive_skipping(
            channel, (VerifyStep, VerifyDecode), timeout=120, limit=RESULT_FRAME_LIMIT
        )
        await channel.send(VerifyRefused(check_id=ask.check_id, reason="no", code="model"))


async def test_honest_nodes_pass_the_image_check(
    net_factory: Any, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with net_factory(verification=EVERY) as net:
        decodes = spy_verifier_replies(monkeypatch, net, DecodeVerified)
        await net.add_node(backend, "alice")
        await net.add_node(backend, "bob")
        with trio.fail_after(120):
            result = await render(net.addr, tiny_request(2, scheduler="euler"))
        assert len(result.images) == 2
        checks = checks_of(net.tmp)
        assert [c["verdict"] for c in checks] == ["pass", "pass"], checks
        # each check decoded its final latent on the other wallet: the delivered PNG exactly
        assert sorted(d.image for d in decodes) == sorted(i.image for i in result.images)


@pytest.mark.parametrize("rogue", ["another_seeds_image", "patch_painted"])
async def test_a_rogue_delivering_another_image_is_caught_and_its_job_rendered_again(
    net_factory: Any, backend: Any, rogue: str
) -> None:
    async with net_factory(verification=EVERY) as net:
        dispatcher = net.coordinator.dispatcher
        async with rogue_rendering(net, tiny_request(1, scheduler="euler")) as run:
            channel, acct = run.channel, run.acct
            offer = await take_offer(channel)
            honest_image, committed = await real_render(backend, offer.params)
            if rogue == "another_seeds_image":
                image, _ = await another_seeds_render(backend, offer.params)
            else:
                image = _patched(honest_image)
            assert image != honest_image
            job_id = await submit_result(
                net, channel, acct, offer, image, committed, dtype=backend.dtype_name
            )
            assert dispatcher.store.check_state(job_id) == "pending"
            challenge = await receive_skipping(channel, (Challenge,))
            assert offer.params.steps in challenge.steps  # the final leaf is opened
            assert challenge.pixels is msgspec.UNSET  # a PNG job, a node without the word
            honest = await honest_joins(net, backend)  # the verifier, then worker
            await open_faithfully(channel, job_id, committed, challenge.steps)
            run.tasks.start_soon(_refuse_every_check, channel)
        (result,) = run.results
        (image_out,) = result.images
        assert eip712.same_address(image_out.receipt.worker, honest.wallet.address)
        assert image_out.image == honest_image  # the same render, by the honest node
        ((_, worker, evidence, reason),) = dispatcher.store.failed_receipts(job_id)
        assert eip712.same_address(worker, acct.address)
        assert evidence.trajectory_root == committed.root
        assert reason.startswith("image: block distance"), reason
        assert len(dispatcher.reputation.get(acct.address).strikes) == 1
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        payable = [r.receipt for r in dispatcher.store.unsettled_receipts()]
        assert [r.worker.lower() for r in payable if r.job_id == job_id] == [
            honest.wallet.address.lower()
        ]
        failed = next(c for c in checks_of(net.tmp) if c["verdict"] == "fail")
        assert failed["step"] == offer.params.steps  # the final leaf
        assert eip712.same_address(failed["verifier"], honest.wallet.address)
        assert failed["distance"] > 10 * failed["tolerance"]
        assert failed["imageRule"] == "block"


async def test_honest_nodes_pass_lossy_jobs_by_the_pixels_they_open(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory(verification=EVERY) as net:
        await net.add_node(backend, "alice")
        await net.add_node(backend, "bob")
        with trio.fail_after(120):
            for fmt in ("webp", "jpeg"):
                request = tiny_request(1, scheduler="euler", output_format=fmt, seed=5)
                (image,) = (await render(net.addr, request)).images
                assert image.image[:4] == (b"RIFF" if fmt == "webp" else b"\xff\xd8\xff\xe0")
        checks = checks_of(net.tmp)
        assert [(c["verdict"], c.get("imageRule")) for c in checks] == [("pass", PIXELS_RULE)] * 2


@asynccontextmanager
async def _rogue_opening_pixels(net: Net) -> AsyncIterator[tuple[Channel, Any]]:
    """`rogue_node`, advertising `OPEN_PIXELS_FEATURE`: it is asked for its pixels."""
    acct = Account.create()
    async with open_host(key_path=None, listen=()) as host:
        channel = await host.open_channel(net.addr, JOBS_PROTOCOL)
        caps = Capabilities(
            peer_id=host.peer_id, version=OPEN_PIXELS_FEATURE, wallet=acct.address,
            expiry=int(time.time()) + 600, models=[MODEL], slots=1, backend="rogue",
            device="cpu", max_pixels=1 << 20,
        )  # fmt: skip
        sig = eip712.sign_binding(bytes(acct.key), net.domain, caps)
        await channel.send(NodeHello(capabilities=caps, binding_signature=sig))
        welcome = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(welcome, Welcome)
        yield channel, acct


async def test_a_4x4_patch_on_a_webp_is_caught_by_the_pixels_the_rogue_opens(
    net_factory: Any, backend: Any
) -> None:
    """The rogue renders honestly, commits its honest trajectory, opens its honest pixels
    (they match the verifier's decode) but delivers a WebP with a 4 x 4 patch painted on:
    not the encode of the pixels it opened, so it fails, whatever the block distance."""
    async with (
        net_factory(verification=EVERY) as net,
        _rogue_opening_pixels(net) as (channel, acct),
        trio.open_nursery() as tasks,
    ):
        tasks.start_soon(heartbeats, channel)
        dispatcher = net.coordinator.dispatcher
        results: list[Any] = []

        async def client() -> None:
            request = tiny_request(1, scheduler="euler", output_format="webp")
            results.append(await render(net.addr, request))

        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                offer = await take_offer(channel)
                job = _render_job(offer.params, None)
                out = await trio.to_thread.run_sync(
                    backend.render, job, lambda _: None, lambda: False
                )
                assert out.pixels is not None and out.trajectory is not None
                honest = Image.open(io.BytesIO(out.pixels)).convert("RGB")
                r, g, b = honest.getpixel((30, 30))  # type: ignore[misc]
                painted = honest.copy()
                painted.paste((255 - r, 255 - g, 255 - b), (28, 28, 32, 32))
                image = encode_rgb(painted, "webp")
                assert image != out.image
                job_id = await submit_result(
                    net, channel, acct, offer, image, out.trajectory, dtype=backend.dtype_name
                )
                challenge = await receive_skipping(channel, (Challenge,))
                assert challenge.pixels is True  # asked: it named the feature, a WebP job
                honest_node = await net.add_node(backend, "honest")
                while len(dispatcher.nodes) < 2:
                    await trio.sleep(0.05)
                answer = ChallengeAnswer(
                    job_id=job_id,
                    openings=[wire(out.trajectory, k) for k in challenge.steps],
                    pixels=PixelsOpening(png=out.pixels, encoder=encoder_build()),
                )
                await channel.send(answer, limit=RESULT_FRAME_LIMIT)
                tasks.start_soon(_refuse_every_check, channel)
        (result,) = results
        (image_out,) = result.images
        assert eip712.same_address(image_out.receipt.worker, honest_node.wallet.address)
        assert image_out.image == out.image  # the honest node's render of the same job
        ((_, worker, _, reason),) = dispatcher.store.failed_receipts(job_id)
        assert eip712.same_address(worker, acct.address)
        assert "not the encode of the opened pixels" in reason, reason
        (kept,) = dispatcher.store.failed_evidence(job_id)
        evidence = decode_evidence(kept)  # the opened pixels are kept for a dispute
        assert evidence.challenge is not None and evidence.challenge.pixels == answer.pixels
        assert len(dispatcher.reputation.get(acct.address).strikes) == 1
        assert dispatcher.reputation.get(honest_node.wallet.address).strikes == []
        failed = next(c for c in checks_of(net.tmp) if c["verdict"] == "fail")
        assert failed["imageRule"] == PIXELS_RULE and failed["tolerance"] == 0.0
        tasks.cancel_scope.cancel()


async def _final_leaf(dispatcher: Dispatcher, job_id: bytes) -> tuple[str, StepOpeningWire]:
    """The job's worker (wallet) and its final leaf, opened against its receipt's root."""
    receipt = stored_receipt(dispatcher, job_id)
    peer = peer_of(dispatcher, receipt.worker)
    res = await dispatcher.challenge(peer, job_id, [receipt.steps_done], timeout=20)
    assert res.answer is not None and res.fault(receipt) is None
    (opening,) = res.answer.openings
    return receipt.worker, opening


async def test_a_verifier_node_decodes_or_refuses_with_a_code(
    net_factory: Any, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exchange itself, against real nodes: the decode is the delivered PNG (and, for
    JPEG and WebP jobs, re-encoded by the coordinator, the delivered file); a latent of the
    wrong size is `bad_leaf` (the worker's fault), another declared mode is `mode`."""
    async with net_factory() as net:
        await net.add_node(backend, "alice")
        await net.add_node(backend, "bob")
        request = tiny_request(1)
        with trio.fail_after(60):
            result = await render(net.addr, request)
        capsys.readouterr()  # from here on: what the image check logs
        (delivered,) = result.images
        dispatcher = net.coordinator.dispatcher
        params: JobParams = job_params(request, 0)
        worker, final = await _final_leaf(dispatcher, delivered.job_id)

        async def check(opening: StepOpeningWire, dtype: str = backend.dtype_name) -> Any:
            return await verify_image(
                dispatcher, params=params, worker=worker, final=opening,
                image=delivered.image, dtype=dtype, timeout=30,
            )  # fmt: skip

        with trio.fail_after(60):
            honest = await check(final)
            assert honest.passed and honest.distance == 0.0, honest.reason
            assert not eip712.same_address(dispatcher.nodes[honest.verifier].wallet, worker)
            (latents,) = [t for t in final.tensors if t.name == "latents"]
            half = len(latents.data) // 2
            small = TensorEntry(
                name="latents", dtype=latents.dtype, shape=[1, 2, *latents.shape[2:]],
                data=latents.data[:half],
            )  # fmt: skip
            others = [t for t in final.tensors if t.name != "latents"]
            bad = await check(msgspec.structs.replace(final, tensors=[small, *others]))
            assert not bad.passed and bad.distance is None and bad.code == "bad_leaf", bad
            other_mode = await check(final, dtype="bfloat16")
            # no node advertises that mode: none is asked (`choose_verifier(dtype=)`)
            assert other_mode.distance is None and other_mode.verifier is None, other_mode
            assert other_mode.reason.startswith("no verifier"), other_mode
            for fmt in ("jpeg", "webp"):  # like with like: the node's encoder on both sides
                lossy_request = tiny_request(1, output_format=fmt, seed=3)
                (lossy,) = (await render(net.addr, lossy_request)).images
                lossy_worker, lossy_final = await _final_leaf(dispatcher, lossy.job_id)
                verdict = await verify_image(
                    dispatcher, params=job_params(lossy_request, 0), worker=lossy_worker,
                    final=lossy_final, image=lossy.image, dtype=backend.dtype_name, timeout=30,
                )  # fmt: skip
                assert verdict.passed and verdict.distance == 0.0, verdict.reason
        assert len(dispatcher.verifications) == 0
    logs = capsys.readouterr()
    assert "latent_decoded" in logs.out + logs.err
    assert PROMPT not in logs.out + logs.err
