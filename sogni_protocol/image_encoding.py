"""The one image encoder both sides use: the node for the images it delivers, the coordinator
to re-encode a verifier's decode for a JPEG or WebP job's image check (docs/IMAGE_CHECK.md).

Why shared: the result hash in a receipt is sha256 of the encoded bytes, so a node's encoding
must be a pure function of the pixels and the format (fixed settings, no metadata: no prompt,
no software name, no timestamps, no EXIF/ICC/XMP). And a lossy job's image check compares the
delivered image with the verifier's pixels put through *this* encoder, so that an honest image
is at distance 0 instead of "within the encoder's error": node and coordinator must not drift,
hence one table of settings here. The libjpeg / libwebp builds under Pillow matter too
(`encoder_versions`; docs/IMAGE_CHECK.md, "Encoder versions").

Pillow only: the coordinator has no numpy. Imported by the node and the coordinator (both
install Pillow), not by the client or the transport.
"""

from __future__ import annotations

import io
import platform
from collections.abc import Mapping
from typing import Any

from PIL import Image, features

__all__ = [
    "BYTE_EXACT_ARCHES",
    "BYTE_EXACT_CODECS",
    "FORMATS",
    "JPEG_QUALITY",
    "KNOWN_ANSWERS",
    "LOSSY_FORMATS",
    "PNG_COMPRESS_LEVEL",
    "SAVE_OPTIONS",
    "WEBP_QUALITY",
    "byte_exact",
    "encode_rgb",
    "encoder_build",
    "encoder_versions",
    "encodes_like_network",
]

PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = 92
WEBP_QUALITY = 90
FORMATS = ("png", "jpeg", "webp")
LOSSY_FORMATS = frozenset({"jpeg", "webp"})

SAVE_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "png": {"format": "PNG", "optimize": False, "compress_level": PNG_COMPRESS_LEVEL},
    # 4:2:0 chroma, baseline (not progressive), no optimized Huffman tables: one fixed path.
    "jpeg": {
        "format": "JPEG",
        "quality": JPEG_QUALITY,
        "subsampling": 2,
        "optimize": False,
        "progressive": False,
    },
    # method 4 is libwebp's default speed/size trade-off; lossy, no alpha, no metadata.
    "webp": {"format": "WEBP", "quality": WEBP_QUALITY, "method": 4, "lossless": False},
}
"""Output format -> Pillow `Image.save` keyword arguments."""


def encode_rgb(image: Image.Image, output_format: str = "png") -> bytes:
    """An RGB Pillow image -> image bytes in `output_format` (png, jpeg or webp), from a fresh
    copy of its pixels (no `.info` carried over: whatever the source file held stays out)."""
    options = SAVE_OPTIONS.get(output_format)
    if options is None:
        raise ValueError(f"unknown output format {output_format!r}; known: {', '.join(FORMATS)}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    fresh = Image.frombytes("RGB", image.size, image.tobytes())
    buf = io.BytesIO()
    fresh.save(buf, **options)
    return buf.getvalue()


def encoder_versions() -> dict[str, str | None]:
    """Pillow's and its codecs' versions here: what a lossy image's bytes depend on."""
    import PIL

    return {
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
        "libwebp": features.version("webp"),
        "zlib": features.version("zlib"),
    }


BYTE_EXACT_ARCHES = frozenset({"x86_64", "amd64"})
"""CPU architectures whose codec builds below were measured to encode alike."""
BYTE_EXACT_CODECS: Mapping[str, frozenset[str]] = {
    "jpeg": frozenset({"turbo-2.1.5.1", "turbo-3.0.3", "turbo-3.1.1", "turbo-3.2.0"}),
    "webp": frozenset({"1.3.0", "1.4.0", "1.5.0", "1.6.0"}),
}
"""Lossy format -> codec builds (the wheels of Pillow 9.5.0, 10.4.0, 11.3.0 and 13.0.0) that
gave every one of 300 honest images byte for byte the same file with `SAVE_OPTIONS`, also with
libjpeg-turbo's SIMD forced off or to SSE2 (docs/IMAGE_CHECK.md, "Encoder versions"). A node
and a coordinator both on such a build must produce the same bytes from the same pixels, so
the image check holds a difference against the worker; any other build (ARM, IJG libjpeg,
mozjpeg, another libwebp) falls back to the block rule."""


def _codec_words(versions: Mapping[str, str | None]) -> tuple[str, str]:
    turbo, jpeg = versions.get("libjpeg_turbo"), versions.get("libjpeg")
    jpeg_word = f"turbo-{turbo}" if turbo else f"ijg-{jpeg or 'none'}"
    return jpeg_word, str(versions.get("libwebp") or "none")


def encoder_build(versions: Mapping[str, str | None] | None = None) -> str:
    """This machine's encoder build in one line, `<arch> jpeg:<codec> webp:<version>` (e.g.
    `x86_64 jpeg:turbo-3.2.0 webp:1.6.0`): what a node says with the pixels it opens, so
    that the coordinator knows whether byte equality can be required (`byte_exact`)."""
    jpeg, webp = _codec_words(encoder_versions() if versions is None else versions)
    return f"{platform.machine().lower() or 'unknown'} jpeg:{jpeg} webp:{webp}"


def byte_exact(build: str, output_format: str) -> bool:
    """True when an `encoder_build` line names a measured arch and, for `output_format`, a
    codec measured to encode byte for byte like the others in `BYTE_EXACT_CODECS`."""
    words = build.split()
    if len(words) != 3 or words[0] not in BYTE_EXACT_ARCHES:
        return False
    codecs = dict(w.split(":", 1) for w in words[1:] if ":" in w)
    return codecs.get(output_format) in BYTE_EXACT_CODECS.get(output_format, frozenset())


def _known_answer_image() -> Image.Image:
    """A fixed 64 x 64 test picture: smooth gradients, hard edges and seeded noise, the three
    things an encoder's arithmetic treats differently."""
    import random

    rng = random.Random(20261201)
    data = bytearray()
    for y in range(64):
        for x in range(64):
            edge = 200 if (x // 16 + y // 16) % 2 else 40
            data += bytes(((x * 4) & 255, (edge + rng.randrange(-20, 21)) & 255, (y * 4) & 255))
    return Image.frombytes("RGB", (64, 64), bytes(data))


KNOWN_ANSWERS: Mapping[str, str] = {
    "jpeg": "80a1794876047e9335d926b61be72302660c245cc53618d6b55f4eb179779a49",
    "webp": "45e7c62c05cb956ca2c551f894dd01951fd35706393830b93476fad317349f24",
}
"""Lossy format -> sha256 of `encode_rgb(_known_answer_image(), format)` on the builds of
`BYTE_EXACT_CODECS` (the Pillow 9.5.0, 10.4.0, 11.3.0 and 13.0.0 wheels all give these bytes,
1 Dec 2026). A machine whose encoder gives other bytes
encodes unlike the network: a checked JPEG or WebP job of its may be refused by the codec
rule (docs/IMAGE_CHECK.md, "The codec rule")."""


def encodes_like_network() -> dict[str, bool]:
    """Lossy format -> whether this machine's encoder gives the known answer's bytes."""
    import hashlib

    image = _known_answer_image()
    return {
        fmt: hashlib.sha256(encode_rgb(image, fmt)).hexdigest() == digest
        for fmt, digest in KNOWN_ANSWERS.items()
    }
