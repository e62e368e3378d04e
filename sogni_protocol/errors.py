"""Errors shared by every part; their messages never contain prompts or image bytes."""

import msgspec

DECODE_ERRORS: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    UnicodeDecodeError,
    RecursionError,
)
"""What a strict msgspec decode of bytes from outside raises for bytes it refuses: its own
`DecodeError` (`ValidationError` included), `UnicodeDecodeError` for a string that is not
UTF-8, which msgspec does not wrap, and `RecursionError` for a value it skips (an unknown
field) nested deeper than the interpreter's recursion limit: 200 KB of `0x91` bytes."""


class ProtocolError(Exception):
    """A peer sent something this protocol refuses; the message names what was wrong."""


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class InvalidMessage(ProtocolError):
    """Bytes that are not MessagePack, or a message with a bad type, field or value."""


class SignatureError(ProtocolError):
    """A signature that does not verify, or was made by a key we do not trust."""
