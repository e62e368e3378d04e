"""What the image check does with a detector's scores: the rules built from the `[image]`
table (`image_table`), and the decision (pure: no detector, no I/O beyond reading the file).

Categories, as for prompts (docs/SAFETY.md):

- `minors`, always refused: an exposed-body class at or above its `[image] minors` threshold
  in an image whose prompt had an underage term (or a young age) that the prompt check let
  through as non-sexual. No offline classifier judges age, so "minors" here means the prompt
  said the subject was young and the image came back nude. Withheld, never stored; counted
  against the node only when the prompt was clean (no sexual or suggestive term, and no
  `[image] negative_clothing` term steering the image undressed).
- `adult`: an exposed-body class at or above its `[image] adult` threshold, for a request
  that did not opt in (`disableSafety` and the operator's `allow_adult`). Blurred or
  withheld per `[content] adult_action`; the job is paid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sogni_coordinator.content_policy import TermSet, _read
from sogni_coordinator.safety.image_table import read_image_table

__all__ = ["Action", "Decision", "ImageRules", "decide", "load_image_rules"]

Action = Literal["deliver", "blur", "withhold", "refuse"]
"""deliver as rendered; blur; withhold (a placeholder goes out, the image is not stored);
refuse (the result is refused: the node is struck, not paid, the job goes elsewhere)."""


@dataclass(frozen=True)
class ImageRules:
    """Per-class thresholds by category, and the negative-prompt terms that make a prompt
    not clean."""

    adult: dict[str, float]
    minors: dict[str, float]
    negative_clothing: TermSet

    def tripped(self, scores: dict[str, float], category: Literal["adult", "minors"]) -> bool:
        limits = self.adult if category == "adult" else self.minors
        return any(scores.get(label, 0.0) >= limit for label, limit in limits.items())

    def steers_undressed(self, negative: str) -> bool:
        return bool(negative) and any(self.negative_clothing.found_in(r) for r in _read(negative))


@dataclass(frozen=True)
class Decision:
    category: Literal["adult", "minors"] | None
    action: Action


def decide(
    rules: ImageRules,
    scores: dict[str, float],
    *,
    young: bool,
    clean: bool,
    adult_ok: bool,
    adult_action: Literal["blur", "withhold"],
) -> Decision:
    """The action for one image. `young`: the prompt had an underage term or age; `clean`:
    it asked for nothing sexual, suggestive or undressed; `adult_ok`: the request opted in
    and the operator allows adult content."""
    if young and rules.tripped(scores, "minors"):
        return Decision("minors", "refuse" if clean else "withhold")
    if rules.tripped(scores, "adult"):
        return Decision("adult", "deliver" if adult_ok else adult_action)
    return Decision(None, "deliver")


def load_image_rules(path: Path) -> ImageRules:
    """The `[image]` table of the policy file; `ImageTableError` (a ValueError) naming the
    file and the key."""
    table = read_image_table(path)
    return ImageRules(
        adult=dict(table.adult),
        minors=dict(table.minors),
        negative_clothing=TermSet.of(table.negative_clothing),
    )
