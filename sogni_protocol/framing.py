"""Length-prefixed frames: a 4-byte big-endian length, then the payload.

Pure functions only; the transport reads the header, asks `body_length` whether the frame
is allowed, and only then reads the body, so an oversized frame costs 4 bytes, not 32 MiB.
"""

import struct

from sogni_protocol.errors import FrameTooLarge

HEADER_SIZE = 4
_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes, limit: int) -> bytes:
    """Prefix `payload` with its length; refuses to build a frame the peer would refuse."""
    if len(payload) > limit:
        raise FrameTooLarge(len(payload), limit)
    return _HEADER.pack(len(payload)) + payload


def body_length(header: bytes, limit: int) -> int:
    """Length announced by a frame header, checked against `limit` before any body is read."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"frame header must be {HEADER_SIZE} bytes, got {len(header)}")
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise FrameTooLarge(size, limit)
    return int(size)
