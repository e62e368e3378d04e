"""Deterministic image encoding (PNG, JPEG, WebP) shared by the backends.

Why: the result hash in a receipt is sha256 of the encoded bytes, so encoding must be a pure
function of the pixels and the format: fixed settings and no metadata (no prompt, no software
name, no timestamps, no EXIF/ICC/XMP). PNG is lossless and the default; JPEG and WebP are
lossy at fixed quality, for apps that want smaller files. The settings live in
`sogni_protocol.image_encoding`, which the coordinator's image check uses too.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

from sogni_protocol.image_encoding import (
    FORMATS,
    JPEG_QUALITY,
    PNG_COMPRESS_LEVEL,
    WEBP_QUALITY,
    encode_rgb,
)

__all__ = [
    "FORMATS",
    "JPEG_QUALITY",
    "PNG_COMPRESS_LEVEL",
    "WEBP_QUALITY",
    "encode_image",
    "encode_png",
    "float_image_to_uint8",
]


def float_image_to_uint8(image: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """HxWx3 floats in [0, 1] -> uint8, the same rounding as diffusers' numpy_to_pil.

    NaNs (a diverged model) become black rather than undefined bytes.
    """
    clean = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(clean, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_image(pixels: npt.NDArray[np.uint8], output_format: str = "png") -> bytes:
    """HxWx3 uint8 RGB -> image bytes in `output_format` (png, jpeg or webp)."""
    if output_format not in FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; known: {', '.join(FORMATS)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels))  # fresh image: empty .info
    return encode_rgb(image, output_format)


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """PNG with only IHDR, IDAT and IEND chunks."""
    return encode_image(pixels, "png")
