"""Strict decoding: every kind of bad message is refused with an error naming the field."""

import msgspec
import pytest

from sogni_protocol.errors import FrameTooLarge, InvalidMessage
from sogni_protocol.framing import body_length, encode_frame
from sogni_protocol.messages import Heartbeat, RenderRequest, decode, encode


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
        ({"type": "heartbeat", "seq": 1, "v": 2}, "$.v"),
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
