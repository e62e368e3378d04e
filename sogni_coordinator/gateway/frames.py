"""Strict decoding and encoding of the SDKs' WebSocket frames.

A frame is a text frame of JSON `{"type": name, "data": standard padded base64 of UTF-8
JSON}`, both ways. `read_frame` turns an app's frame into a typed frame: `JobRequestFrame`
and `CancelFrame` (image projects and their cancel), `ChangeNetwork`, `SetSubscriptions` and
`LlmJobRequest` (the SDKs' other messages), or `Ignored` for a well-formed frame of any other
name (an SDK newer than this gateway). Anything else (binary, over the size limit, not JSON,
bad base64, a payload of the wrong shape, a name that is not an event name) raises
`FrameError` with the close code to end the socket with; it never reaches the handlers.
`decode_frame` is the older interface: image frames only, any other name refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
    "MAX_SUBSCRIPTIONS",
    "CancelFrame",
    "ChangeNetwork",
    "ClientFrame",
    "FrameError",
    "Ignored",
    "JobRequestFrame",
    "LlmJobRequest",
    "SetSubscriptions",
    "decode_frame",
    "encode_frame",
    "read_frame",
    "subscriptions_from_query",
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
"""Frame types `decode_frame` passes (image projects and their cancel)."""
MAX_NAME = 64
MAX_SUBSCRIPTIONS = 128
"""Event names one `setSocketEventSubscriptions` may name, and one socket may hold."""
_EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
"""A frame type or socket event name (`jobRequest`, `projectQueue`, `modelAvailability`)."""
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_MODEL_ID = 128


@dataclass(frozen=True)
class JobRequestFrame:
    """`jobRequest`: an image project (`projects.parse_job_request` reads `data`)."""

    data: dict[str, Any]


@dataclass(frozen=True)
class CancelFrame:
    """`jobError` from the app: its cancel of a project (`artistCanceled`)."""

    data: dict[str, Any]


@dataclass(frozen=True)
class ChangeNetwork:
    """`changeNetwork`: the SDK's `switchNetwork`; data is the JSON string `"fast"` or
    `"relaxed"`. The SDK waits for a `changeNetwork {network}` event back."""

    network: Literal["fast", "relaxed"]


@dataclass(frozen=True)
class SetSubscriptions:
    """`setSocketEventSubscriptions`: which optional events the socket wants. Fields as the
    SDKs send them (`subscriptions` {name: bool}, `subscribe` / `unsubscribe` names, `reset`,
    the single-event `event` + `enabled`), folded into `changes`; `apply` gives the new
    set, which the SDKs expect back as `socketEventSubscriptionsUpdated`."""

    reset: bool = False
    changes: tuple[tuple[str, bool], ...] = ()
    """(event name, wanted), in the order they apply."""

    def apply(self, current: Mapping[str, bool]) -> dict[str, bool]:
        """The subscriptions after this update; raises `FrameError` past
        `MAX_SUBSCRIPTIONS` names."""
        state = {} if self.reset else dict(current)
        state.update(self.changes)
        if len(state) > MAX_SUBSCRIPTIONS:
            raise FrameError(CLOSE_POLICY, f"more than {MAX_SUBSCRIPTIONS} event subscriptions")
        return state


@dataclass(frozen=True)
class LlmJobRequest:
    """`llmJobRequest`: a chat completion (the SDKs' `chat`); this network renders images
    only, so it is answered `llmJobError` for `job_id`."""

    job_id: str
    model: str = ""


@dataclass(frozen=True)
class Ignored:
    """A well-formed frame of a type this gateway does not serve (logged, not answered)."""

    name: str


ClientFrame = (
    JobRequestFrame | CancelFrame | ChangeNetwork | SetSubscriptions | LlmJobRequest | Ignored
)
"""What `read_frame` returns."""
MAX_DEPTH = MAX_JSON_DEPTH
"""Deepest nesting of arrays and objects accepted in a frame, checked before decoding
(`sogni_protocol.json_depth`)."""


class FrameError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def read_frame(raw: str | bytes | None, limit: int) -> ClientFrame:
    """The typed frame of one app frame; raises `FrameError` (never anything else)."""
    name, data = _envelope(raw, limit)
    if name in CLIENT_TYPES:
        if not isinstance(data, dict):
            raise FrameError(CLOSE_POLICY, "frame data must be a JSON object")
        return JobRequestFrame(data) if name == "jobRequest" else CancelFrame(data)
    if name == "changeNetwork":
        network = data.get("network") if isinstance(data, dict) else data
        if network not in ("fast", "relaxed"):
            raise FrameError(CLOSE_POLICY, "changeNetwork must be fast or relaxed")
        return ChangeNetwork(network)
    if name == "setSocketEventSubscriptions":
        return _subscriptions(data)
    if name == "llmJobRequest":
        if not isinstance(data, dict):
            raise FrameError(CLOSE_POLICY, "frame data must be a JSON object")
        job_id, model = data.get("jobID"), data.get("model", "")
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise FrameError(CLOSE_POLICY, "llmJobRequest needs a jobID (at most 64 characters)")
        if not isinstance(model, str) or len(model) > MAX_MODEL_ID:
            raise FrameError(
                CLOSE_POLICY, f"llmJobRequest model must be a name of at most {MAX_MODEL_ID}"
            )
        return LlmJobRequest(job_id, model)
    return Ignored(name)


def decode_frame(raw: str | bytes | None, limit: int) -> tuple[str, dict[str, Any]]:
    """(type, payload object) of one `jobRequest` or `jobError` frame; any other type, or
    anything malformed, raises `FrameError` (`read_frame` reads every SDK frame)."""
    name, data = _envelope(raw, limit)
    if name not in CLIENT_TYPES:
        raise FrameError(CLOSE_POLICY, f"unknown frame type {name!r}")
    if not isinstance(data, dict):
        raise FrameError(CLOSE_POLICY, "frame data must be a JSON object")
    return name, data


def _envelope(raw: str | bytes | None, limit: int) -> tuple[str, Any]:
    """(type, decoded data: any JSON value) of a well-formed frame; raises `FrameError`."""
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
    if not _EVENT_NAME.match(name):
        raise FrameError(CLOSE_POLICY, "frame type must be an event name (letters, digits)")
    if not isinstance(data, str):
        raise FrameError(CLOSE_POLICY, "frame data must be base64 text")
    try:
        text = base64.b64decode(data.encode("ascii"), validate=True).decode("utf-8")
        _check_depth(text)
        return name, json.loads(text)
    except (binascii.Error, UnicodeError, ValueError, RecursionError):
        raise FrameError(CLOSE_POLICY, "frame data is not base64 of UTF-8 JSON") from None


def _names(value: object, what: str) -> list[str]:
    """One event name or a list of them (`subscribe`, `unsubscribe`)."""
    names = [value] if isinstance(value, str) else value
    if (
        not isinstance(names, list)
        or len(names) > MAX_SUBSCRIPTIONS
        or not all(isinstance(n, str) and _EVENT_NAME.match(n) for n in names)
    ):
        raise FrameError(CLOSE_POLICY, f"setSocketEventSubscriptions {what} must be event names")
    return names


def _subscriptions(data: object) -> SetSubscriptions:
    if not isinstance(data, dict):
        raise FrameError(CLOSE_POLICY, "frame data must be a JSON object")
    changes: list[tuple[str, bool]] = []
    table = data.get("subscriptions")
    if table is not None:
        if not isinstance(table, dict) or len(table) > MAX_SUBSCRIPTIONS:
            raise FrameError(
                CLOSE_POLICY, "setSocketEventSubscriptions subscriptions must be {event: bool}"
            )
        for event, wanted in table.items():
            if not _EVENT_NAME.match(event):
                raise FrameError(
                    CLOSE_POLICY, "setSocketEventSubscriptions subscriptions must be {event: bool}"
                )
            if isinstance(wanted, bool):  # others are dropped, as the JS SDK itself does
                changes.append((event, wanted))
    for what, wanted in (("subscribe", True), ("unsubscribe", False)):
        if data.get(what) is not None:
            changes.extend((event, wanted) for event in _names(data[what], what))
    if data.get("event") is not None:
        event = data["event"]
        if not isinstance(event, str) or not _EVENT_NAME.match(event):
            raise FrameError(
                CLOSE_POLICY, "setSocketEventSubscriptions event must be an event name"
            )
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            raise FrameError(
                CLOSE_POLICY, "setSocketEventSubscriptions enabled must be true or false"
            )
        changes.append((event, enabled))
    reset = data.get("reset", False)
    if not isinstance(reset, bool):
        raise FrameError(CLOSE_POLICY, "setSocketEventSubscriptions reset must be true or false")
    if len(changes) > MAX_SUBSCRIPTIONS:
        raise FrameError(CLOSE_POLICY, f"more than {MAX_SUBSCRIPTIONS} event subscriptions")
    return SetSubscriptions(reset, tuple(changes))


def subscriptions_from_query(text: str | None) -> dict[str, bool]:
    """The socket's first subscriptions: the upgrade's `socketEventSubscriptions` query
    parameter (a JSON object of event name -> bool; the Python SDK sends
    `{"projectQueue":true}`). Anything unreadable counts as none (it only shapes optional
    events)."""
    if not text or len(text) > 16 * 1024:
        return {}
    try:
        _check_depth(text)
        table = json.loads(text)
    except (FrameError, ValueError, RecursionError):
        return {}
    if not isinstance(table, dict):
        return {}
    wanted = {k: v for k, v in table.items() if isinstance(v, bool) and _EVENT_NAME.match(k)}
    return dict(list(wanted.items())[:MAX_SUBSCRIPTIONS])


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
