"""SDK projects <-> this network's render requests.

`parse_job_request` turns a `jobRequest` payload into a `RenderRequest` (missing fields
defaulted per model, every value range-checked, clear errors; what this network cannot do
is refused, never dropped); `parse_estimate` does the same for the path of the SDKs'
`estimateCost` call, and `estimate_body` prices it in the shape they read. A `Project` is
the gateway's memory of one (API key, jobID): the request it became, the resume token that
re-attaches to it, the image ids handed out and each image's outcome. `ProjectBook` finds it
again when an SDK re-sends the same jobRequest or reconnects, so the request is resumed,
never submitted (or charged) twice; `sogni_coordinator.key_projects` keeps the same across
a restart.
"""

from __future__ import annotations

import math
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import trio

from sogni_coordinator.gateway.models import SIZE_PRESETS, ModelBook
from sogni_coordinator.key_projects import ImageOutcome
from sogni_protocol import ids
from sogni_protocol.catalog import Catalog
from sogni_protocol.messages import LoraRef, Network, RenderRequest, TokenType
from sogni_protocol.pricing import BASELINE_USD, MICRO, Quote, tier_factor

__all__ = [
    "MAX_IMAGES",
    "Outcome",
    "Project",
    "ProjectBook",
    "ProjectRefused",
    "estimate_body",
    "parse_estimate",
    "parse_job_request",
]

MAX_IMAGES = 16
"""Images one SDK project may ask for."""
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
_PRESET_IDS = ", ".join(p.id for p in SIZE_PRESETS)
_USD_PER_SPARK = Decimal(BASELINE_USD.numerator) / BASELINE_USD.denominator
_LORA_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
"""A LoRA id as the network names it (`messages.ModelId`)."""
LORA_STRENGTH = 4.0
"""Largest |strength| of a LoRA (`messages.LoraStrength`)."""


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
    if not value.isascii():
        try:  # JSON may carry a lone surrogate ("\ud800"), which no signature can encode
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def job_id_of(data: dict[str, Any]) -> str:
    """The project id (upper-cased, as the SDKs compare it); raises `ProjectRefused`."""
    job_id = data.get("jobID")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise _bad("jobID must be a project id (letters, digits, '-', at most 64)")
    return job_id.upper()


_IMAGE_INPUTS = ("hasStartingImage", "hasContextImage1", "hasContextImage2", "hasContextImage3")


def _text_to_image_only(frame: dict[str, Any]) -> None:
    """An input image (image-to-image, context images) or a ControlNet job: refused naming
    the field (they were read as text-to-image: the app got images ignoring its input)."""
    for name in _IMAGE_INPUTS:
        if frame.get(name) is True:
            raise _bad(f"{name}: this network renders from text only (no input images)")
    if frame.get("currentControlNetsJob") is not None:
        raise _bad("currentControlNetsJob: this network renders from text only (no ControlNet)")


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
    _text_to_image_only(frame)
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
    width, height = _size(frame, book, model)
    try:
        scheduler = book.scheduler(
            model,
            frame.get("comfySampler") or frame.get("scheduler") or frame.get("sampler"),
            frame.get("comfyScheduler") or frame.get("timeStepSpacing"),
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None
    loras = _loras(frame)
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
        loras=loras,
        output_format=_FORMATS[fmt],  # type: ignore[arg-type]
        network=net,
        token_type=token,
        disable_safety=safety_off,
    )


def _size(frame: dict[str, Any], book: ModelBook, model: str) -> tuple[int, int]:
    """The image size: the model's own (no preset, or `default`), `custom` width and height,
    or one of Sogni's presets scaled to the model (`ModelBook.preset_size`)."""
    d = book.defaults(model)
    preset = frame.get("sizePreset")
    if preset is None or preset == "" or preset == "default":
        return d.width, d.height
    if preset == "custom":
        w = _int(frame, "width", d.width, 64, 2048)
        h = _int(frame, "height", d.height, 64, 2048)
        if w % 8 or h % 8:
            raise _bad("width and height must be multiples of 8")
        return w, h
    size = book.preset_size(model, preset) if isinstance(preset, str) else None
    if size is None:
        shown = repr(preset[:64]) if isinstance(preset, str) else type(preset).__name__
        raise _bad(
            f"unknown sizePreset {shown}: use 'custom' (with width and height) or one of "
            f"{_PRESET_IDS}"
        )
    return size


def _loras(frame: dict[str, Any]) -> list[LoraRef]:
    """The SDKs' `loras` (ids) and `loraStrengths` (one number each, default 1), as the
    network's `LoraRef`s; anything this network cannot apply is refused, never dropped."""
    names, strengths = frame.get("loras"), frame.get("loraStrengths")
    if names is None or names == []:
        if strengths not in (None, []):
            raise _bad("loraStrengths was sent without loras")
        return []
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _LORA_ID.match(n) for n in names
    ):
        raise _bad("loras must be a list of LoRA ids (letters, digits, '.', '_', ':' or '-')")
    if len(names) > ids.MAX_LORAS:
        raise _bad(f"loras: at most {ids.MAX_LORAS} LoRAs per project")
    if len(set(names)) < len(names):
        raise _bad("loras: a LoRA is listed twice")
    if strengths is None:
        strengths = [1.0] * len(names)
    if not isinstance(strengths, list) or len(strengths) != len(names):
        raise _bad("loraStrengths must hold one number per LoRA in loras")
    refs = []
    for name, strength in zip(names, strengths, strict=True):
        if (
            isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not math.isfinite(strength)
            or abs(strength) > LORA_STRENGTH
        ):
            raise _bad(
                f"loraStrengths must be numbers from -{LORA_STRENGTH:g} to {LORA_STRENGTH:g}"
            )
        refs.append(LoraRef(id=name, strength=float(strength)))
    return refs


def _segment_int(params: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    raw = params.get(name, "")
    try:
        value = Decimal(raw)
    except ArithmeticError:
        value = Decimal("NaN")
    if not (value.is_finite() and lo <= value <= hi) or value != value.to_integral_value():
        raise _bad(f"{name} must be a whole number from {lo} to {hi}")
    return int(value)


def _segment_number(params: Mapping[str, str], name: str, lo: float, hi: float) -> float:
    try:
        value = float(params.get(name, ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(f"{name} must be a number from {lo:g} to {hi:g}")
    return value


def parse_estimate(
    params: Mapping[str, str],
    query: Mapping[str, str],
    *,
    book: ModelBook,
    served: list[str],
) -> RenderRequest:
    """The request an SDK's `estimateCost` path describes: `GET /api/v2/job/estimate/
    {tokenType}/{network}/{model}/{imageCount}/{stepCount}/{previewCount}/{cnEnabled}/
    {denoise}/{width}/{height}`, v3 adding `/{guidance}/{sampler}/{contextImages}`
    (width and height 0: the model's size; guidance 0 and sampler `_`: the model's).

    Checked as a jobRequest would be (`parse_job_request`); what this network cannot render
    (ControlNet, a starting image, context images) is refused with the field's name."""
    count = _segment_int(params, "imageCount", 1, MAX_IMAGES)
    steps = _segment_int(params, "stepCount", 1, 150)
    _segment_int(params, "previewCount", 0, 1000)  # no previews here: they cost nothing
    if _segment_int(params, "cnEnabled", 0, 1):
        raise _bad("cnEnabled: this network does not render with ControlNet")
    if _segment_number(params, "denoise", 0, 1) != 0:
        raise _bad("startingImageStrength: this network renders from text only")
    width = _segment_int(params, "width", 0, 2048)
    height = _segment_int(params, "height", 0, 2048)
    frame: dict[str, Any] = {"modelID": params.get("model"), "steps": steps}
    if width or height:
        frame.update(sizePreset="custom", width=width, height=height)
    if "guidance" in params:  # v3
        guidance = _segment_number(params, "guidance", 0, 30)
        if guidance:
            frame["guidanceScale"] = guidance
        if params.get("sampler", "_") != "_":
            frame["sampler"] = params["sampler"]
        if _segment_int(params, "contextImages", 0, 16):
            raise _bad("contextImages: this network renders from text only")
    data: dict[str, Any] = {
        "jobID": "ESTIMATE",
        "numberOfImages": count,
        "tokenType": params.get("tokenType"),
        "network": params.get("network"),
        "keyFrames": [frame],
    }
    if query.get("outputFormat"):
        data["outputFormat"] = query["outputFormat"]
    return parse_job_request(data, book=book, served=served, network="fast")


def _decimal(micro: int) -> str:
    """Micro units as a plain decimal string of whole units (`"0.000125"`)."""
    return format(Decimal(micro) / MICRO, "f")


def _costs(q: Quote, images: int, steps: int, free: bool) -> dict[str, Any]:
    """One `quote.job` / `quote.project` object: `images` of the quote's per-image price."""
    p = q.per_image
    spark = 0 if free else p.spark_micro * images
    sogni = 0 if free else p.sogni_micro * images
    return {
        "costInRenderSec": f"{p.render_seconds * images:.4f}",
        "costInUSD": format(Decimal(spark) * _USD_PER_SPARK / MICRO, "f"),
        "costInToken": _decimal(spark if q.token_type == "spark" else sogni),
        "costInSpark": _decimal(spark),
        "costInSogni": _decimal(sogni),
        "calculatedStepCount": steps,
    }


def estimate_body(
    req: RenderRequest, q: Quote, catalog: Catalog, *, name: str, free: bool = False
) -> dict[str, Any]:
    """`{request, rate, quote: {model, job, project}}` as the SDKs' `estimateCost` reads it
    (`quote.project.costInToken|costInUSD|costInSpark|costInSogni`, decimal strings): the
    price this network reserves for `req` (`q`, the payer's stake discount already taken
    off); `free`: billing is off, every cost is 0."""
    seconds = q.per_image.render_seconds
    usd_per_spark = _USD_PER_SPARK
    token_usd = usd_per_spark if q.token_type == "spark" else Decimal(str(q.sogni_usd_price))
    per_second_usd = usd_per_spark * q.per_image.spark_micro / MICRO / Decimal(str(seconds or 1))
    return {
        "request": {
            "model": req.model_id,
            "name": name,
            "imageCount": req.number_of_images,
            "stepCount": req.steps,
            "previewCount": 0,
            "cnEnabled": False,
            "denoiseStrength": "0",
            "width": req.width,
            "height": req.height,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "rate": {
            "costPerBaseHQRenderInUSD": str(usd_per_spark),
            "tokenMarkePriceUSD": str(token_usd),
            "costPerRenderSecUSD": "0" if free else f"{per_second_usd:.10f}",
            "costPerRenderSecToken": "0" if free else f"{per_second_usd / token_usd:.10f}",
            "network": req.network,
            "networkCostMultiplier": str(float(tier_factor(req.network, catalog))),
        },
        "quote": {
            "model": {
                "weight": "1",
                "secPerStep": f"{seconds / req.steps:.6f}",
                "secPerPreview": "0",
                "secForCN": "0",
            },
            "job": _costs(q, 1, req.steps, free),
            "project": _costs(q, req.number_of_images, req.steps, free),
        },
    }


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
    model_id: str = ""
    """What it renders, for the `authenticated.activeProjects` entry (empty when recalled
    from the database: `Gateway.recovered` asks the dispatcher)."""
    steps: int = 0
    network: str = ""
    token_type: str = ""
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    started: bool = False
    """A node was seen rendering one of its images (progress, an image or a failure): it
    is no longer only queued, and no more queue positions are sent for it."""
    cancelled: bool = False
    done: bool = False
    told: bool = False
    """Its end (`jobCompleted`, or the project-level error) was written to a socket."""
    told_at: float = 0.0
    """When (`time.time()`): a new socket of its app within `REPLAY_TOLD` s gets it again."""
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


REPLAY_TOLD = 120.0
"""Seconds after a project's end was written during which a new socket of its app gets the
project again: written is not read (the socket can drop with the frame unread, and the SDKs
then fail the project as lost after their two-minute watchdog)."""


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

    def untold(self, key_id: str, app_id: str, now: float | None = None) -> list[Project]:
        """The projects `app_id` started with the key whose end no socket was sent (still
        running, or ended while the app was away), and those whose end was written less
        than `REPLAY_TOLD` s ago (the socket may have dropped before the app read it: the
        SDKs ignore events of a project they finished), cancelled ones aside."""
        recent = (time.time() if now is None else now) - REPLAY_TOLD
        return [
            p
            for (k, _), p in self._by_key.items()
            if k == key_id
            and p.app_id == app_id
            and not p.cancelled
            and (not p.told or p.told_at > recent)
        ]

    def sweep(self, now: float | None = None) -> None:
        """Forget projects that ended `keep` s ago, and those started `keep` s ago whose end
        no stream saw (their app never came back; the database keeps them as long)."""
        now = time.time() if now is None else now
        for key, p in list(self._by_key.items()):
            if now - (p.ended_at if p.ended_at is not None else p.started_at) > self.keep:
                del self._by_key[key]
