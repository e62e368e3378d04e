"""The shipped detector itself (NudeNet 3.4.2 on onnxruntime, CPU), loaded once per process:
it finds nothing to act on in clean synthetic images and in tiny-model renders, it does fire
on the synthetic trigger, the blur is strong enough that it no longer fires, and the screen
runs it off the trio thread under a deadline."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import numpy as np
import trio
from PIL import Image, ImageDraw

from sogni_coordinator.content_policy import DEFAULT_POLICY_FILE, default_policy
from sogni_coordinator.safety.image_policy import load_image_rules
from sogni_coordinator.safety.redact import blur
from sogni_coordinator.safety.screen import ImageSafety
from sogni_node.render.backend import RenderJob
from sogni_protocol.messages import JobParams
from tests.e2e.conftest import MODEL

from .conftest import TEST_THRESHOLD, TRIGGER_CLASS, trigger

RULES = load_image_rules(DEFAULT_POLICY_FILE)


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _clean_images() -> list[bytes]:
    rng = np.random.default_rng(7)
    shapes = Image.new("RGB", (512, 512), (235, 225, 200))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((100, 100, 400, 400), fill=(200, 30, 30))
    draw.rectangle((20, 380, 200, 500), fill=(30, 90, 200))
    return [
        _png(Image.new("RGB", (64, 64), (128, 128, 128))),
        _png(Image.radial_gradient("L").convert("RGB")),
        _png(Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8))),
        _png(shapes),
    ]


def _tripped(scores: dict[str, float]) -> bool:
    return RULES.tripped(scores, "adult") or RULES.tripped(scores, "minors")


def test_clean_synthetic_images_and_tiny_renders_pass(detector: Any, backend: Any) -> None:
    for image in _clean_images():
        assert not _tripped(detector.scores(image))
    for seed, prompt in enumerate(("a red circle", "a portrait of a woman", "a child")):
        job = RenderJob(MODEL, prompt, "", 3, 4.0, None, 64, 64, seed)
        out = backend.render(job, lambda _: None, lambda: False)
        assert not _tripped(detector.scores(out.image))


def test_the_detector_fires_on_the_trigger_and_not_once_it_is_blurred(detector: Any) -> None:
    raw = trigger()
    assert detector.scores(raw).get(TRIGGER_CLASS, 0.0) >= TEST_THRESHOLD
    assert not RULES.tripped(detector.scores(raw), "adult")  # under the shipped threshold
    assert detector.scores(blur(raw, "png")).get(TRIGGER_CLASS, 0.0) < TEST_THRESHOLD


class _Slow:
    """A detector that takes longer than the deadline (and records its thread)."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.release = threading.Event()

    def scores(self, image: bytes) -> dict[str, float]:
        self.threads.append(threading.get_ident())
        self.release.wait(10)
        return {}


async def test_the_screen_runs_off_the_trio_thread_and_gives_up_at_its_deadline() -> None:
    slow = _Slow()
    safety = ImageSafety(slow, RULES, default_policy(), deadline=0.2)
    params = JobParams(
        model_id=MODEL, positive_prompt="x", steps=3, guidance=4.0, width=64, height=64, seed=1
    )
    started = time.monotonic()
    with trio.fail_after(5):
        screened = await safety.screen(b"r" * 32, params, _clean_images()[0])
    slow.release.set()
    assert screened.outcome == "timeout" and time.monotonic() - started < 2
    assert slow.threads and threading.get_ident() not in slow.threads


class _Broken:
    def scores(self, image: bytes) -> dict[str, float]:
        raise ValueError("the image does not decode")


async def test_a_detector_failure_never_delivers_the_image_unchecked() -> None:
    safety = ImageSafety(_Broken(), RULES, default_policy())
    params = JobParams(
        model_id=MODEL, positive_prompt="x", steps=3, guidance=4.0, width=64, height=64, seed=1
    )
    screened = await safety.screen(b"r" * 32, params, _clean_images()[0])
    assert (screened.outcome, screened.image) == ("error", b"")
