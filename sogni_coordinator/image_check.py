"""The cheap check every delivered image gets before its receipt is accepted.

Why: a signed receipt only proves who sent the bytes. Before paying for them the coordinator
makes sure they are an image at all: they decode completely (a truncated or garbage file
does not), in the format the job asked for, at the job's size. It costs a decode (about a
millisecond at 512x512), runs in a worker thread, and never looks at what the image shows:
whether it is the right image is the trajectory checks' job (docs/TRAJECTORY.md).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

__all__ = ["image_fault"]

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def image_fault(image: bytes, fmt: str, width: int, height: int) -> str | None:
    """Why `image` is not a complete `fmt` image of `width` x `height`, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image), formats=[_FORMATS[fmt]]) as im:
                if im.size != (width, height):
                    return f"image is {im.size[0]}x{im.size[1]}, the job asked for {width}x{height}"
                im.load()  # decodes every byte: a truncated file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError):  # fmt: skip
        return f"image does not decode as the {fmt} the job asked for"
    return None
