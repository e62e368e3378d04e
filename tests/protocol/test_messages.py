"""Strict decoding: every kind of bad message is refused with an error naming the field."""

import msgspec
import pytest

from sogni_protocol.errors import FrameTooLarge, InvalidMessage
from sogni_protocol.framing import body_length, encode_frame
from sogni_protocol.ids import WIRE_VERSION, unsupported_version
from sogni_protocol.messages import (
    Heartbeat,
    HelloRefused,
    RenderRequest,
    RequestRefused,
    UnsupportedWireVersion,
    decode,
    encode,
)


def _raw(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def test_roundtrip_keeps_every_field() -> None:
    req = RenderRequest(model_id="m", positive_prompt="p", number_of_images=3, seed=7)
    assert decode(encode(req)) == req


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ({"type": "nope"}, "$.type"),
        ({"type": "heartbeat"}, "`seq`"),
        ({"type": "heartbeat", "seq": "1"}, "$.seq"),
        ({"type": "heartbeat", "seq": -1}, "$.seq"),
        ({"type": "heartbeat", "seq": 1, "extra": 0}, "`extra`"),
        (
            {"type": "renderRequest", "modelId": "m", "positivePrompt": "p", "numberOfImages": 0},
            "$.numberOfImages",
        ),
        (
            {"type": "renderRequest", "modelId": "m", "positivePrompt": "p", "numberOfImages": 513},
            "$.numberOfImages",
        ),
        ({"type": "renderRequest", "modelId": "m", "positivePrompt": "p", "width": 100}, "$.width"),
        ({"type": "renderRequest", "modelId": "bad id!", "positivePrompt": "p"}, "$.modelId"),
    ],
)
def test_bad_message_names_the_field(payload: dict[str, object], names: str) -> None:
    with pytest.raises(InvalidMessage, match=names.replace("$", r"\$").replace(".", r"\.")):
        decode(_raw(payload))


def test_bytes_that_are_not_msgpack() -> None:
    with pytest.raises(InvalidMessage, match="not a MessagePack message"):
        decode(b"\xc1\x00garbage")


def test_error_never_echoes_the_prompt() -> None:
    sentinel = "SENTINEL-" + "x" * 5000  # too long: refused
    payload = _raw({"type": "renderRequest", "modelId": "m", "positivePrompt": sentinel})
    with pytest.raises(InvalidMessage) as info:
        decode(payload)
    assert "SENTINEL" not in str(info.value)
    assert "$.positivePrompt" in str(info.value)


def test_frame_limit_checked_from_the_header_alone() -> None:
    header = (100 * 1024 * 1024).to_bytes(4, "big")
    with pytest.raises(FrameTooLarge, match="exceeds the 65536-byte limit"):
        body_length(header, 64 * 1024)
    assert body_length(encode_frame(b"abc", 10)[:4], 10) == 3
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, 10)


def test_encoding_is_canonical() -> None:
    assert encode(Heartbeat(seq=1)) == encode(Heartbeat(seq=1))


# --- wire version ------------------------------------------------------------------------
@pytest.mark.parametrize("v", [0, WIRE_VERSION + 1, 99])
def test_another_wire_version_is_named_not_an_opaque_field_error(v: int) -> None:
    payload = _raw({"type": "nodeHello", "v": v, "capabilities": {}, "someV2Field": 1})
    with pytest.raises(UnsupportedWireVersion) as info:
        decode(payload)
    assert info.value.version == v
    assert f"wire version {v} is not supported: this peer speaks {WIRE_VERSION}" in str(info.value)
    assert isinstance(info.value, InvalidMessage)  # still a protocol error to old callers
    assert unsupported_version(v, "coordinator").endswith(f"this coordinator speaks {WIRE_VERSION}")


def test_a_bad_frame_of_our_own_version_keeps_its_field_error() -> None:
    with pytest.raises(InvalidMessage, match=r"\$\.seq") as info:
        decode(_raw({"type": "heartbeat", "v": WIRE_VERSION, "seq": -1}))
    assert not isinstance(info.value, UnsupportedWireVersion)


def test_refusals_are_read_at_any_version() -> None:
    """A peer of another version still learns why it was refused."""
    hello = decode(_raw({"type": "helloRefused", "v": 9, "reason": "r", "newField": True}))
    assert hello == HelloRefused(reason="r")
    refused = decode(_raw({"type": "requestRefused", "v": 9, "code": "c", "reason": "why"}))
    assert refused == RequestRefused(code="c", reason="why")
    assert decode(encode(HelloRefused(reason="x"))) == HelloRefused(reason="x")


def test_resume_messages_roundtrip_and_are_strict() -> None:
    from sogni_protocol.messages import ImageAck, RequestResumed, ResumeRequest

    rid, token = b"r" * 32, b"t" * 32
    for msg in (
        ResumeRequest(request_id=rid, token=token),
        ImageAck(request_id=rid, job_ids=[b"j" * 32]),
        RequestResumed(
            request_id=rid, job_ids=[b"j" * 32], chain_id=1, verifying_contract="0x" + "00" * 20
        ),
    ):
        assert decode(encode(msg)) == msg
    with pytest.raises(InvalidMessage, match=r"\$\.token"):  # a token is exactly 32 bytes
        decode(_raw({"type": "resumeRequest", "requestId": rid, "token": b"short"}))
    with pytest.raises(InvalidMessage, match=r"\$\.jobIds"):  # an ack names at least one image
        decode(_raw({"type": "imageAck", "requestId": rid, "jobIds": []}))
    with pytest.raises(InvalidMessage, match="resumeToken"):  # an acceptance carries the token
        decode(
            _raw(
                {
                    "type": "requestAccepted",
                    "requestId": rid,
                    "jobIds": [],
                    "chainId": 1,
                    "verifyingContract": "0x" + "00" * 20,
                }
            )
        )


@pytest.mark.parametrize("deep_first", [True, False])
def test_a_deeply_nested_unknown_field_is_an_invalid_message(deep_first: bool) -> None:
    """msgspec skips an unknown field's value recursively: nested past the recursion limit
    it raised `RecursionError`, which no reader caught as a protocol error (a node session's
    reader died with results half settled). Also through the other-version fallback."""
    import sys

    from sogni_protocol import relay_messages

    deep = b"\x91" * (sys.getrecursionlimit() + 10) + b"\xc0"
    fields = [b"\xa1a" + deep, b"\xa4type\xa3zzz", b"\xa1v\x07"]
    payload = b"\x83" + b"".join(fields if deep_first else fields[::-1])
    with pytest.raises(InvalidMessage, match="recursion"):
        decode(payload)
    with pytest.raises(InvalidMessage):
        relay_messages.decode(payload)
