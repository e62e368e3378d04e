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
from collections.abc import Mapping
from typing import Any

from PIL import Image, features

__all__ = [
    "FORMATS",
    "JPEG_QUALITY",
    "LOSSY_FORMATS",
    "PNG_COMPRESS_LEVEL",
    "SAVE_OPTIONS",
    "WEBP_QUALITY",
    "encode_rgb",
    "encoder_versions",
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
