"""Why an image failed, as the SDKs read it: a code and a fixed message.

The dispatcher says why it gave up on an image in free text (`JobFailed.reason`: "gave up
after 3 attempts; last: node left: ...", "no connected node can serve ..."); part of that
text comes from nodes. `failure_of` turns it into one of a few codes, the one stored for the
image (`Outcome.error`), and `image_error` / `project_error` give the `jobError` fields the
SDKs show: the code as `error` (the SDKs' own names where one fits: `workerDisconnected`
5002, `jobTimedOut` 5003, `workerCancelled` 5005; any other string is their 5000 with
`originalCode` naming it) and a message written here, never the reason's text (a node's
words, or anything of the prompt, never reach an app or a log through it).

A project none of whose images could be made ends with a project-level `jobError` carrying
the images' own code and message (the commonest, ties to the latest image): the SDKs set the
project's error from that frame last, so a generic one there hid the real reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sogni_coordinator.key_projects import ImageOutcome

__all__ = ["FAILURES", "failure_of", "image_error", "project_error"]

GENERIC = "jobFailed"
FAILURES: dict[str, str] = {
    "workerDisconnected": (
        "the nodes rendering this image disconnected; the network gave up on it after several tries"
    ),
    "jobTimedOut": (
        "the nodes rendering this image missed their deadline; the network gave up on it "
        "after several tries"
    ),
    "workerCancelled": (
        "the nodes offered this image handed it back; the network gave up on it after several tries"
    ),
    "resultRejected": (
        "the results the nodes sent for this image failed the network's checks; the network "
        "gave up on it after several tries"
    ),
    "noWorkers": "no connected node can render this model on this network",
    "resultLost": "the coordinator lost this image after it was rendered",
    "imageNotStored": "the coordinator could not store this image",
    "imageLost": "the project ended without this image",
    GENERIC: "the network could not render this image",
}
"""Code (`jobError.error`) -> the message sent with it."""
_LEGACY = {"lost": "imageLost"}
"""Codes stored by earlier versions -> today's."""
_LAST = (
    ("node left", "workerDisconnected"),
    ("deadline missed", "jobTimedOut"),
    ("handed back", "workerCancelled"),
    ("bad result", "resultRejected"),
)
"""The dispatcher's reason for an image's last failed attempt (`Dispatcher._let_go`) -> code."""


def failure_of(reason: str) -> str:
    """The code of a `JobFailed.reason` (the dispatcher's or the delivery's words)."""
    if reason.startswith("no connected node can serve"):
        return "noWorkers"
    if "lost this image" in reason:  # delivery.LOST_IMAGE: its receipt is stored, the file gone
        return "resultLost"
    _, sep, last = reason.partition("; last: ")
    if sep:
        for prefix, code in _LAST:
            if last.startswith(prefix):
                return code
    return GENERIC


def _known(code: str) -> str:
    code = _LEGACY.get(code, code)
    return code if code in FAILURES else GENERIC


def image_error(code: str) -> dict[str, Any]:
    """The `error` and `error_message` of a per-image `jobError` for a stored code."""
    known = _known(code)
    return {"error": known, "error_message": FAILURES[known]}


def project_error(outcomes: Mapping[int, ImageOutcome]) -> dict[str, Any]:
    """The `error` and `error_message` of the project-level `jobError` of a project none of
    whose images could be made: its images' commonest code, ties to the latest image's."""
    counts: dict[str, int] = {}
    latest: dict[str, int] = {}
    for index, outcome in outcomes.items():
        if not outcome.ok:
            code = _known(outcome.error)
            counts[code] = counts.get(code, 0) + 1
            latest[code] = max(latest.get(code, -1), index)
    if not counts:
        return image_error(GENERIC)
    code = max(counts, key=lambda c: (counts[c], latest[c]))
    return image_error(code)
