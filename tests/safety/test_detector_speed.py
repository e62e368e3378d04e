"""The detector's cheap paths give the answers of the slow ones: the vectorised post-processing
keeps NudeNet's boxes and scores, and an image seen again is answered from memory (no model
run) with the same decision, a tripped one still judged against its prompts."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import trio
from nudenet.nudenet import _postprocess

from sogni_coordinator.content_policy import default_policy
from sogni_coordinator.safety.detector import best_scores
from sogni_coordinator.safety.image_policy import load_image_rules
from sogni_coordinator.safety.screen import ImageSafety
from sogni_protocol.messages import JobParams
from tests.e2e.conftest import MODEL

from .conftest import SIZE, TRIGGER_CLASS, policy_for_trigger, trigger


def _nudenet_best(output: Any, x_pad: int, y_pad: int, w: int, h: int) -> dict[str, float]:
    found: dict[str, float] = {}
    for box in _postprocess([output], x_pad, y_pad, 1.0, 1.0, w, h, 320, 320):
        found[box["class"]] = max(float(box["score"]), found.get(box["class"], 0.0))
    return found


def test_vectorised_post_processing_keeps_nudenets_boxes_and_scores() -> None:
    """Random model outputs with hundreds of overlapping candidates above the threshold, so
    NudeNet's class-agnostic NMS drops some classes: the same classes and scores survive."""
    rng = np.random.default_rng(5)
    dropped = 0
    for trial in range(40):
        out = np.zeros((1, 22, 2100), np.float32)
        centres = rng.uniform(40, 280, (2, 4))[:, rng.integers(0, 4, 2100)]  # 4 clusters
        out[0, 0:2] = centres + rng.normal(0, 4, (2, 2100))
        out[0, 2:4] = rng.uniform(60, 90, (2, 2100))
        out[0, 4:] = rng.uniform(0, 0.3 + trial / 80, (18, 2100)) ** 2
        w, h = [(64, 64), (512, 320), (200, 640)][trial % 3]
        x_pad, y_pad = max(w, h) - w, max(w, h) - h
        expected = _nudenet_best(out, x_pad, y_pad, w, h)
        assert best_scores(out, x_pad, y_pad, w, h, 320, 320) == expected
        scores = out[0, 4:]
        candidates = set(scores.argmax(axis=0)[scores.max(axis=0) >= 0.25].tolist())
        dropped += len(candidates) - len(expected)
    assert dropped > 0  # NMS did suppress whole classes: the comparison covered it


def test_the_real_model_output_on_the_trigger_scores_as_nudenet_does(detector: Any) -> None:
    raw = np.frombuffer(trigger(), np.uint8)
    import cv2

    mat = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    legacy: dict[str, float] = {}
    for box in detector._nudenet.detect(mat):
        legacy[box["class"]] = max(float(box["score"]), legacy.get(box["class"], 0.0))
    assert detector.scores(trigger()) == legacy and TRIGGER_CLASS in legacy


class _Counting:
    """The real detector, counting the images it runs on."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.runs = inner, 0

    def scores(self, image: bytes) -> dict[str, float]:
        self.runs += 1
        return dict(self.inner.scores(image))


def _params(prompt: str) -> JobParams:
    return JobParams(
        model_id=MODEL, positive_prompt=prompt, steps=3, guidance=4.0, width=SIZE, height=SIZE,
        seed=1,
    )  # fmt: skip


async def test_an_image_seen_again_is_not_run_again_and_gets_the_same_decision(
    detector: Any, tmp_path: Path
) -> None:
    counting = _Counting(detector)
    rules = load_image_rules(policy_for_trigger(tmp_path))
    safety = ImageSafety(counting, rules, default_policy())
    clean = np.full((SIZE, SIZE, 3), 90, np.uint8)
    import cv2

    plain = cv2.imencode(".png", clean)[1].tobytes()
    tripping = trigger()
    with trio.fail_after(30):
        first = [await safety.screen(b"r" * 32, _params("a field"), im) for im in (plain, tripping)]
        runs = counting.runs
        again = [await safety.screen(b"r" * 32, _params("a field"), im) for im in (plain, tripping)]
        digest = hashlib.sha256(tripping).digest()
        given = await safety.screen(b"r" * 32, _params("a field"), tripping, digest=digest)
    assert [s.outcome for s in first] == ["deliver", "blur"]  # the trigger trips "adult"
    assert [(s.outcome, s.category) for s in again] == [(s.outcome, s.category) for s in first]
    assert given.outcome == "blur" and again[0].image == plain
    # the blur re-check runs the model on the blurred image each time; the originals once
    assert runs == 3 and counting.runs == runs + 2 and safety.detector_runs == 2
