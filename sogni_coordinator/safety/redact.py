"""What goes out instead of an image the policy does not deliver as rendered.

Both keep the job's format and size, so every client (the libp2p API, the SDK gateway)
handles them as any image: `blur` hides detail (a Gaussian blur over an eighth of the longer
side, then checked again by the caller), `placeholder` is a flat grey image carrying nothing
of the original. Neither matches the receipt's `result_hash`, which proves what the node sent.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

__all__ = ["blur", "placeholder"]

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
GREY = (128, 128, 128)


def _encode(im: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    im.save(out, format=_FORMATS[fmt])
    return out.getvalue()


def blur(image: bytes, fmt: str) -> bytes:
    """`image` Gaussian-blurred with a radius of 1/8 of its longer side, in `fmt`."""
    with Image.open(io.BytesIO(image)) as im:
        rgb = im.convert("RGB")
    radius = max(rgb.size) / 8
    return _encode(rgb.filter(ImageFilter.GaussianBlur(radius)), fmt)


def placeholder(fmt: str, width: int, height: int) -> bytes:
    """A flat grey `width` x `height` image in `fmt`."""
    return _encode(Image.new("RGB", (width, height), GREY), fmt)
