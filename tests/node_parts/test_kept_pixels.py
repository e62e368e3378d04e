"""A node keeps the lossless pixels of its JPEG and WebP renders beside their trajectories
(same retention) and opens them only when a challenge asks; the wire fields are optional, so
a `Challenge` or `ChallengeAnswer` without them is the same bytes as before they existed."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from sogni_node.trajectory_files import TrajectoryFiles
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    PixelsOpening,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    decode,
    encode,
)

JOB, OLD = b"\x01" * 32, b"\x02" * 32
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"


def test_pixels_kept_loaded_and_pruned_with_the_trajectories(tmp_path: Path) -> None:
    files = TrajectoryFiles(tmp_path / "trajectories", retention=3600)
    assert files.load_pixels(JOB) is None  # a PNG job keeps none
    old = files.keep_pixels(OLD, PNG)
    files.keep_pixels(JOB, PNG + b"!")
    assert files.load_pixels(OLD) == PNG and files.load_pixels(JOB) == PNG + b"!"
    assert sorted(p.name for p in files.folder.iterdir()) == sorted(
        [f"{OLD.hex()}.pixels.png", f"{JOB.hex()}.pixels.png"]
    )  # no temporary file left behind
    os.utime(old, (1_000.0, 1_000.0))
    assert files.prune(1_000.0 + 3_601) == 1
    assert files.load_pixels(OLD) is None and files.load_pixels(JOB) is not None


def _leaf() -> StepOpeningWire:
    latents = TensorEntry(name="latents", dtype="float32", shape=[1, 1], data=bytes(4))
    return StepOpeningWire(
        step=1, tensors=[latents], scalars=[ScalarEntry(name="t", value=1)], proof=[], n_leaves=2
    )


def test_the_optional_fields_stay_out_of_the_frame_unless_set() -> None:
    plain = Challenge(job_id=JOB, steps=[1], deadline=5)
    assert b"pixels" not in encode(plain)  # an older node decodes it as before
    asked = Challenge(job_id=JOB, steps=[1], deadline=5, pixels=True)
    assert decode(encode(asked)) == asked and b"pixels" in encode(asked)
    answer = ChallengeAnswer(job_id=JOB, openings=[_leaf()])
    assert b"pixels" not in encode(answer) and decode(encode(answer)) == answer
    opened = msgspec.structs.replace(answer, pixels=PixelsOpening(png=PNG, encoder="x86_64"))
    back = decode(encode(opened))
    assert isinstance(back, ChallengeAnswer) and back.pixels == opened.pixels


def test_opened_pixels_are_validated() -> None:
    bad = encode(ChallengeAnswer(job_id=JOB, openings=[_leaf()]))
    # a hand-made frame whose pixels are too short, or whose encoder line is too long
    for pixels in ({"png": b"x"}, {"png": PNG, "encoder": "x" * 129}, {"png": PNG, "what": 1}):
        raw = msgspec.msgpack.decode(bad)
        raw["pixels"] = pixels
        with pytest.raises(InvalidMessage, match="pixels"):
            decode(msgspec.msgpack.encode(raw))
