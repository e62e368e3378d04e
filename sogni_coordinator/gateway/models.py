"""What the SDKs see of the models: the list, the tiers, size presets, sampler names.

Every model the network can serve is listed: the operator's configured list (jobs wait for
a node) and whatever connected nodes advertise. Each model gets its own tier, named after
the model, with the defaults of its catalog class (steps, size, guidance, scheduler).

Samplers and schedulers: this network renders with five schedulers (`euler`, `euler_a`,
`ddim`, `dpmpp_2m_karras`, `lcm`: the node's `SCHEDULERS`). In the SDKs' terms each is one
(sampler, scheduler) pair (`PAIRS`); those pairs are the only ones accepted (any other is a
4000 naming them), a sampler sent alone takes its pair's scheduler, and a request naming
neither renders with the model's own scheduler, which is what the tiers give as defaults.
Flux models render with their own flow-matching scheduler and offer no choice.

Size presets: Sogni's preset ids (`square_hd`, `portrait_7_9`, ...) with the sizes Sogni gives
a 1024 px model, scaled to each model's native size (a 64 px model's `square_hd` is 64x64).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from sogni_protocol.catalog import Catalog

__all__ = [
    "PAIRS",
    "SAMPLERS",
    "SCHEDULERS",
    "SIZE_PRESETS",
    "ModelBook",
    "SizePreset",
    "scheduler_of",
    "sdk_names_of",
    "sid_of",
]

PAIRS: dict[tuple[str, str], str] = {
    ("euler", "normal"): "euler",
    ("euler_a", "normal"): "euler_a",
    ("ddim", "normal"): "ddim",
    ("dpm_pp_2m", "karras"): "dpmpp_2m_karras",
    ("lcm", "normal"): "lcm",
}
"""The SDKs' (sampler, scheduler) -> this network's scheduler: the only pairs that exist here."""
SAMPLERS = tuple(dict.fromkeys(sampler for sampler, _ in PAIRS))
"""Sampler names offered in the tiers (the SDK's `sampler` / `comfySampler`)."""
SCHEDULERS = tuple(dict.fromkeys(scheduler for _, scheduler in PAIRS))
"""Scheduler names offered in the tiers (the SDK's `scheduler` / `timeStepSpacing`)."""
_SCHEDULER_OF_SAMPLER = {sampler: scheduler for sampler, scheduler in PAIRS}
"""Each sampler runs with one scheduler here: the one a sampler sent alone gets."""
_ALIASES: dict[str, tuple[str, str | None]] = {
    "euler": ("euler", None),
    "eulera": ("euler_a", None),
    "eulerancestral": ("euler_a", None),
    "ddim": ("ddim", None),
    "dpmpp2m": ("dpm_pp_2m", None),
    "dpm2m": ("dpm_pp_2m", None),
    "dpmpp2mkarras": ("dpm_pp_2m", "karras"),
    "dpm2mkarras": ("dpm_pp_2m", "karras"),
    "lcm": ("lcm", None),
}
"""Sampler names as the SDKs and apps spell them (alphanumerics only, lower case) -> the
sampler, and the scheduler the name itself implies (`"DPM++ 2M Karras"`)."""
_OWN_SCHEDULER: dict[str, str | None] = {
    "sd15": "dpmpp_2m_karras",
    "sdxl": "dpmpp_2m_karras",
    "sdxl-turbo": "euler_a",
    "lcm": "lcm",
    "tiny": "euler",
    "flux-schnell": None,
    "flux-dev": None,
    "flux": None,
}
"""The scheduler a model of each catalog class renders with when a job names none (the
node's class defaults, `sogni_node.models.detect.CLASS_DEFAULTS`; the tiny test models keep
their saved Euler scheduler); None: the model's own flow-matching scheduler, no choice. A
class not listed: not known ("" from `own_scheduler`)."""
_GUIDANCE = {"sdxl-turbo": 1.0, "flux-schnell": 1.0, "flux-dev": 3.5, "tiny": 4.0}
"""Default guidance per model class (7.5 otherwise)."""
_PAIR_LIST = ", ".join(f"{a}+{b}" for a, b in PAIRS)


def sid_of(model_id: str) -> int:
    """A model's numeric `SID` (`/api/v1/models/list`, the keys of
    `/api/v1/status/network/{network}/models`): from its id alone, so it stays the same
    as models come and go (the SDKs cache the list for 24 h and match the counts' SIDs
    against it; a position in the list moved when a node brought a new model). 31 bits,
    from 1: a positive safe integer in JavaScript."""
    digest = hashlib.sha256(model_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _shown(value: object) -> str:
    return repr(value[:64]) if isinstance(value, str) else type(value).__name__


def scheduler_of(sampler: object, scheduler: object, own: str | None = "") -> str:
    """This network's scheduler for the SDK's (sampler, scheduler) pair.

    `own`: the scheduler the model renders with when none is named ("" not known, None: the
    model takes no choice). Returns "" (the model's own) when neither is sent. Raises
    ValueError naming the field and the allowed values."""
    sampler_sent = sampler not in (None, "")
    scheduler_sent = scheduler not in (None, "")
    if not (sampler_sent or scheduler_sent):
        return ""
    if own is None:
        raise ValueError("this model renders with its own scheduler: send no sampler or scheduler")
    implied: str | None = None
    if sampler_sent:
        if not isinstance(sampler, str) or len(sampler) > 64:
            raise ValueError("sampler must be a name")
        alias = _ALIASES.get(_key(sampler))
        if alias is None:
            raise ValueError(f"unknown sampler {_shown(sampler)}; allowed: {', '.join(SAMPLERS)}")
        name, implied = alias
    else:
        default = sdk_names_of(own)[0] if own else None
        if default is None:
            raise ValueError(
                f"scheduler {_shown(scheduler)} needs a sampler too; pairs: {_PAIR_LIST}"
            )
        name = default
    if scheduler_sent:
        if not isinstance(scheduler, str) or _key(scheduler) not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {_shown(scheduler)}; allowed: {', '.join(SCHEDULERS)}"
            )
        spacing = _key(scheduler)
        if implied is not None and spacing != implied:
            raise ValueError(f"sampler {_shown(sampler)} runs with scheduler {implied!r} only")
    else:
        spacing = implied or _SCHEDULER_OF_SAMPLER[name]
    ours = PAIRS.get((name, spacing))
    if ours is None:
        what = f"sampler {name!r} with scheduler {spacing!r}"
        if not sampler_sent:
            what += " (this model's own sampler)"
        raise ValueError(f"{what} is not rendered by this network; pairs: {_PAIR_LIST}")
    return ours


def sdk_names_of(scheduler: str) -> tuple[str | None, str | None]:
    """The SDK's (sampler, scheduler) for one of this network's scheduler names."""
    for pair, ours in PAIRS.items():
        if ours == scheduler:
            return pair
    return None, None


@dataclass(frozen=True)
class SizePreset:
    """One of Sogni's size presets, at the size Sogni gives it for a 1024x1024 model."""

    id: str
    label: str
    width: int
    height: int
    ratio: str
    aspect: str


SIZE_PRESETS: tuple[SizePreset, ...] = (
    SizePreset("square", "Square", 512, 512, "1:1", "1"),
    SizePreset("square_hd", "Square HD", 1024, 1024, "1:1", "1"),
    SizePreset("portrait_7_9", "Portrait: Standard", 896, 1152, "7:9", "0.78"),
    SizePreset("portrait_13_19", "Portrait: 35mm", 832, 1216, "13:19", "0.68"),
    SizePreset("portrait_4_7", "Portrait: Mobile", 768, 1344, "4:7", "0.57"),
    SizePreset("portrait_5_12", "Portrait: Extended", 640, 1536, "5:12", "0.42"),
    SizePreset("landscape_9_7", "Landscape: Standard", 1152, 896, "9:7", "1.28"),
    SizePreset("landscape_19_13", "Landscape: 35mm", 1216, 832, "19:13", "1.46"),
    SizePreset("landscape_7_4", "Landscape: Widescreen", 1344, 768, "7:4", "1.75"),
    SizePreset("landscape_12_5", "Landscape: Ultrawide", 1536, 640, "12:5", "2.4"),
)
"""Sogni's presets (its SDK's `getSizePresets` for a 1024 px model), in its order."""
_PRESETS_BY_ID = {p.id: p for p in SIZE_PRESETS}
_REFERENCE_SIDE = 1024
MIN_SIDE, MAX_SIDE = 64, 2048
"""Image sides a request may have (`RenderRequest`: multiples of 8 in this range)."""


def _scaled(preset: SizePreset, width: int, height: int) -> tuple[int, int]:
    """`preset` for a model whose native size is `width` x `height`: the same pixel count
    ratio as to a 1024x1024 model, the preset's aspect, sides multiples of 8 in 64-2048
    (a side that would be smaller or larger stretches the other to keep the aspect)."""
    scale = math.sqrt(width * height) / _REFERENCE_SIDE
    w, h = preset.width * scale, preset.height * scale
    if min(w, h) < MIN_SIDE:
        w, h = w * MIN_SIDE / min(w, h), h * MIN_SIDE / min(w, h)
    if max(w, h) > MAX_SIDE:
        w, h = w * MAX_SIDE / max(w, h), h * MAX_SIDE / max(w, h)

    def side(x: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, 8 * round(x / 8)))

    return side(w), side(h)


@dataclass(frozen=True)
class ModelDefaults:
    steps: int
    width: int
    height: int
    guidance: float


@dataclass
class ModelBook:
    """The models of this network as the SDKs list them; cheap, rebuilt per call."""

    catalog: Catalog
    configured: frozenset[str]

    def served(self, advertised: set[str]) -> list[str]:
        """Every model id a request may name: the configured ones (a configured list is a
        promise, and the dispatcher takes no other: `Dispatcher.model_fault`), else those
        nodes advertise."""
        return sorted(self.configured or advertised)

    def defaults(self, model_id: str) -> ModelDefaults:
        entry = self.catalog.model(model_id)
        return ModelDefaults(
            steps=entry.default_steps,
            width=entry.default_width,
            height=entry.default_height,
            guidance=_GUIDANCE.get(entry.model_class, 7.5),
        )

    def own_scheduler(self, model_id: str) -> str | None:
        """The scheduler the model renders with when a job names none: one of this
        network's names, "" when its class is not known, None when it takes no choice."""
        return _OWN_SCHEDULER.get(self.catalog.model(model_id).model_class, "")

    def scheduler(self, model_id: str, sampler: object, scheduler: object) -> str:
        """`scheduler_of` for this model; raises ValueError."""
        return scheduler_of(sampler, scheduler, self.own_scheduler(model_id))

    def size_presets(self, model_id: str) -> list[dict[str, Any]]:
        """`GET /api/v1/size-presets/network/{network}/model/{model}`: a bare array."""
        d = self.defaults(model_id)
        out = []
        for p in SIZE_PRESETS:
            width, height = _scaled(p, d.width, d.height)
            out.append(
                {
                    "label": p.label,
                    "id": p.id,
                    "width": width,
                    "height": height,
                    "ratio": p.ratio,
                    "aspect": p.aspect,
                }
            )
        return out

    def preset_size(self, model_id: str, preset_id: str) -> tuple[int, int] | None:
        """The size of Sogni preset `preset_id` for this model; None for an unknown id."""
        preset = _PRESETS_BY_ID.get(preset_id)
        if preset is None:
            return None
        d = self.defaults(model_id)
        return _scaled(preset, d.width, d.height)

    def name(self, model_id: str) -> str:
        entry = self.catalog.models.get(model_id)
        return entry.name if entry is not None and entry.name else model_id

    def listing(self, advertised: set[str]) -> list[dict[str, Any]]:
        """`GET /api/v1/models/list`: a bare array, one tier per model (named after it)."""
        return [
            {"id": m, "name": self.name(m), "SID": sid_of(m), "tier": m, "media": "image"}
            for m in self.served(advertised)
        ]

    def tiers(self, advertised: set[str]) -> dict[str, Any]:
        """`GET /api/v2/models/tiers`: legacy tiers (no `type`) keyed by tier name. The
        sampler and scheduler defaults are the model's own (what a job naming neither gets);
        a model that takes no choice has neither (the SDKs then send none)."""
        out: dict[str, Any] = {}
        for m in self.served(advertised):
            d = self.defaults(m)
            tier: dict[str, Any] = {
                "steps": {"min": 1, "max": 150, "default": d.steps},
                "guidance": {"min": 0, "max": 30, "default": d.guidance, "decimals": 1},
            }
            own = self.own_scheduler(m)
            if own is not None:
                sampler, scheduler = sdk_names_of(own)
                tier["sampler"] = {"allowed": list(SAMPLERS), "default": sampler}
                tier["scheduler"] = {"allowed": list(SCHEDULERS), "default": scheduler}
            out[m] = tier
        return out
