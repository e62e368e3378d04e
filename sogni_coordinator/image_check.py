"""The cheap check every delivered image gets before its receipt is accepted.

Why: a signed receipt only proves who sent the bytes. Before paying for them the coordinator
makes sure they are an image at all: they decode completely (a truncated or garbage file
does not), in the format the job asked for, at the job's size. It costs a decode (about a
millisecond at 512x512), runs in a worker thread (on the event loop for jobs of at most
`INLINE_PIXELS`, where the decode, 30-110 us at 64x64 depending on the CPU, costs less
than the thread hand-off),
and never looks at what the image shows: whether it is the right image is the trajectory
checks' job (docs/TRAJECTORY.md).
"""

from __future__ import annotations

import io
import warnings

import trio
from PIL import Image

__all__ = ["INLINE_BYTES", "INLINE_PIXELS", "check_image", "image_fault"]

INLINE_PIXELS = 128 * 128
"""Jobs up to this many pixels, sending at most `INLINE_BYTES`, are checked on the event
loop: the size is read from the header and compared with the job's before anything is
decoded (a larger image is refused unread), and the bytes bound the decoder's work."""
INLINE_BYTES = 64 * 1024

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


async def check_image(image: bytes, fmt: str, width: int, height: int) -> str | None:
    """`image_fault`, in a worker thread unless the job and the image are small."""
    if width * height <= INLINE_PIXELS and len(image) <= INLINE_BYTES:
        return image_fault(image, fmt, width, height)
    return await trio.to_thread.run_sync(image_fault, image, fmt, width, height)
