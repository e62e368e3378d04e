"""The image check's coordinator side (`sogni_coordinator.image_verify`): real PNG/JPEG/WebP
bytes compared with Pillow (a lossy job's reference through the node's own encoder), and the
`VerifyDecode` exchange through the real `PendingVerifications` with a scripted verifier node
on the other end of its outbox."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
from PIL import Image

from sogni_coordinator.image_verify import (
    FLOAT16_CPU,
    IMAGE_TOLERANCES,
    LOSSY_TOLERANCES,
    check_distance,
    delivered_image,
    image_distance,
    image_tolerance,
    judge_image,
    reference_image,
    verify_image,
)
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verifiers import PendingVerifications, StepVerdict, tolerance_for
from sogni_protocol.image_encoding import encode_rgb
from sogni_protocol.messages import (
    DecodeVerified,
    JobImage,
    JobParams,
    Message,
    Receipt,
    RenderMeta,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
    encode,
)

SIZE = 64
WORKER = "0x" + "11" * 20
OTHER = "0x" + "22" * 20


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    """A deterministic image with edges and gradients (not flat: JPEG has work to do)."""
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size))
    im.putdata(
        [
            ((x * 4 + seed) % 256, (y * 4) % 256, 200 if (x // 16 + y // 16) % 2 else 30)
            for y in range(size)
            for x in range(size)
        ]
    )
    im.paste((rng.randrange(256), 0, 0), (8, 8, 24, 24))
    return im


def encoded(im: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_the_same_pixels_are_at_distance_zero() -> None:
    a = encoded(picture())
    d = image_distance(a, encoded(picture()), SIZE, SIZE)
    assert (d.block, d.mean) == (0.0, 0.0)


def test_one_level_on_one_pixel_is_a_64th_of_a_level_in_its_block() -> None:
    im = picture()
    r, g, b = im.getpixel((40, 40))  # type: ignore[misc]
    im.putpixel((40, 40), (r, g, b + 1 if b < 255 else b - 1))
    d = image_distance(encoded(im), encoded(picture()), SIZE, SIZE)
    assert d.block == pytest.approx(1 / 64)
    assert d.block <= min(IMAGE_TOLERANCES.values())


def test_a_small_painted_patch_stands_out_of_its_block_not_of_the_mean() -> None:
    im = picture()
    im.paste((255, 255, 255), (48, 48, 56, 56))  # one 8x8 block, 1/64 of the image
    d = image_distance(encoded(im), encoded(picture()), SIZE, SIZE)
    assert d.block > 50 * max(IMAGE_TOLERANCES.values())
    assert d.mean < d.block / 30


def test_another_size_or_garbage_is_infinitely_far_and_a_bad_reference_is_an_error() -> None:
    ref = encoded(picture())
    assert math.isinf(image_distance(encoded(picture(size=72)), ref, SIZE, SIZE).block)
    assert math.isinf(image_distance(b"\x89PNG\r\n\x1a\n not an image", ref, SIZE, SIZE).block)
    assert math.isinf(image_distance(ref[: len(ref) // 2], ref, SIZE, SIZE).block)  # truncated
    with pytest.raises(ValueError):
        image_distance(ref, b"junk", SIZE, SIZE)
    with pytest.raises(ValueError):  # a verifier's image of another size is its own fault
        image_distance(ref, encoded(picture(size=72)), SIZE, SIZE)
    # only a job's formats are decoded: Pillow's other parsers (EPS runs Ghostscript) never
    for other in ("BMP", "TIFF", "PPM"):
        with pytest.raises(ValueError):
            image_distance(ref, encoded(picture(), other), SIZE, SIZE)


def test_a_jpeg_of_the_same_pixels_is_no_png_jobs_image() -> None:
    jpeg = encoded(picture(), "JPEG", quality=92, subsampling=2)
    d = check_distance(jpeg, encoded(picture()), "png", SIZE, SIZE)
    assert d.block > image_tolerance("float32", "png")  # type: ignore[operator]


def _painted(im: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    im = im.copy()
    r, g, b = im.getpixel(box[:2])  # type: ignore[misc]
    im.paste(tuple(0 if c > 127 else 255 for c in (r, g, b)), box)
    return im


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_lossy_job_compares_like_with_like(fmt: str) -> None:
    """The honest worker's JPEG/WebP is the verifier's pixels through the same encoder: the
    same bytes, distance 0, where the old allowance let an edit of 30 levels through."""
    verifier_png = encoded(picture())
    honest = encode_rgb(picture(), fmt)
    assert reference_image(verifier_png, fmt, SIZE, SIZE) == honest
    assert check_distance(honest, verifier_png, fmt, SIZE, SIZE).block == 0.0
    tol = image_tolerance("float32", fmt)
    assert tol is not None and tol < 8
    cheats = {
        "4x4 patch": encode_rgb(_painted(picture(), (40, 40, 44, 44)), fmt),
        "another quality": encoded(picture(), fmt.upper(), quality=75),
        "PNG of the pixels": verifier_png,  # not the node's encoding of them
        "another picture": encode_rgb(picture(seed=7), fmt),
    }
    for name, image in cheats.items():
        d = check_distance(image, verifier_png, fmt, SIZE, SIZE)
        assert d.block > tol, (name, d)


def test_a_png_jobs_reference_is_the_verifiers_png_untouched() -> None:
    verifier_png = encoded(picture())
    assert reference_image(verifier_png, "png", SIZE, SIZE) == verifier_png


def test_the_reference_carries_nothing_of_the_verifiers_file_but_its_pixels() -> None:
    """A verifier's PNG with text, gamma or an ICC profile re-encodes to the same bytes: only
    pixels enter the node's encoder (a lying verifier cannot steer the reference's metadata)."""
    from PIL import ImageCms, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decorated = encoded(picture(), pnginfo=info, icc_profile=icc)
    assert decorated != encoded(picture())
    for fmt in ("jpeg", "webp"):
        plain = reference_image(encoded(picture()), fmt, SIZE, SIZE)
        assert reference_image(decorated, fmt, SIZE, SIZE) == plain
    with pytest.raises(ValueError):  # a verifier's answer of another size is its own fault
        reference_image(encoded(picture(size=72)), "jpeg", SIZE, SIZE)


def test_unmeasured_modes_and_formats_have_no_tolerance() -> None:
    assert image_tolerance("float16", "png") is None
    assert image_tolerance("float16", "jpeg") is None
    assert image_tolerance("float32", "gif") is None
    assert image_tolerance("float32", "png") == IMAGE_TOLERANCES["float32"]
    for fmt in ("jpeg", "webp"):
        assert set(LOSSY_TOLERANCES[fmt]) == set(IMAGE_TOLERANCES)


# --- the exchange -------------------------------------------------------------------------------
@dataclass
class Dispatcher:
    """What `verify_image` reads of the dispatcher: its nodes and pending verifications."""

    nodes: dict[str, NodeLink] = field(default_factory=dict)
    verifications: PendingVerifications = field(default_factory=PendingVerifications)

    def add(self, peer: str, wallet: str) -> trio.MemoryReceiveChannel[Message]:
        send, recv = trio.open_memory_channel[Message](8)
        self.nodes[peer] = NodeLink(peer, wallet, frozenset({"m"}), 1, send)
        return recv


def final_leaf(step: int = 8) -> StepOpeningWire:
    latents = TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=bytes(1024))
    return StepOpeningWire(
        step=step,
        tensors=[latents],
        scalars=[ScalarEntry(name="timestep", value=1)],
        proof=[],
        n_leaves=step + 1,
    )


PARAMS = JobParams(
    model_id="m", positive_prompt="p", steps=8, guidance=5.0, width=SIZE, height=SIZE, seed=1
)

Answer = Callable[[VerifyDecode], DecodeVerified | VerifyRefused | None]


async def check(
    delivered: bytes, answer: Answer, *, params: JobParams = PARAMS, timeout: float = 1.0
) -> tuple[StepVerdict, list[VerifyDecode]]:
    """Run `verify_image` against one verifier node of another wallet (and the worker's own
    node, which must never be asked) that answers with `answer` (None: silence)."""
    d = Dispatcher()
    own = d.add("worker-peer", WORKER)
    inbox = d.add("verifier-peer", OTHER)
    asked: list[VerifyDecode] = []

    async def verifier() -> None:
        async for msg in inbox:
            assert isinstance(msg, VerifyDecode)
            asked.append(msg)
            reply = answer(msg)
            if reply is not None:
                d.verifications.answered("verifier-peer", reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(verifier)
        verdict = await verify_image(
            d, params=params, worker=WORKER, final=final_leaf(), image=delivered,
            dtype="float32", timeout=timeout,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.WouldBlock):
        own.receive_nowait()  # the worker's own wallet is never its verifier
    return verdict, asked


def decodes_to(image: bytes) -> Answer:
    return lambda msg: DecodeVerified(check_id=msg.check_id, image=image)


async def test_the_honest_image_passes_and_the_request_carries_the_final_leaf() -> None:
    image = encoded(picture())
    verdict, asked = await check(image, decodes_to(image))
    assert verdict.passed and verdict.distance == 0.0
    assert verdict.verifier == "verifier-peer" and verdict.step == 8
    (msg,) = asked
    assert (msg.width, msg.height, msg.dtype, msg.model_id) == (SIZE, SIZE, "float32", "m")
    assert msg.opening == final_leaf()


async def test_a_stored_result_frame_is_compared_by_its_image() -> None:
    image = encoded(picture())
    receipt = Receipt(
        job_id=bytes(32), offer_hash=bytes(32), worker=WORKER, coordinator=OTHER, model_id="m",
        result_hash=bytes(32), steps_done=8, work_units=1, completed_at=1,
    )  # fmt: skip
    meta = RenderMeta(backend="test", device="cpu", dtype="float32", threads=1)
    frame = encode(
        JobImage(
            job_id=bytes(32), index=0, seed=1, image=image, receipt=receipt,
            signature=bytes(65), meta=meta,
        )
    )  # fmt: skip
    verdict, _ = await check(frame, decodes_to(image))
    assert verdict.passed and verdict.distance == 0.0


async def test_another_image_fails_with_its_distance() -> None:
    verdict, _ = await check(encoded(picture(seed=7)), decodes_to(encoded(picture())))
    assert not verdict.passed and verdict.distance is not None
    assert verdict.distance > verdict.tolerance
    assert "over" in verdict.reason


async def test_a_delivered_image_of_another_size_fails_at_infinite_distance() -> None:
    verdict, _ = await check(encoded(picture(size=72)), decodes_to(encoded(picture())))
    assert not verdict.passed and verdict.distance is not None
    assert math.isinf(verdict.distance)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
async def test_a_lossy_job_is_compared_with_the_verifiers_pixels_re_encoded(fmt: str) -> None:
    lossy = msgspec.structs.replace(PARAMS, output_format=fmt)
    verifier_png = encoded(picture())
    verdict, _ = await check(encode_rgb(picture(), fmt), decodes_to(verifier_png), params=lossy)
    assert verdict.passed and verdict.distance == 0.0, verdict
    assert verdict.tolerance == image_tolerance("float32", fmt)
    patched = encode_rgb(_painted(picture(), (40, 40, 44, 44)), fmt)
    verdict, _ = await check(patched, decodes_to(verifier_png), params=lossy)
    assert not verdict.passed and "over" in verdict.reason, verdict


async def test_refusals_silence_and_bad_answers_are_inconclusive_keeping_the_reason() -> None:
    image = encoded(picture())
    blamed = "the node could not decode the final latent (ValueError)"
    v, _ = await check(
        image, lambda m: VerifyRefused(check_id=m.check_id, reason=blamed, code="bad_leaf")
    )
    assert v.distance is None and not v.passed and blamed in v.reason
    assert v.code == "bad_leaf"  # what checks.py holds against the worker
    v, _ = await check(
        image, lambda m: VerifyRefused(check_id=m.check_id, reason="other mode", code="mode")
    )
    assert v.distance is None and "other mode" in v.reason and v.code == "mode"
    v, _ = await check(image, lambda m: None, timeout=0.2)
    assert v.distance is None and "no answer" in v.reason and v.code is None
    v, _ = await check(image, decodes_to(b"not a png"))  # the verifier's fault, not the worker's
    assert v.distance is None and v.verifier == "verifier-peer"


async def test_no_other_wallet_or_an_unmeasured_mode_asks_nobody() -> None:
    d = Dispatcher()
    inbox = d.add("worker-peer", WORKER)
    v = await verify_image(
        d, params=PARAMS, worker=WORKER, final=final_leaf(), image=b"", dtype="float32",
        timeout=1.0,
    )  # fmt: skip
    assert v.distance is None and v.reason.startswith("no verifier")
    v = await verify_image(
        d, params=PARAMS, worker=OTHER, final=final_leaf(), image=b"", dtype="float16",
        timeout=1.0,
    )  # fmt: skip
    assert v.distance is None and "no tolerance" in v.reason
    with pytest.raises(trio.WouldBlock):
        inbox.receive_nowait()


def test_cpu_float16_is_checked_on_its_measured_path_only() -> None:
    """A float16 image row exists for the one measured path; a bare `float16` (an older node,
    path unknown), another CPU path, another torch or CUDA float16 stay inconclusive."""
    for fmt in ("png", "jpeg", "webp"):
        tol = image_tolerance(FLOAT16_CPU, fmt)
        assert tol is not None and tol >= image_tolerance("float32", fmt)  # type: ignore[operator]
    assert image_tolerance(FLOAT16_CPU, "png") == IMAGE_TOLERANCES[FLOAT16_CPU]
    assert tolerance_for(FLOAT16_CPU) is not None  # its steps are re-checked too
    others = (
        "float16",
        FLOAT16_CPU.replace("avx512_core_bf16", "avx2"),
        FLOAT16_CPU.replace("torch2.13", "torch2.14"),
        "float16@cuda-sm90-torch2.13",
    )
    for dtype in others:
        for fmt in ("png", "jpeg", "webp"):
            assert image_tolerance(dtype, fmt) is None, (dtype, fmt)
    # a block 1.5 levels off: over float16's PNG row (its decode is exact on its path, as
    # float32's is), judged on the measured path, unjudged when bare
    im = picture()
    for i, (x, y) in enumerate((x, y) for y in range(40, 48) for x in range(40, 48)):
        r, g, b = im.getpixel((x, y))  # type: ignore[misc]
        im.putpixel((x, y), (r, g, b - 1 - i % 2))
    delivered, decoded = encoded(im), encoded(picture())
    fp16 = judge_image(delivered, decoded, "png", SIZE, SIZE, FLOAT16_CPU)
    fp32 = judge_image(delivered, decoded, "png", SIZE, SIZE, "float32")
    assert fp16 is not None and not fp16.passed and fp16.distance == pytest.approx(1.5)
    assert fp32 is not None and not fp32.passed
    assert judge_image(delivered, decoded, "png", SIZE, SIZE, "float16") is None


def test_the_stored_result_frame_yields_its_image() -> None:
    """checks.py hands over the results folder's file: a `JobImage` frame, not the image."""
    image = encoded(picture())
    receipt = Receipt(
        job_id=bytes(32), offer_hash=bytes(32), worker=WORKER, coordinator=OTHER, model_id="m",
        result_hash=bytes(32), steps_done=8, work_units=1, completed_at=1,
    )  # fmt: skip
    meta = RenderMeta(backend="test", device="cpu", dtype="float32", threads=1)
    frame = encode(
        JobImage(
            job_id=bytes(32), index=0, seed=1, image=image, receipt=receipt,
            signature=bytes(65), meta=meta,
        )
    )  # fmt: skip
    assert delivered_image(frame) == image
    assert delivered_image(image) == image
    assert delivered_image(b"junk") == b"junk"
