"""The SDKs' other socket messages (`changeNetwork`, `setSocketEventSubscriptions`,
`llmJobRequest`) are read into typed frames, and a well-formed frame of a name this gateway
does not serve is `Ignored`, not a 1008 close; malformed frames still end the socket."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sogni_coordinator.gateway.frames import (
    MAX_SUBSCRIPTIONS,
    CancelFrame,
    ChangeNetwork,
    FrameError,
    Ignored,
    JobRequestFrame,
    LlmJobRequest,
    SetSubscriptions,
    decode_frame,
    read_frame,
    subscriptions_from_query,
)

LIMIT = 256 * 1024


def sdk_frame(name: str, data: Any) -> str:
    """As both SDKs send: `{"type", "data": base64(JSON.stringify(data))}`."""
    return json.dumps({"type": name, "data": base64.b64encode(json.dumps(data).encode()).decode()})


def close_code(raw: Any, limit: int = LIMIT) -> int:
    with pytest.raises(FrameError) as caught:
        read_frame(raw, limit)
    return caught.value.code


def test_image_frames_read_as_before() -> None:
    job = {"jobID": "A", "keyFrames": []}
    assert read_frame(sdk_frame("jobRequest", job), LIMIT) == JobRequestFrame(job)
    cancel = {"jobID": "A", "error": "artistCanceled"}
    assert read_frame(sdk_frame("jobError", cancel), LIMIT) == CancelFrame(cancel)
    assert close_code(sdk_frame("jobRequest", [1])) == 1008


def test_change_network_is_the_sdks_json_string() -> None:
    # JS `switchNetwork('relaxed')` / Python `switch_network("relaxed")` send the bare string
    assert read_frame(sdk_frame("changeNetwork", "relaxed"), LIMIT) == ChangeNetwork("relaxed")
    assert read_frame(sdk_frame("changeNetwork", {"network": "fast"}), LIMIT) == ChangeNetwork(
        "fast"
    )
    for bad in ("slow", "", None, 1, ["fast"], {"network": "moon"}):
        assert close_code(sdk_frame("changeNetwork", bad)) == 1008


def test_socket_event_subscriptions_in_every_shape_the_sdks_send() -> None:
    python_sdk = read_frame(
        sdk_frame("setSocketEventSubscriptions", {"subscriptions": {"projectQueue": True}}),
        LIMIT,
    )
    assert isinstance(python_sdk, SetSubscriptions)
    assert python_sdk.apply({}) == {"projectQueue": True}
    update = read_frame(
        sdk_frame(
            "setSocketEventSubscriptions",
            {
                "subscriptions": {"jobETA": False, "odd": "yes"},  # non-bools dropped, as JS does
                "subscribe": ["modelAvailability", "toastMessage"],
                "unsubscribe": "projectQueue",
                "event": "jobRetry",
                "enabled": False,
                "futureKey": 1,
            },
        ),
        LIMIT,
    )
    assert isinstance(update, SetSubscriptions)
    assert update.apply({"projectQueue": True, "balanceUpdate": True}) == {
        "projectQueue": False,
        "balanceUpdate": True,
        "jobETA": False,
        "modelAvailability": True,
        "toastMessage": True,
        "jobRetry": False,
    }
    reset = read_frame(sdk_frame("setSocketEventSubscriptions", {"reset": True}), LIMIT)
    assert isinstance(reset, SetSubscriptions) and reset.apply({"projectQueue": True}) == {}
    event_only = read_frame(sdk_frame("setSocketEventSubscriptions", {"event": "jobETA"}), LIMIT)
    assert isinstance(event_only, SetSubscriptions) and event_only.apply({}) == {"jobETA": True}
    hostile = [
        [],
        "projectQueue",
        {"subscriptions": ["projectQueue"]},
        {"subscriptions": {"bad name!": True}},
        {"subscribe": [1]},
        {"subscribe": ["x"] * (MAX_SUBSCRIPTIONS + 1)},
        {"event": ["a", "b"]},
        {"event": "jobETA", "enabled": "no"},
        {"reset": "yes"},
        {"subscriptions": {f"e{i}": True for i in range(MAX_SUBSCRIPTIONS + 1)}},
    ]
    for data in hostile:
        assert close_code(sdk_frame("setSocketEventSubscriptions", data)) == 1008, data
    many = read_frame(
        sdk_frame("setSocketEventSubscriptions", {"subscribe": [f"a{i}" for i in range(100)]}),
        LIMIT,
    )
    assert isinstance(many, SetSubscriptions)
    with pytest.raises(FrameError) as caught:  # a socket holds at most MAX_SUBSCRIPTIONS
        many.apply({f"b{i}": True for i in range(100)})
    assert caught.value.code == 1008


def test_llm_job_request_keeps_what_an_llm_job_error_needs() -> None:
    chat: dict[str, Any] = {
        "jobID": "0F0F0F0F-0000-4000-8000-000000000000",
        "type": "llm",
        "model": "qwen3.5-35b-a3b-gguf-q4km",
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert read_frame(sdk_frame("llmJobRequest", chat), LIMIT) == LlmJobRequest(
        chat["jobID"], chat["model"]
    )
    for bad in ({**chat, "jobID": 5}, {**chat, "jobID": "x" * 65}, {**chat, "model": 1}, [chat]):
        assert close_code(sdk_frame("llmJobRequest", bad)) == 1008


def test_well_formed_frames_of_other_names_are_ignored_not_fatal() -> None:
    assert read_frame(sdk_frame("authenticated", {}), LIMIT) == Ignored("authenticated")
    assert read_frame(sdk_frame("someFutureEvent", "any JSON"), LIMIT) == Ignored("someFutureEvent")
    # still malformed, whatever the name
    assert close_code(b"binary") == 1003
    assert close_code(sdk_frame("someFutureEvent", "x" * LIMIT)) == 1009
    assert close_code(json.dumps({"type": "someFutureEvent", "data": "@@"})) == 1008
    assert close_code(json.dumps({"type": "../etc", "data": "e30="})) == 1008
    assert close_code(json.dumps({"type": "x" * 65, "data": "e30="})) == 1008
    deep = base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    assert close_code(json.dumps({"type": "someFutureEvent", "data": deep}), 1_000_000) == 1008
    # the older interface keeps to image frames
    with pytest.raises(FrameError):
        decode_frame(sdk_frame("changeNetwork", "fast"), LIMIT)


def test_first_subscriptions_come_from_the_upgrade_query() -> None:
    assert subscriptions_from_query('{"projectQueue":true}') == {"projectQueue": True}
    assert subscriptions_from_query('{"a":true,"b":1,"bad name":false}') == {"a": True}
    for junk in (None, "", "[", "[1]", "{" * 5000, "x" * 20_000):
        assert subscriptions_from_query(junk) == {}
