"""The encoder self-check a node runs: does this machine's JPEG/WebP encoder give the bytes
every measured build gives (`image_encoding.KNOWN_ANSWERS`)?"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest

from sogni_protocol import image_encoding
from sogni_protocol.image_encoding import (
    KNOWN_ANSWERS,
    byte_exact,
    encode_rgb,
    encoder_build,
    encodes_like_network,
)


def test_a_measured_build_encodes_like_the_network() -> None:
    # This project pins no Pillow build, but every wheel it can install here is one of the
    # measured ones; a failure means the known answers or the measured set went stale.
    assert byte_exact(encoder_build(), "jpeg") and byte_exact(encoder_build(), "webp")
    assert encodes_like_network() == {"jpeg": True, "webp": True}


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("jpeg", {"format": "JPEG", "quality": 92, "subsampling": 2, "optimize": True}),
        ("webp", {"format": "WEBP", "quality": 90, "method": 5, "lossless": False}),
    ],
)
def test_an_encoder_making_other_choices_misses_the_known_answer(
    fmt: str, options: dict[str, Any]
) -> None:
    """What the check stands for: an encoder that differs (here: other settings of the same
    library, the kind of change the codec rule may refuse) gives other bytes."""
    image = image_encoding._known_answer_image()
    buf = io.BytesIO()
    image.save(buf, **options)
    assert hashlib.sha256(buf.getvalue()).hexdigest() != KNOWN_ANSWERS[fmt]
    assert hashlib.sha256(encode_rgb(image, fmt)).hexdigest() == KNOWN_ANSWERS[fmt]


def test_a_node_on_an_encoder_unlike_the_networks_says_so_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    from sogni_node import daemon

    with capture_logs() as quiet:
        daemon._warn_if_encoder_differs()
    assert quiet == []
    # Another build's answer for WebP: this machine's bytes no longer match it.
    monkeypatch.setitem(image_encoding.KNOWN_ANSWERS, "webp", "0" * 64)  # type: ignore[index]
    with capture_logs() as logs:
        daemon._warn_if_encoder_differs()
    assert [(e["event"], e["formats"]) for e in logs] == [("image_encoder_differs", ["webp"])]
    assert "pillow" in logs[0]["hint"]
