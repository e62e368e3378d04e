"""Deterministic PNG encoding shared by the backends.

Why: the result hash in a receipt is sha256 of the encoded bytes, so encoding must be a pure
function of the pixels: fixed compression settings and no metadata chunks (no prompt, no
software name, no timestamps), only IHDR, IDAT and IEND.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
from PIL import Image

PNG_COMPRESS_LEVEL = 6


def float_image_to_uint8(image: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """HxWx3 floats in [0, 1] -> uint8, the same rounding as diffusers' numpy_to_pil.

    NaNs (a diverged model) become black rather than undefined bytes.
    """
    clean = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(clean, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """HxWx3 uint8 RGB -> PNG bytes with no ancillary chunks."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels))  # fresh image: empty .info
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()
