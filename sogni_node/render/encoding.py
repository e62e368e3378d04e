"""Deterministic image encoding (PNG, JPEG, WebP) shared by the backends.

Why: the result hash in a receipt is sha256 of the encoded bytes, so encoding must be a pure
function of the pixels and the format: fixed settings and no metadata (no prompt, no software
name, no timestamps, no EXIF/ICC/XMP). PNG is lossless and the default; JPEG and WebP are
lossy at fixed quality, for apps that want smaller files.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = 92
WEBP_QUALITY = 90
FORMATS = ("png", "jpeg", "webp")

_SAVE_OPTIONS: Mapping[str, Mapping[str, Any]] = {
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


def float_image_to_uint8(image: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """HxWx3 floats in [0, 1] -> uint8, the same rounding as diffusers' numpy_to_pil.

    NaNs (a diverged model) become black rather than undefined bytes.
    """
    clean = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(clean, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_image(pixels: npt.NDArray[np.uint8], output_format: str = "png") -> bytes:
    """HxWx3 uint8 RGB -> image bytes in `output_format` (png, jpeg or webp)."""
    options = _SAVE_OPTIONS.get(output_format)
    if options is None:
        raise ValueError(f"unknown output format {output_format!r}; known: {', '.join(FORMATS)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels))  # fresh image: empty .info
    buf = io.BytesIO()
    image.save(buf, **options)
    return buf.getvalue()


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """PNG with only IHDR, IDAT and IEND chunks."""
    return encode_image(pixels, "png")
