"""The image check's pixels rule (`image_verify.judge_image`, docs/IMAGE_CHECK.md "Opened
pixels"): a worker that opens the lossless pixels of its JPEG or WebP is checked at the PNG
tolerance against the verifier's decode, and its delivered file must be the shared encoder's
output of those pixels byte for byte, unless a codec build on either side is not one measured
to encode alike: then the codec rule decides (the file within the codec tolerance of the
pixels' encode here), never the weaker block rule. Real Pillow bytes throughout."""

from __future__ import annotations

import io
import math
import random

import pytest
from PIL import Image

from sogni_coordinator.image_verify import (
    BLOCK_RULE,
    CODEC_RULE,
    CODEC_TOLERANCES,
    IMAGE_TOLERANCES,
    PIXELS_RULE,
    judge_image,
)
from sogni_protocol.image_encoding import SAVE_OPTIONS, byte_exact, encode_rgb, encoder_build
from sogni_protocol.messages import PixelsOpening

SIZE = 64
HERE = "x86_64 jpeg:turbo-3.2.0 webp:1.6.0"
"""A coordinator build measured to encode alike (whatever machine runs the test)."""
ARM = "aarch64 jpeg:turbo-3.2.0 webp:1.6.0"
"""A node build nobody measured: NEON paths."""


def render(seed: int = 0) -> Image.Image:
    """A render-like image: smooth gradients, soft shapes and fine noise (WebP and JPEG both
    have real work to do; a flat image would hide coefficient flips)."""
    rng = random.Random(seed)
    im = Image.new("RGB", (SIZE, SIZE))
    cx, cy = rng.randrange(16, 48), rng.randrange(16, 48)
    im.putdata(
        [
            (
                min(255, max(0, 255 - 3 * int(math.hypot(x - cx, y - cy)) + rng.randrange(-6, 7))),
                (x * 3 + y + seed * 17) % 256,
                min(255, max(0, 40 + 2 * y + rng.randrange(-6, 7))),
            )
            for y in range(SIZE)
            for x in range(SIZE)
        ]
    )
    return im


def png(im: Image.Image) -> bytes:
    return encode_rgb(im, "png")


def one_level_off(im: Image.Image, pixels: int = 6) -> Image.Image:
    """The same image with a few pixels a level away: what another honest decode looks like."""
    out = im.copy()
    for i in range(pixels):
        xy = ((7 * i + 3) % SIZE, (5 * i + 2) % SIZE)
        r, g, b = out.getpixel(xy)  # type: ignore[misc]
        out.putpixel(xy, (min(255, r + 1), g, b))
    return out


def patched(im: Image.Image, side: int = 4) -> Image.Image:
    """A `side` x `side` patch painted far from what was there (the cheat session 8 could
    not catch on every WebP job by block statistics)."""
    out = im.copy()
    r, g, b = out.getpixel((30, 30))  # type: ignore[misc]
    out.paste((255 - r, 255 - g, 255 - b), (28, 28, 28 + side, 28 + side))
    return out


def opened(im: Image.Image, encoder: str = HERE) -> PixelsOpening:
    return PixelsOpening(png=png(im), encoder=encoder)


def judge(
    delivered: bytes,
    decoded: Image.Image,
    fmt: str,
    pixels: PixelsOpening | None,
    here: str = HERE,
    dtype: str = "float32",
):  # type: ignore[no-untyped-def]
    return judge_image(delivered, png(decoded), fmt, SIZE, SIZE, dtype, pixels, here)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_an_honest_worker_passes_by_its_pixels_even_a_level_off_the_decode(fmt: str) -> None:
    honest = render()
    for decoded in (honest, one_level_off(honest)):
        got = judge(encode_rgb(honest, fmt), decoded, fmt, opened(honest))
        assert got is not None and got.passed and got.rule == PIXELS_RULE, got
        assert got.tolerance == IMAGE_TOLERANCES["float32"]  # the PNG tolerance, not 3.1/5.4
        assert got.distance <= 1 / 64 * 6 + 1e-9
        assert "byte for byte" in got.reason


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
@pytest.mark.parametrize("side", [4, 8])
def test_a_patch_painted_on_the_delivered_file_fails_whatever_pixels_are_opened(
    fmt: str, side: int
) -> None:
    honest = render(1)
    cheat = encode_rgb(patched(honest, side), fmt)
    # opens its honest pixels: they pass the decode, but the file is not their encode
    got = judge(cheat, honest, fmt, opened(honest))
    assert got is not None and not got.passed and got.rule == PIXELS_RULE, got
    assert got.tolerance == 0.0 and got.distance > 0
    assert "not the encode of the opened pixels" in got.reason
    # opens the patched pixels: the file is their encode, but they are far from the decode
    got = judge(cheat, honest, fmt, opened(patched(honest, side)))
    assert got is not None and not got.passed and got.rule == PIXELS_RULE, got
    assert got.distance > 10 * IMAGE_TOLERANCES["float32"]
    assert "over 1 levels from the decode" in got.reason


def test_pixels_of_another_image_or_not_an_image_fail() -> None:
    honest, other = render(2), render(3)
    fmt = "webp"
    got = judge(encode_rgb(honest, fmt), honest, fmt, opened(other))
    assert got is not None and not got.passed and got.rule == PIXELS_RULE
    got = judge(encode_rgb(honest, fmt), honest, fmt, PixelsOpening(png=b"\x89PNG\r\n\x1a\n..."))
    assert got is not None and not got.passed and math.isinf(got.distance)
    assert "not a 64x64 image" in got.reason
    small = png(honest.resize((32, 32)))
    got = judge(encode_rgb(honest, fmt), honest, fmt, PixelsOpening(png=small, encoder=HERE))
    assert got is not None and not got.passed and math.isinf(got.distance)


def test_the_delivered_file_must_match_byte_for_byte_not_just_in_pixels() -> None:
    """A file that decodes like the encode but is other bytes (here: a JPEG with a comment)
    fails on measured builds: the receipt signs bytes."""
    honest = render(4)
    with_comment = io.BytesIO()
    Image.open(io.BytesIO(encode_rgb(honest, "jpeg"))).save(
        with_comment, format="JPEG", quality=92, comment=b"x"
    )
    got = judge(with_comment.getvalue(), honest, "jpeg", opened(honest))
    assert got is not None and not got.passed and got.rule == PIXELS_RULE


def other_build(im: Image.Image, fmt: str) -> bytes:
    """What an honest node on another codec build may deliver for `im` (the bench's
    simulations, `bench.image_tolerance.other_builds`): JPEG with the colour conversion
    computed exactly and handed to libjpeg as YCbCr (libjpeg's fixed point rounds a few
    samples otherwise: the codec tolerance's basis); WebP from libwebp at another speed
    setting (method 3, which the tolerance happens to cover: 0.1% of the bench's renders over)."""
    buf = io.BytesIO()
    if fmt == "webp":
        im.save(buf, **{**SAVE_OPTIONS["webp"], "method": 3})
        return buf.getvalue()
    rgb = im.tobytes()
    ycc = bytearray()
    for i in range(0, len(rgb), 3):
        r, g, b = rgb[i], rgb[i + 1], rgb[i + 2]
        for v, half in (  # libjpeg's rounding: Y halves up, Cb/Cr halves down
            (0.299 * r + 0.587 * g + 0.114 * b, 0.5),
            (128 - 0.168735892 * r - 0.331264108 * g + 0.5 * b, 0.5 - 2**-16),
            (128 + 0.5 * r - 0.418687589 * g - 0.081312411 * b, 0.5 - 2**-16),
        ):
            ycc.append(min(255, max(0, math.floor(v + half))))
    Image.frombytes("YCbCr", im.size, bytes(ycc)).save(buf, **SAVE_OPTIONS["jpeg"])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_an_honest_file_from_another_codec_build_passes_the_codec_rule(fmt: str) -> None:
    honest = render(5)
    delivered = other_build(honest, fmt)
    assert delivered != encode_rgb(honest, fmt)  # no byte equality to lean on
    for node, here in ((ARM, HERE), (HERE, ARM)):  # either side unmeasured
        for decoded in (honest, one_level_off(honest)):
            got = judge(delivered, decoded, fmt, opened(honest, node), here=here)
            assert got is not None and got.passed and got.rule == CODEC_RULE, got
            assert got.tolerance == CODEC_TOLERANCES[fmt]
            assert 0 < got.distance <= CODEC_TOLERANCES[fmt]
            assert "not measured alike; rule: codec" in got.reason


def brighter(im: Image.Image, levels: int = 3) -> Image.Image:
    """A faint global change, like the decode of the second-to-last latent (a truncated
    schedule): within a lossy job's encoder error, far over the codec tolerance."""
    return im.point(lambda v: min(255, v + levels))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
@pytest.mark.parametrize("cheat", ["4x4 patch", "8x8 patch", "truncated"])
def test_a_cheat_claiming_an_unmeasured_build_fails_the_codec_rule(fmt: str, cheat: str) -> None:
    honest = render(5)
    faint = brighter(honest, 2 if fmt == "webp" else 3)
    edited = faint if cheat == "truncated" else patched(honest, int(cheat[0]))
    delivered = encode_rgb(edited, fmt)
    # opens its honest pixels: they pass the decode, the file is too far from their encode
    got = judge(delivered, honest, fmt, opened(honest, ARM))
    assert got is not None and not got.passed and got.rule == CODEC_RULE, got
    assert got.distance > CODEC_TOLERANCES[fmt]
    assert f"over {CODEC_TOLERANCES[fmt]:g} levels" in got.reason
    # the block rule it used to fall back to lets the faint change through on WebP
    block = judge(delivered, honest, fmt, None)
    assert block is not None and block.rule == BLOCK_RULE
    assert block.passed == (cheat == "truncated" and fmt == "webp")
    # opens the edited pixels: the file is their encode, but they are far from the decode
    got = judge(delivered, honest, fmt, opened(edited, ARM))
    assert got is not None and not got.passed and got.rule == PIXELS_RULE, got
    assert "from the decode" in got.reason


def test_an_unmeasured_build_does_not_excuse_a_file_that_is_not_an_image() -> None:
    honest = render(6)
    got = judge(b"RIFF....WEBPVP8 junk", honest, "webp", opened(honest, ARM))
    assert got is not None and not got.passed and got.rule == CODEC_RULE
    assert math.isinf(got.distance) and "undecodable" in got.reason


def test_without_pixels_or_for_a_png_job_the_block_rule_decides() -> None:
    honest = render(6)
    got = judge(encode_rgb(honest, "webp"), honest, "webp", None)
    assert got is not None and got.passed and got.rule == BLOCK_RULE
    assert "no pixels opened" in got.reason
    got = judge(png(honest), honest, "png", opened(patched(honest)))  # ignored for PNG
    assert got is not None and got.passed and got.rule == BLOCK_RULE and got.distance == 0.0
    assert judge(png(honest), honest, "png", None, dtype="float16") is None  # unmeasured


def test_a_bad_verifier_decode_is_the_verifiers_fault() -> None:
    honest = render(7)
    with pytest.raises(ValueError, match="verifier"):
        judge_image(
            encode_rgb(honest, "webp"), b"junk", "webp", SIZE, SIZE, "float32", opened(honest)
        )


def test_encoder_builds_measured_to_encode_alike() -> None:
    here = encoder_build()
    assert len(here.split()) == 3 and here.split()[1].startswith("jpeg:")
    assert byte_exact(HERE, "webp") and byte_exact(HERE, "jpeg")
    assert byte_exact("AMD64 jpeg:turbo-2.1.5.1 webp:1.3.0".lower(), "jpeg")
    assert not byte_exact(ARM, "webp")
    assert not byte_exact("x86_64 jpeg:ijg-9 webp:1.6.0", "jpeg")  # IJG libjpeg, not turbo
    assert byte_exact("x86_64 jpeg:ijg-9 webp:1.6.0", "webp")  # per format
    assert not byte_exact("x86_64 jpeg:turbo-3.2.0 webp:1.2.0", "webp")
    assert not byte_exact("", "webp") and not byte_exact("x86_64 webp:1.6.0", "png")
