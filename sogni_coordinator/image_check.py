"""The cheap check every delivered image gets before its receipt is accepted.

Why: a signed receipt only proves who sent the bytes. Before paying for them the coordinator
makes sure they are an image at all: they decode completely (a truncated or garbage file
does not), in the format the job asked for, at the job's size. It costs a decode (about a
millisecond at 512x512), runs in a worker thread (on the event loop for jobs of at most
`INLINE_PIXELS` whose image is the plain PNG nodes write, inflated with zlib alone: ~20 us at
64x64, less than the thread hand-off; any file Pillow must decide goes to the thread),
and never looks at what the image shows: whether it is the right image is the trajectory
checks' job (docs/TRAJECTORY.md).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import trio
from PIL import Image, PngImagePlugin

PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20
"""Pillow inflates a PNG's text chunks up to 64 MiB by default: a result of compressed text
would cost a decode of that much per image. A node's encoder writes none; 1 MiB is far above
any honest metadata, and more is refused as not decoding."""

__all__ = ["INLINE_BYTES", "INLINE_PIXELS", "check_image", "image_fault"]

INLINE_PIXELS = 128 * 128
"""Jobs up to this many pixels, sending at most `INLINE_BYTES`, are checked on the event
loop: the size is read from the header and compared with the job's before anything is
decoded (a larger image is refused unread), and the bytes bound the decoder's work."""
INLINE_BYTES = 64 * 1024

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def image_fault(image: bytes, fmt: str, width: int, height: int) -> str | None:
    """Why `image` is not a complete `fmt` image of `width` x `height`, or None."""
    if fmt == "png":
        fast = _plain_png_fault(image, width, height)
        if fast is not _UNSURE:
            return fast
    return _pillow_fault(image, fmt, width, height)


def _pillow_fault(image: bytes, fmt: str, width: int, height: int) -> str | None:
    """`image_fault` by decoding with Pillow: every format, every PNG form."""
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


_UNSURE = "unsure"
"""`_plain_png_fault`: not the plain form it decides; Pillow decides."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {2: 3, 6: 4}  # colour type -> bytes per pixel at depth 8: RGB, RGBA


def _plain_png_fault(image: bytes, width: int, height: int) -> str | None:
    """The PNG form nodes write (8-bit RGB or RGBA, not interlaced, only IHDR, IDAT and IEND
    chunks), decoded completely with zlib alone: None when every chunk's CRC holds and the
    data inflates to exactly the rows of `width` x `height` with valid filter bytes; the size
    fault when the header names another size; `_UNSURE` for anything else, which Pillow then
    decides. Why: Pillow's Python header parsing and decoder set-up were the largest part of
    this check on the event loop (a profile of the in-process dispatch baseline: ~16% of the
    loop's GIL time, twice the ECDSA recovery), against ~10 us for this on a 64 x 64 PNG."""
    if not image.startswith(_PNG_SIGNATURE) or len(image) < 8 + 25 + 12:
        return _UNSURE
    try:
        length, kind = struct.unpack_from(">I4s", image, 8)
        if kind != b"IHDR" or length != 13:
            return _UNSURE
        w, h, depth, colour, compression, filtering, interlace = struct.unpack_from(
            ">IIBBBBB", image, 16
        )
        if (w, h) != (width, height):
            return f"image is {w}x{h}, the job asked for {width}x{height}"
        channels = _CHANNELS.get(colour)
        if channels is None or (depth, compression, filtering, interlace) != (8, 0, 0, 0):
            return _UNSURE
        stride = 1 + w * channels
        expected = stride * h
        inflate = zlib.decompressobj()
        rows = bytearray()
        pos, ended = 8, False
        while pos < len(image) and not ended:
            length, kind = struct.unpack_from(">I4s", image, pos)
            end = pos + 8 + length
            if end + 4 > len(image):
                return _UNSURE
            data = image[pos + 8 : end]
            (crc,) = struct.unpack_from(">I", image, end)
            if zlib.crc32(data, zlib.crc32(kind)) != crc:
                return _UNSURE
            if kind == b"IDAT":
                rows += inflate.decompress(data, expected + 1 - len(rows))
                if len(rows) > expected or inflate.unconsumed_tail:
                    return _UNSURE
            elif kind == b"IEND":
                ended = True
            elif pos != 8:  # IHDR is the first chunk only; any other chunk: Pillow's
                return _UNSURE
            pos = end + 4
    except (struct.error, zlib.error):
        return _UNSURE
    whole = ended and pos == len(image) and inflate.eof and not inflate.unused_data
    if not whole or len(rows) != expected or max(rows[::stride]) > 4:
        return _UNSURE
    return None


async def check_image(image: bytes, fmt: str, width: int, height: int) -> str | None:
    """`image_fault`, in a worker thread unless the job and the image are small and the
    image is the plain PNG form: anything Pillow must decide goes to the thread (a 64 KiB
    PNG of zTXt chunks each inflating to 1 MiB held the loop 0.4 s through Pillow)."""
    if width * height <= INLINE_PIXELS and len(image) <= INLINE_BYTES and fmt == "png":
        fast = _plain_png_fault(image, width, height)
        if fast is not _UNSURE:
            return fast
    return await trio.to_thread.run_sync(image_fault, image, fmt, width, height)
