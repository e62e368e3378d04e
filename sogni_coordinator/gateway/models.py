"""What the SDKs see of the models: the list, the tiers, worker counts, sampler names.

Every model the network can serve is listed: the operator's configured list (jobs wait for
a node) and whatever connected nodes advertise. Each model gets its own tier, named after
the model, with the defaults of its catalog class (steps, size, guidance). The SDKs' sampler
and scheduler names map both ways onto this network's scheduler names (`euler`, `euler_a`,
`ddim`, `dpmpp_2m_karras`, `lcm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sogni_protocol.catalog import Catalog

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "ModelBook",
    "scheduler_of",
    "sdk_names_of",
]

SAMPLERS = ("euler", "euler_a", "ddim", "dpm_pp_2m", "lcm")
"""Sampler names offered in the tiers (the SDK's `sampler` / `comfySampler`)."""
SCHEDULERS = ("normal", "karras")
"""Scheduler names offered in the tiers (the SDK's `scheduler` / `timeStepSpacing`)."""
_ALIASES = {
    "euler": "euler",
    "eulera": "euler_a",
    "eulerancestral": "euler_a",
    "ddim": "ddim",
    "dpmpp2m": "dpm_pp_2m",
    "dpm2m": "dpm_pp_2m",
    "dpmpp2mkarras": "dpm_pp_2m",
    "lcm": "lcm",
}
_OURS = {
    "euler": "euler",
    "euler_a": "euler_a",
    "ddim": "ddim",
    "dpm_pp_2m": "dpmpp_2m_karras",
    "lcm": "lcm",
}
_GUIDANCE = {"sdxl-turbo": 1.0, "flux-schnell": 1.0, "flux-dev": 3.5, "tiny": 4.0}
"""Default guidance per model class (7.5 otherwise)."""


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def scheduler_of(sampler: object, scheduler: object) -> str:
    """This network's scheduler for the SDK's (sampler, scheduler) pair; "" (the model's
    default) when neither is set. Raises ValueError naming the allowed values."""
    if sampler is None or sampler == "":
        if scheduler not in (None, "") and _key(str(scheduler)) not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; allowed: {', '.join(SCHEDULERS)}")
        return ""
    if not isinstance(sampler, str) or len(sampler) > 64:
        raise ValueError("sampler must be a name")
    canonical = _ALIASES.get(_key(sampler))
    if canonical is None:
        raise ValueError(f"unknown sampler; allowed: {', '.join(SAMPLERS)}")
    if scheduler not in (None, "") and (
        not isinstance(scheduler, str) or _key(scheduler) not in SCHEDULERS
    ):
        raise ValueError(f"unknown scheduler; allowed: {', '.join(SCHEDULERS)}")
    return _OURS[canonical]


def sdk_names_of(scheduler: str) -> tuple[str | None, str | None]:
    """The SDK's (sampler, scheduler) for one of this network's scheduler names."""
    for sdk, ours in _OURS.items():
        if ours == scheduler:
            return sdk, ("karras" if ours.endswith("_karras") else "normal")
    return None, None


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

    def name(self, model_id: str) -> str:
        entry = self.catalog.models.get(model_id)
        return entry.name if entry is not None and entry.name else model_id

    def listing(self, advertised: set[str]) -> list[dict[str, Any]]:
        """`GET /api/v1/models/list`: a bare array, one tier per model (named after it)."""
        return [
            {"id": m, "name": self.name(m), "SID": i + 1, "tier": m, "media": "image"}
            for i, m in enumerate(self.served(advertised))
        ]

    def tiers(self, advertised: set[str]) -> dict[str, Any]:
        """`GET /api/v2/models/tiers`: legacy tiers (no `type`) keyed by tier name."""
        out: dict[str, Any] = {}
        for m in self.served(advertised):
            d = self.defaults(m)
            out[m] = {
                "steps": {"min": 1, "max": 150, "default": d.steps},
                "guidance": {"min": 0, "max": 30, "default": d.guidance, "decimals": 1},
                "sampler": {"allowed": list(SAMPLERS), "default": "euler"},
                "scheduler": {"allowed": list(SCHEDULERS), "default": "normal"},
            }
        return out
