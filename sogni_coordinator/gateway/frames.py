"""Strict decoding and encoding of the SDKs' WebSocket frames.

A frame is a text frame of JSON `{"type": name, "data": standard padded base64 of a UTF-8
JSON object}`, both ways. Anything else an app sends (binary, over the size limit, not JSON,
bad base64, a payload that is not an object, a type this gateway does not serve) raises
`FrameError` with the close code to end the socket with; it never reaches the handlers.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from sogni_protocol.json_depth import MAX_JSON_DEPTH, TooDeep, check_depth

__all__ = [
    "CLIENT_TYPES",
    "CLOSE_AUTH",
    "CLOSE_BAD_DATA",
    "CLOSE_INTERNAL",
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "CLOSE_RESTARTING",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
    "FrameError",
    "decode_frame",
    "encode_frame",
]

CLOSE_BAD_DATA = 1003
"""A binary frame: the SDKs send text only."""
CLOSE_POLICY = 1008
"""A malformed frame (bad JSON, bad base64, not an object, unknown type)."""
CLOSE_TOO_BIG = 1009
"""A frame over the size limit."""
CLOSE_INTERNAL = 1011
"""The session failed on this side (a database outage, a bug): the SDKs reconnect."""
CLOSE_RESTARTING = 1012
"""The coordinator is stopping (or restarting): the SDKs reconnect, with backoff, and the
projects in flight stream again there or at another coordinator of the network."""
CLOSE_TRY_LATER = 1013
"""Too many failed authentications from this address: the SDKs reconnect with backoff (a
4000-4999 code would sign every app behind a shared proxy out for good)."""
CLOSE_REPLACED = 4015
"""Another socket took this (key, appId): the SDKs do not reconnect."""
CLOSE_AUTH = 4021
"""A missing, unknown or revoked API key: the SDKs sign out."""

CLIENT_TYPES = frozenset({"jobRequest", "jobError"})
"""Frame types an app may send to this gateway (image projects and their cancel)."""
MAX_NAME = 64
MAX_DEPTH = MAX_JSON_DEPTH
"""Deepest nesting of arrays and objects accepted in a frame, checked before decoding
(`sogni_protocol.json_depth`)."""


class FrameError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def decode_frame(raw: str | bytes | None, limit: int) -> tuple[str, dict[str, Any]]:
    """(type, payload object) of one app frame; raises `FrameError`."""
    if not isinstance(raw, str):
        raise FrameError(CLOSE_BAD_DATA, "frames are text")
    if len(raw) > limit:
        raise FrameError(CLOSE_TOO_BIG, f"frame over {limit} bytes")
    _check_depth(raw)
    try:
        outer = json.loads(raw)
    except (ValueError, RecursionError):
        raise FrameError(CLOSE_POLICY, "frame is not JSON") from None
    if not isinstance(outer, dict) or set(outer) - {"type", "data"}:
        raise FrameError(CLOSE_POLICY, "frame must be an object with type and data")
    name, data = outer.get("type"), outer.get("data")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise FrameError(CLOSE_POLICY, "frame type must be a short string")
    if name not in CLIENT_TYPES:
        raise FrameError(CLOSE_POLICY, f"unknown frame type {name[:MAX_NAME]!r}")
    if not isinstance(data, str):
        raise FrameError(CLOSE_POLICY, "frame data must be base64 text")
    try:
        text = base64.b64decode(data.encode("ascii"), validate=True).decode("utf-8")
        _check_depth(text)
        inner = json.loads(text)
    except (binascii.Error, UnicodeError, ValueError, RecursionError):
        raise FrameError(CLOSE_POLICY, "frame data is not base64 of UTF-8 JSON") from None
    if not isinstance(inner, dict):
        raise FrameError(CLOSE_POLICY, "frame data must be a JSON object")
    return name, inner


def _check_depth(text: str) -> None:
    """Raise `FrameError` when arrays/objects nest deeper than `MAX_DEPTH`
    (`sogni_protocol.json_depth`: deep nesting crashes untyped decoders, not raise)."""
    try:
        check_depth(text, MAX_DEPTH)
    except TooDeep:
        raise FrameError(CLOSE_POLICY, f"frame nests deeper than {MAX_DEPTH}") from None


def encode_frame(name: str, data: dict[str, Any]) -> str:
    """One server frame: the payload as base64 of compact UTF-8 JSON."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return json.dumps({"type": name, "data": base64.b64encode(body).decode("ascii")})
