"""SDK projects <-> this network's render requests.

`parse_job_request` turns a `jobRequest` payload into a `RenderRequest` (missing fields
defaulted per model, every value range-checked, clear errors). A `Project` is the gateway's
memory of one (API key, jobID): the request it became, the resume token that re-attaches to
it, the image ids handed out and each image's outcome. `ProjectBook` finds it again when an
SDK re-sends the same jobRequest or reconnects, so the request is resumed, never submitted (or
charged) twice; `sogni_coordinator.key_projects` keeps the same across a restart.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from sogni_coordinator.gateway.models import ModelBook, scheduler_of
from sogni_coordinator.key_projects import ImageOutcome
from sogni_protocol import ids
from sogni_protocol.messages import Network, RenderRequest, TokenType

__all__ = [
    "MAX_IMAGES",
    "Outcome",
    "Project",
    "ProjectBook",
    "ProjectRefused",
    "parse_job_request",
]

MAX_IMAGES = 16
"""Images one SDK project may ask for."""
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
_PRESETS = {"square": (512, 512), "square_hd": (1024, 1024)}


class ProjectRefused(Exception):
    """A project-level refusal: sent as `jobError` without `imgID` (the SDK fails the project)."""

    def __init__(self, code: int, error: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message


def _bad(message: str) -> ProjectRefused:
    return ProjectRefused(4000, "invalidRequest", message)


def _int(raw: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{name} must be a whole number from {lo} to {hi}")
    return value


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > ids.MAX_PROMPT_CHARS:
        raise _bad(f"{name} must be text of at most {ids.MAX_PROMPT_CHARS} characters")
    return value


def job_id_of(data: dict[str, Any]) -> str:
    """The project id (upper-cased, as the SDKs compare it); raises `ProjectRefused`."""
    job_id = data.get("jobID")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise _bad("jobID must be a project id (letters, digits, '-', at most 64)")
    return job_id.upper()


def parse_job_request(
    data: dict[str, Any], *, book: ModelBook, served: list[str], network: str
) -> RenderRequest:
    """The request a `jobRequest` asks for, before payer and signature are set.

    Raises `ProjectRefused` with a message an app developer can act on; no prompt text is
    ever part of it."""
    frames = data.get("keyFrames")
    if not isinstance(frames, list) or not frames or not isinstance(frames[0], dict):
        raise _bad("keyFrames[0] must hold the model and prompt")
    frame: dict[str, Any] = frames[0]
    model = frame.get("modelID")
    if not isinstance(model, str) or model not in served:
        shown = model[:128] if isinstance(model, str) else model
        raise ProjectRefused(
            4004, "unknownModel", f"unknown model {shown!r}: this network serves {served}"
        )
    d = book.defaults(model)
    count = _int(data, "numberOfImages", 1, 1, MAX_IMAGES)
    steps = _int(frame, "steps", d.steps, 1, 150)
    guidance = frame.get("guidanceScale")
    if guidance is None:
        guidance = d.guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not 0 <= guidance <= 30
    ):
        raise _bad("guidanceScale must be a number from 0 to 30")
    seed = _int(frame, "seed", secrets.randbelow(2**32), 0, 2**32 - 1)
    width, height = _size(frame, d.width, d.height)
    try:
        scheduler = scheduler_of(
            frame.get("comfySampler") or frame.get("scheduler") or frame.get("sampler"),
            frame.get("comfyScheduler") or frame.get("timeStepSpacing"),
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None
    fmt = data.get("outputFormat") or "png"
    if not isinstance(fmt, str) or fmt not in _FORMATS:  # a list is unhashable: TypeError
        raise _bad("outputFormat must be png, jpg or webp")
    token: TokenType = "spark"
    if data.get("tokenType") in ("spark", "sogni"):
        token = data["tokenType"]
    elif data.get("tokenType"):
        raise _bad("tokenType must be spark or sogni")
    safety_off = data.get("disableSafety", False)
    if not isinstance(safety_off, bool):
        raise _bad("disableSafety must be true or false")
    net: Network = "relaxed" if network == "relaxed" else "fast"
    if data.get("network") in ("fast", "relaxed"):
        net = data["network"]
    elif data.get("network"):
        raise _bad("network must be fast or relaxed")
    return RenderRequest(
        model_id=model,
        positive_prompt=_text(frame, "positivePrompt"),
        negative_prompt=_text(frame, "negativePrompt"),
        style_prompt=_text(frame, "stylePrompt"),
        steps=steps,
        guidance=float(guidance),
        scheduler=scheduler,
        width=width,
        height=height,
        seed=seed,
        number_of_images=count,
        output_format=_FORMATS[fmt],  # type: ignore[arg-type]
        network=net,
        token_type=token,
        disable_safety=safety_off,
    )


def _size(frame: dict[str, Any], width: int, height: int) -> tuple[int, int]:
    preset = frame.get("sizePreset")
    if preset is None or preset == "" or preset == "default":
        return width, height
    if preset == "custom":
        w = _int(frame, "width", width, 64, 2048)
        h = _int(frame, "height", height, 64, 2048)
        if w % 8 or h % 8:
            raise _bad("width and height must be multiples of 8")
        return w, h
    if isinstance(preset, str) and preset in _PRESETS:
        return _PRESETS[preset]
    raise _bad(f"sizePreset must be 'custom' (with width and height) or one of {sorted(_PRESETS)}")


Outcome = ImageOutcome
"""What one image of a project became: a result (seed, steps), or an error."""


@dataclass
class Project:
    key_id: str
    job_id: str
    count: int
    app_id: str = ""
    """The app (socket `appId`) that started it: a new socket of that app gets its events."""
    img_ids: list[str] = field(default_factory=list)
    request_id: bytes = b""
    token: bytes = b""
    cost_micro: int = 0
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    cancelled: bool = False
    done: bool = False
    told: bool = False
    """Its end (`jobCompleted`, or the project-level error) was queued for a socket."""
    ended_at: float | None = None
    started_at: float = field(default_factory=time.time)
    ready: trio.Event = field(default_factory=trio.Event)
    """Set once submitted (or refused): a repeat waits on it instead of submitting again."""
    refusal: ProjectRefused | None = None
    resuming: trio.Lock = field(default_factory=trio.Lock)
    """Held while its request is resumed (adopted from another coordinator): a re-attach
    and a cancel racing on a new socket take it over once."""

    def __post_init__(self) -> None:
        if not self.img_ids:
            self.img_ids = [str(uuid.uuid4()).upper() for _ in range(self.count)]


class ProjectBook:
    """Projects by (key id, jobID), forgotten `keep` seconds after they end."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self._by_key: dict[tuple[str, str], Project] = {}

    def get(self, key_id: str, job_id: str) -> Project | None:
        return self._by_key.get((key_id, job_id))

    def add(self, project: Project) -> None:
        self._by_key[(project.key_id, project.job_id)] = project

    def drop(self, project: Project) -> None:
        if self._by_key.get((project.key_id, project.job_id)) is project:
            del self._by_key[(project.key_id, project.job_id)]

    def by_image(self, img_id: str) -> tuple[Project, int] | None:
        for project in self._by_key.values():
            if img_id in project.img_ids:
                return project, project.img_ids.index(img_id)
        return None

    def in_flight(self, key_id: str) -> list[Project]:
        """The key's projects not ended nor cancelled."""
        return [
            p for (k, _), p in self._by_key.items() if k == key_id and not (p.done or p.cancelled)
        ]

    def untold(self, key_id: str, app_id: str) -> list[Project]:
        """The projects `app_id` started with the key whose end no socket was sent (still
        running, or ended while the app was away), cancelled ones aside."""
        return [
            p
            for (k, _), p in self._by_key.items()
            if k == key_id and p.app_id == app_id and not (p.told or p.cancelled)
        ]

    def sweep(self, now: float | None = None) -> None:
        """Forget projects that ended `keep` s ago, and those started `keep` s ago whose end
        no stream saw (their app never came back; the database keeps them as long)."""
        now = time.time() if now is None else now
        for key, p in list(self._by_key.items()):
            if now - (p.ended_at if p.ended_at is not None else p.started_at) > self.keep:
                del self._by_key[key]
