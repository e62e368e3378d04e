"""The dispatcher's entry point: screen one rendered image before it is stored for delivery.

Runs the detector, the prompt reading and any blur in a worker thread (never on the trio
thread) under a deadline, a few images at a time. The detector's scores are remembered by the
image's SHA-256 (the same bytes always score the same), so an image seen again, e.g. a
result re-sent after a timeout, the same job re-rendered elsewhere, or a benchmark's
instant nodes sending one PNG, costs no pixel work and no thread; the prompts are read only
when a score crosses a threshold (below every threshold the answer is "deliver" whatever they
say). Logs category, action, and the image's hash prefix only: never a prompt or an image.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from sogni_coordinator.content_policy import ContentConfig, ContentPolicy
from sogni_coordinator.safety.detector import Detector, shared_detector
from sogni_coordinator.safety.image_policy import Action, ImageRules, decide, load_image_rules
from sogni_coordinator.safety.redact import blur, placeholder
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobParams, RenderRequest

log = get_logger(__name__)

__all__ = ["MESSAGES", "ImageSafety", "Screened", "image_safety_from"]

Outcome = Action | Literal["timeout", "error"]
MESSAGES = {
    "minors": "image refused by the content policy (category: minors)",
    "timeout": "the coordinator could not check the image; retry",
}
"""Texts for the node: the category only, never the prompt or the image."""
OPTED_IN_MEMORY = 100_000
"""Requests remembered as opted in (a request lives minutes; older ones fall back to safety
on, the safe side: after a restart too)."""
SCORES_MEMORY = 4096
"""Detector scores remembered, by image SHA-256 (~200 bytes each)."""


@dataclass(frozen=True)
class Screened:
    """What to store for delivery (the image, blurred, or a placeholder) and why."""

    image: bytes
    category: str | None
    outcome: Outcome


class ImageSafety:
    """The image check with its detector (loaded once), rules and the operator's choices."""

    def __init__(
        self,
        detector: Detector,
        rules: ImageRules,
        policy: ContentPolicy,
        *,
        adult_action: Literal["blur", "withhold"] = "blur",
        deadline: float = 10.0,
        threads: int = 2,
    ) -> None:
        self.detector = detector
        self.rules = rules
        self.policy = policy
        self.adult_action = adult_action
        self.deadline = deadline
        self._limiter = trio.CapacityLimiter(threads)
        self._opted_in: OrderedDict[bytes, None] = OrderedDict()
        self.on_decision: Callable[[str, str], None] | None = None
        """Called with (category or "none", outcome) per image: the metrics hook."""
        self._scores: OrderedDict[bytes, dict[str, float]] = OrderedDict()
        self._scores_lock = threading.Lock()  # worker threads and the trio thread
        self.detector_runs = 0
        """Images the detector actually ran on (not answered from memory)."""

    def note_request(self, request_id: bytes, req: RenderRequest) -> None:
        """Remember that a request opted in to adult content (and the operator allows it)."""
        if req.disable_safety and self.policy.allow_adult:
            self._opted_in[request_id] = None
            while len(self._opted_in) > OPTED_IN_MEMORY:
                self._opted_in.popitem(last=False)

    def _remembered(self, digest: bytes) -> dict[str, float] | None:
        with self._scores_lock:
            scores = self._scores.get(digest)
            if scores is not None:
                self._scores.move_to_end(digest)
            return scores

    def _detect(self, digest: bytes, image: bytes) -> dict[str, float]:
        """Blocking: the detector's scores for `image`, from memory when seen before."""
        scores = self._remembered(digest)
        if scores is not None:
            return scores
        scores = self.detector.scores(image)
        with self._scores_lock:
            self.detector_runs += 1
            self._scores[digest] = scores
            while len(self._scores) > SCORES_MEMORY:
                self._scores.popitem(last=False)
        return scores

    def _screen(self, params: JobParams, image: bytes, adult_ok: bool, digest: bytes) -> Screened:
        """Blocking: the worker thread's part. Any failure is outcome "error": the image is
        not delivered unchecked (the result is refused without a strike, and retried)."""
        try:
            return self._judge(params, image, adult_ok, self._detect(digest, image))
        except Exception as exc:  # the detector's or the codec's: never deliver unchecked
            log.error("image_check_failed", error=type(exc).__name__)
            return Screened(b"", None, "error")

    def _below_thresholds(self, scores: dict[str, float]) -> bool:
        return not self.rules.tripped(scores, "minors") and not self.rules.tripped(scores, "adult")

    def _judge(
        self, params: JobParams, image: bytes, adult_ok: bool, scores: dict[str, float]
    ) -> Screened:
        if self._below_thresholds(scores):  # `decide` delivers whatever the prompts say
            return Screened(image, None, "deliver")
        young, lewd = self.policy.prompt_facts(params.positive_prompt, params.style_prompt)
        clean = not lewd and not self.rules.steers_undressed(params.negative_prompt)
        d = decide(
            self.rules,
            scores,
            young=young,
            clean=clean,
            adult_ok=adult_ok,
            adult_action=self.adult_action,
        )
        fmt, w, h = params.output_format, params.width, params.height
        if d.action == "deliver":
            return Screened(image, d.category, "deliver")
        if d.action == "blur":
            blurred = blur(image, fmt)
            if not self.rules.tripped(self.detector.scores(blurred), "adult"):
                return Screened(blurred, d.category, "blur")
            return Screened(placeholder(fmt, w, h), d.category, "withhold")  # blur not enough
        return Screened(placeholder(fmt, w, h), d.category, d.action)

    async def screen(
        self, request_id: bytes, params: JobParams, image: bytes, digest: bytes | None = None
    ) -> Screened:
        """The image to store for delivery; outcome "refuse" (strike the node), "timeout" or
        "error" (retry, no strike) means store nothing. `digest`: the image's SHA-256 when
        the caller has already checked it (the dispatcher checks every receipt's
        `result_hash`); computed here otherwise."""
        adult_ok = request_id in self._opted_in
        if digest is None:
            digest = hashlib.sha256(image).digest()
        known = self._remembered(digest)
        if known is not None and self._below_thresholds(known):  # no pixel work, no thread
            screened = Screened(image, None, "deliver")
            self._count(screened, image)
            return screened
        with trio.move_on_after(self.deadline):
            screened = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                self._screen, params, image, adult_ok, digest, limiter=self._limiter,
                abandon_on_cancel=True,  # a stuck detector must not hold the result
            )  # fmt: skip
            self._count(screened, image)
            return screened
        timed_out = Screened(b"", None, "timeout")
        self._count(timed_out, image)
        return timed_out

    def _count(self, s: Screened, image: bytes) -> None:
        if self.on_decision is not None:
            self.on_decision(s.category or "none", s.outcome)
        if s.outcome != "deliver":
            log.warning(
                "image_screened",
                category=s.category,
                action=s.outcome,
                image=hashlib.sha256(image).hexdigest()[:16],
            )


def image_safety_from(content: ContentConfig) -> ImageSafety | None:
    """The configured check (None when `[content] image_check = false`); loads the detector
    once per process. Raises `DetectorMissing` when NudeNet is not installed."""
    if not content.image_check:
        return None
    return ImageSafety(
        shared_detector(),
        load_image_rules(content.path),
        content.policy(),
        adult_action=content.adult_action,
    )
