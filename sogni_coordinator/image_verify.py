"""The image check: a verifier node decodes the committed final latent and the coordinator
compares that image with the one the worker delivered (docs/IMAGE_CHECK.md).

Why: the step checks prove the committed latents are honest steps of the model from the job's
seed; nothing in them ties the delivered image to the last latent. A worker could commit an
honest trajectory and deliver another image (a cheaper render, a cached picture, an edit).

How: the worker's opened final leaf (already proved against its receipt's root) goes to a node
of another wallet serving the model (`verifiers.choose_verifier`) in a `VerifyDecode`; that
node decodes it with the model's VAE exactly as its backend ends a render
(`sogni_node.verify.decode_check`) and answers a lossless PNG (`DecodeVerified`). Both images
are compared here with Pillow (no numpy, no torch in the coordinator), as RGB at the job's
size, by `image_distance`: the largest mean absolute difference, in 0..255 levels, over any
8 x 8 pixel block (one latent cell of an SD VAE) and channel. A block statistic rather than the
whole-image mean so that a small painted patch cannot hide in the average. For a JPEG or WebP
job the verifier's pixels are first put through the node's own encoder
(`sogni_protocol.image_encoding`, `reference_image`) so that like is compared with like: an
honest image is then the same bytes or within a small measured tolerance, not "within the
encoder's error". The image passes when the distance is within the tolerance measured for
the declared mode and output format (`image_tolerance`).

Opened pixels (`judge_image`, docs/IMAGE_CHECK.md "Opened pixels"): a node naming
`OPEN_PIXELS_FEATURE` opens the lossless pixels its JPEG or WebP was encoded from with the
final leaf. Then the pixels rule decides: the pixels must be within the PNG tolerance of the
verifier's decode, and the delivered file must be the shared encoder's output of them, byte
for byte. The receipt signs the delivered file's hash before the challenge, so that equality
binds the pixels to it: the delivered file is proved to encode pixels as close to the
committed latent's decode as a PNG job's image must be. When the bytes differ and either side's
codec build is not one measured to encode alike (`image_encoding.byte_exact`), the codec rule
decides: the pixels still within the PNG tolerance of the decode, and the delivered file within
`CODEC_TOLERANCES` of their encode here (what another build of the same codec may differ by,
measured by the bench). Not the block rule: the build line is the node's word, and a cheat that
claimed an unmeasured build would otherwise get the block rule's weaker detection. The verdict
names its rule.
"""

from __future__ import annotations

import io
import math
import random
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import trio
from PIL import Image, ImageChops, ImageStat

from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verifiers import (
    PendingVerifications,
    StepVerdict,
    choose_verifier,
    path_bound,
    tolerance_for,
)
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.image_encoding import LOSSY_FORMATS, byte_exact, encode_rgb, encoder_build
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    DecodeVerified,
    JobImage,
    JobParams,
    PixelsOpening,
    StepOpeningWire,
    VerifyDecode,
    decode,
    encode,
)

__all__ = [
    "BLOCK",
    "BLOCK_RULE",
    "CODEC_RULE",
    "CODEC_TOLERANCES",
    "FLOAT16_CPU",
    "IMAGE_TOLERANCES",
    "LOSSY_TOLERANCES",
    "PIXELS_RULE",
    "ImageCheck",
    "ImageDistance",
    "check_distance",
    "delivered_image",
    "image_distance",
    "image_tolerance",
    "judge_image",
    "reference_image",
    "verify_image",
]

log = get_logger(__name__)

BLOCK = 8
"""Side in pixels of the blocks whose mean difference is compared (one SD latent cell)."""

FLOAT16_CPU = "float16@cpu-x86_64-avx512-avx512_core_bf16-torch2.13"
"""The one CPU float16 path measured (`verifiers.TOLERANCES`). Its image rows are keyed by the
path, not by a bare `float16` as bfloat16's are, so a bare `float16` (an older node, path
unknown), another path or CUDA float16 stays inconclusive. `python -m bench image`
(BENCHMARKS.md "Image check", 1 Dec 2026): 1 and 2 threads, batch 2 on this path and the
all-AVX2 path's renders against this path's decode (covered as bfloat16's rows cover theirs),
after `decode_check` stopped upcasting StableDiffusionPipeline's float16 VAE (the pipeline
never does): on this path at 1 and 2 threads every PNG is the verifier's byte for byte (as for
float32); batch 2 and the all-AVX2 path differ by up to 0.109 (PNG) / 3.3 (JPEG) / 5.39 (WebP)
levels. PNG 10x (at least 1), JPEG/WebP 2x the largest calibration distance (the lossy rows
pool float16's own providers: its VAE decodes in float16): 1 / 6.6 / 11; 0 of 1000 held-out
honest checks over per format. Detection for a float16 worker, 50 jobs per cheat: PNG jobs
and the pixels rule (lossy jobs with opened pixels) 100% of every cheat; the block rule on
lossy jobs without opened pixels misses faint cheats (truncated schedule 80-82%, 4 x 4 patch
84-86%, WebP q75 re-encode 0%)."""

IMAGE_TOLERANCES: Mapping[str, float] = {
    "float32": 1.0,
    "float32+int8": 1.0,
    "float32+int8-dynamic": 1.0,
    "float32+quanto-int8": 1.0,
    "float32+quanto-int4": 1.0,
    "bfloat16": 3.6,
    FLOAT16_CPU: 1.0,
}
"""Declared numeric mode -> the largest block distance (levels, 0..255) between an honest
worker's PNG and a verifier's decode of its final latent in the same mode: 10x the largest
honest distance `python -m bench image` measured, at least 1 level (BENCHMARKS.md "Image
check": float32 and the quantized modes, whose VAE stays float32, differ by at most one level
on one pixel of a block, 1/64; bfloat16 across CPU code paths by up to 0.42; 0 false
rejections in 1000 held-out honest checks). CPU float16 has a row for its measured path
only (`FLOAT16_CPU`; see there). Other modes were not measured: inconclusive."""

_FLOAT32_VAE = [m for m in IMAGE_TOLERANCES if m not in ("bfloat16", FLOAT16_CPU)]

LOSSY_TOLERANCES: Mapping[str, Mapping[str, float]] = {
    "jpeg": {**dict.fromkeys(_FLOAT32_VAE, 3.1), "bfloat16": 8.0, FLOAT16_CPU: 6.6},
    "webp": {**dict.fromkeys(_FLOAT32_VAE, 5.4), "bfloat16": 12.0, FLOAT16_CPU: 11.0},
}
"""Lossy output format -> declared mode -> the largest block distance (levels) between an
honest worker's JPEG/WebP and the verifier's decode put through the same encoder
(`reference_image`). Not the encoder's whole error (both sides share it now) but what is left
where the two decodes differ by a level on a pixel: a quantised coefficient tipping to the
next step, up to 1.9 (JPEG) and 2.7 (WebP) levels for float32 VAEs, 5.1 and 6.0 for bfloat16
ones. 2x the largest of 40 calibration renders per provider, pooled over the modes whose VAE
decodes in the same dtype (the quantized modes quantize only the UNet); `python -m bench
image`, BENCHMARKS.md "Image check": 0 of 1000 held-out honest checks over, per format.
Retrained sogni-shapes-64 (1682ff6): honest max 1.80 / 2.41 (bfloat16 4.45 / 5.5), still under
these; that run proposes 3.6 / 4.7, kept at the older values (docs/VERIFICATION.md). Session 23's
weights (session 24's run): 1.52 / 2.55 (bfloat16 4.03 / 5.59, CPU float16 3.7 / 5.83), 0 of
1,000 held-out checks over these; its own proposal for WebP (1.4, from a calibration maximum
of 0.69) would reject 3, so a run's proposal is not taken without the held-out check."""


def image_tolerance(dtype: str, output_format: str) -> float | None:
    """The tolerance for a declared mode and output format, None if either is unmeasured.
    A path-bound mode with a row of its own (`FLOAT16_CPU`) takes that row; any other
    path-bound mode (`bfloat16@<path>`) whose steps have a tolerance takes its bare mode's:
    that one was measured across code paths, so on one path it is a looser bound, not a
    guess; a path without a step tolerance has none here either."""
    table = IMAGE_TOLERANCES if output_format == "png" else LOSSY_TOLERANCES.get(output_format, {})
    if path_bound(dtype):
        if tolerance_for(dtype) is None:
            return None
        if dtype in table:  # measured on this path itself (`FLOAT16_CPU`)
            return table[dtype]
        dtype = dtype.split("@", 1)[0]
    return table.get(dtype)


@dataclass(frozen=True)
class ImageDistance:
    """`block`: the largest mean absolute difference over any BLOCK x BLOCK block and
    channel (the verdict's distance); `mean`: over the whole image. Both in 0..255 levels,
    inf when the delivered image does not decode at the job's size."""

    block: float
    mean: float


_FAR = ImageDistance(math.inf, math.inf)


_JOB_FORMATS = ("PNG", "JPEG", "WEBP")


def _rgb(data: bytes, width: int, height: int) -> Image.Image | None:
    """`data` decoded as RGB, or None if it is not a complete image of that size (the size is
    read from the header before any pixel is decoded: no decompression bombs). Only the
    formats a job can ask for are tried: Pillow would otherwise open whatever a worker or a
    verifier sent as EPS (Ghostscript), PSD, FITS and the rest."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_JOB_FORMATS) as im:
                if im.size != (width, height):
                    return None
                im.load()
                return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError):  # fmt: skip
        return None


def _reference(data: bytes, width: int, height: int) -> Image.Image:
    """The verifier's image decoded; ValueError (the verifier's fault) if it is not one."""
    ref = _rgb(data, width, height)
    if ref is None:
        raise ValueError("the verifier's image is not a complete image of the job's size")
    return ref


def image_distance(delivered: bytes, reference: bytes, width: int, height: int) -> ImageDistance:
    """How far the delivered image lies from the reference (see `ImageDistance`).
    The reference must decode at the job's size (`ValueError` otherwise: the verifier's
    fault, not the worker's); a delivered image that does not is infinitely far."""
    ref = _reference(reference, width, height)
    if delivered == reference:  # the same encoder on the same pixels: the usual honest case
        return ImageDistance(0.0, 0.0)
    got = _rgb(delivered, width, height)
    return _FAR if got is None else _pixels_distance(got, ref)


def _pixels_distance(got: Image.Image, ref: Image.Image) -> ImageDistance:
    """`ImageDistance` between two decoded RGB images of one size."""
    width, height = ref.size
    diff = ImageChops.difference(got, ref)
    mean = sum(ImageStat.Stat(diff).mean) / 3
    cells = (max(1, -(-width // BLOCK)), max(1, -(-height // BLOCK)))
    block = 0.0
    for band in diff.split():  # float box averages: no rounding to whole levels
        reduced = band.convert("F").resize(cells, Image.Resampling.BOX)
        hi = reduced.getextrema()[1]
        block = max(block, float(hi))  # type: ignore[arg-type]
    return ImageDistance(block, mean)


def reference_image(decoded: bytes, output_format: str, width: int, height: int) -> bytes:
    """What an honest worker delivers for the verifier's decode `decoded` (a lossless PNG):
    the PNG itself for a PNG job; for a JPEG or WebP job its pixels put through the node's
    encoder (`sogni_protocol.image_encoding`). ValueError when `decoded` is not a complete
    image of the job's size (the verifier's fault)."""
    if output_format not in LOSSY_FORMATS:
        return decoded
    return encode_rgb(_reference(decoded, width, height), output_format)


def check_distance(
    delivered: bytes, decoded: bytes, output_format: str, width: int, height: int
) -> ImageDistance:
    """The image check's distance: the delivered image against the verifier's decode as an
    honest worker would have encoded it for this job (`reference_image`)."""
    reference = reference_image(decoded, output_format, width, height)
    return image_distance(delivered, reference, width, height)


PIXELS_RULE = "pixels"
"""The worker opened its pixels: within the PNG tolerance of the decode, and the delivered
file their encode byte for byte (or the byte check failed on a build measured to be exact)."""
CODEC_RULE = "codec"
"""The worker opened its pixels, the delivered file is not their encode here, and a codec
build (the node's claimed one or this machine's) is not measured to encode alike: the pixels
within the PNG tolerance of the decode, and the delivered file within `CODEC_TOLERANCES` of
their encode here."""
BLOCK_RULE = "block"
"""The delivered file against the verifier's decode put through the encoder, at the lossy
tolerance: PNG jobs and lossy jobs without opened pixels (an older node, pixels lost)."""

CODEC_TOLERANCES: Mapping[str, float] = {"jpeg": 3.0, "webp": 3.0}
"""Lossy format -> the largest block distance (levels) between the delivered file and the
shared encoder's output of the opened pixels, when a codec build is not measured to encode
alike. Only what another build of the same codec at the same settings may differ by: the
pixels are the node's own, so neither the decode's spread nor the encoder's own error (both
files carry it) enters. 2x the largest calibration distance of the same arithmetic at another
precision (RGB -> YCbCr computed exactly, handed to libjpeg: 1.48 levels, 0 of 1,000 held-out
checks over; `python -m bench image`, BENCHMARKS.md "Image check"), the same for WebP (Pillow
cannot change libwebp's arithmetic). Every cheat of the bench, made by a node claiming an
unmeasured build, is over it on 100% of 50 JPEG and 50 WebP jobs (the closest at 3.02; on
session 23's weights the truncated schedule's closest JPEG job is 2.86: 98% caught). Builds
whose encoder decides otherwise (mozjpeg's trellis, a libwebp with other heuristics, another
rounding convention) are not covered and may be refused: docs/IMAGE_CHECK.md, "The codec
rule"."""


@dataclass(frozen=True)
class ImageCheck:
    """What `judge_image` decided: the rule, the verdict's distance and tolerance (levels),
    whether it passed, and the reason (no pixels, no prompt)."""

    rule: str
    distance: float
    tolerance: float
    passed: bool
    reason: str


def _block_check(
    delivered: bytes, decoded: bytes, fmt: str, size: tuple[int, int], tol: float, why: str
) -> ImageCheck:
    """The block rule; `why` ends the reason's parenthesis (mode, format, why this rule)."""
    width, height = size
    d = check_distance(delivered, decoded, fmt, width, height)
    passed = d.block <= tol
    if math.isinf(d.block):
        reason = f"image: not a {width}x{height} image"
    else:
        word = "within" if passed else "over"
        reason = f"image: block distance {d.block:.3g} {word} {tol:g} levels "
        reason += f"(mean {d.mean:.3g}; {why})"
    return ImageCheck(BLOCK_RULE, d.block, tol, passed, reason)


def judge_image(
    delivered: bytes,
    decoded: bytes,
    output_format: str,
    width: int,
    height: int,
    dtype: str,
    pixels: PixelsOpening | None = None,
    coordinator_build: str | None = None,
) -> ImageCheck | None:
    """The image check's verdict on `delivered` (the worker's file) against `decoded` (the
    verifier's PNG), for a render declared in `dtype`; None when no tolerance is measured for
    it. With `pixels` (a lossy job's opened pixels) the pixels rule decides, or the codec
    rule when the bytes differ on a codec build not known to be exact (`coordinator_build`:
    this machine's, `encoder_build()` by default). ValueError when `decoded` is not a
    complete image of the job's size (the verifier's fault). Blocking (Pillow)."""
    tol = image_tolerance(dtype, output_format)
    png_tol = image_tolerance(dtype, "png")
    if tol is None or png_tol is None:
        return None
    size, label = (width, height), f"{dtype}, {output_format}"
    if pixels is None or output_format not in LOSSY_FORMATS:
        why = f"{label}; no pixels opened" if output_format in LOSSY_FORMATS else label
        return _block_check(delivered, decoded, output_format, size, tol, why)
    ref = _reference(decoded, width, height)  # ValueError: the verifier's fault
    opened = _rgb(pixels.png, width, height)  # decoded once: the distance and the encode
    if opened is None:
        reason = f"image: the opened pixels are not a {width}x{height} image"
        return ImageCheck(PIXELS_RULE, math.inf, png_tol, False, reason)
    near = _pixels_distance(opened, ref)
    if near.block > png_tol:
        reason = (
            f"image: opened pixels at block distance {near.block:.3g} over {png_tol:g} levels "
            f"from the decode (mean {near.mean:.3g}; {label}; rule: pixels)"
        )
        return ImageCheck(PIXELS_RULE, near.block, png_tol, False, reason)
    mine = encode_rgb(opened, output_format)
    if mine == delivered:
        reason = (
            f"image: opened pixels within {png_tol:g} levels of the decode (block distance "
            f"{near.block:.3g}; {label}); the delivered file is their encode byte for byte"
        )
        return ImageCheck(PIXELS_RULE, near.block, png_tol, True, reason)
    off = image_distance(delivered, mine, width, height)
    shown = "undecodable" if math.isinf(off.block) else f"block distance {off.block:.3g}"
    here = encoder_build() if coordinator_build is None else coordinator_build
    if byte_exact(pixels.encoder, output_format) and byte_exact(here, output_format):
        reason = (
            f"image: the delivered {output_format} is not the encode of the opened pixels "
            f"({shown}; encoders {pixels.encoder!r} and {here!r} encode alike; rule: pixels)"
        )
        return ImageCheck(PIXELS_RULE, off.block, 0.0, False, reason)
    codec_tol = CODEC_TOLERANCES[output_format]
    passed = off.block <= codec_tol
    word = "within" if passed else "over"
    reason = (
        f"image: opened pixels within {png_tol:g} levels of the decode (block distance "
        f"{near.block:.3g}); the delivered {output_format} at {shown} from their encode here, "
        f"{word} {codec_tol:g} levels ({label}; encoder {pixels.encoder[:64] or 'unnamed'!r} "
        f"vs {here[:64]!r}, not measured alike; rule: codec)"
    )
    return ImageCheck(CODEC_RULE, off.block, codec_tol, passed, reason)


def delivered_image(data: bytes) -> bytes:
    """The image in `data`: the bytes themselves, or the image of a stored `JobImage` frame
    (what the coordinator's results folder holds, `delivery.ResultFiles`)."""
    if data.startswith(_IMAGE_MAGIC):
        return data
    try:
        frame = decode(data)
    except InvalidMessage:
        return data
    return frame.image if isinstance(frame, JobImage) else data


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF")


class _Dispatcher(Protocol):
    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...


async def verify_image(
    dispatcher: _Dispatcher,
    *,
    params: JobParams,
    worker: str,
    final: StepOpeningWire,
    image: bytes,
    dtype: str,
    timeout: float,
    rng: random.Random | None = None,
    pixels: PixelsOpening | None = None,
) -> StepVerdict:
    """Ask a node of another wallet than `worker` to decode `final` (the worker's opened
    final leaf) and compare its image with `image` (the delivered one, or the stored
    `JobImage` frame holding it: `delivered_image`), with the worker's opened `pixels` when it
    opened them (`judge_image`: the verdict's `rule`). A verdict with
    `distance` None is inconclusive (no verifier, no answer, a refusal), except that a refusal
    keeps its `code` (`bad_leaf`: the worker's final latent does not decode at the job's size,
    which `checks.py` holds against the worker); over tolerance, evidence against the worker."""
    step = final.step
    tol = image_tolerance(dtype, params.output_format)

    def fail(reason: str, verifier: str | None = None, code: str | None = None) -> StepVerdict:
        log.info("image_not_verified", step=step, verifier=verifier, reason=reason)
        t = tol if tol is not None else 0.0
        return StepVerdict(verifier, step, None, t, False, reason, code)

    if tol is None:
        return fail(f"image: no tolerance measured for {dtype!r} {params.output_format}")
    if not any(t.name == "latents" for t in final.tensors):
        return fail("image: the final leaf carries no latent")
    peer = choose_verifier(
        dispatcher.nodes, params.model_id, worker, rng, dtype=dtype,
        pixels=params.width * params.height,
    )  # fmt: skip
    if peer is None:
        return fail(f"no verifier: no other wallet's node serves {params.model_id}")
    try:
        request = VerifyDecode(
            check_id=secrets.token_bytes(32),
            model_id=params.model_id,
            dtype=dtype,
            width=params.width,
            height=params.height,
            opening=final,
            deadline=int(time.time() + timeout) + 1,
        )
    except ValueError as exc:
        return fail(f"image: cannot ask for a decode: {exc}")
    if len(encode(request)) > RESULT_FRAME_LIMIT:
        return fail("image: the final leaf is too large to send")
    reply = await dispatcher.verifications.ask_image(
        peer, dispatcher.nodes[peer].outbox, request, timeout
    )
    if not isinstance(reply, DecodeVerified):  # `bad_leaf` blames the worker's leaf: checks.py
        reason, code = reply
        return fail(f"image: {reason}", peer, code)
    try:
        ref, fmt, w, h = reply.image, params.output_format, params.width, params.height
        judged = await trio.to_thread.run_sync(
            lambda: judge_image(delivered_image(image), ref, fmt, w, h, dtype, pixels)
        )
    except ValueError as exc:
        return fail(f"image: {exc}", peer)
    assert judged is not None  # the tolerance was looked up above
    log.info(
        "image_verified",
        step=step,
        verifier=peer,
        distance=judged.distance,
        passed=judged.passed,
        rule=judged.rule,
    )
    return StepVerdict(
        peer, step, judged.distance, judged.tolerance, judged.passed, judged.reason,
        rule=judged.rule,
    )  # fmt: skip
