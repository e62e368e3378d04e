"""Model registry: model id -> local folder and render defaults.

Why: a node must only ever load weights it already has on disk (nothing is fetched from a hub
at run time), and jobs name models by id. Later work adds single-file checkpoints, sha256
checks and catalogs; this keeps only what rendering needs now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sogni_node.models.tiny import (
    TINY_DEFAULT_GUIDANCE,
    TINY_DEFAULT_STEPS,
    TINY_IMAGE_SIZE,
    TINY_MODEL_ID,
    ensure_tiny_model,
)
from sogni_protocol.ids import EMBEDDED_MODEL_ID

if TYPE_CHECKING:
    from sogni_node.render.backend import RenderJob

logger = logging.getLogger(__name__)

SHAPES_MODEL_ID = EMBEDDED_MODEL_ID
"""The embedded default: a small trained model of coloured shapes (see docs/MODEL.md)."""

SHAPES_DIR = Path(__file__).resolve().parent / "weights" / SHAPES_MODEL_ID
"""Shipped as package data, so a fresh install can render real prompts with no download."""

SHAPES_IMAGE_SIZE = 64
SHAPES_DEFAULT_STEPS = 8
SHAPES_DEFAULT_GUIDANCE = 5.0
SHAPES_DEFAULT_SCHEDULER = "euler"
"""Same as its saved scheduler config (Euler, v-prediction, zero terminal SNR, trailing)."""

DEFAULT_MODEL_ID = SHAPES_MODEL_ID
"""What a node renders when nothing else is configured."""

MODEL_CLASSES = frozenset({"sd15", "sdxl", "sdxl-turbo", "lcm", "flux"})
"""Pipeline families named in DESIGN.md section 5."""


class UnknownModelError(LookupError):
    """A job named a model id this node does not have."""

    def __init__(self, model_id: str, known: Iterable[str] = ()) -> None:
        known_list = sorted(known)
        hint = f"; known: {', '.join(known_list)}" if known_list else ""
        super().__init__(f"unknown model id {model_id!r}{hint}")
        self.model_id = model_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep model_id when the error crosses a process boundary (pickle).
        return (_rebuild_unknown, (self.model_id, str(self)))


def _rebuild_unknown(model_id: str, message: str) -> UnknownModelError:
    err = UnknownModelError(model_id)
    err.args = (message,)
    return err


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives and how to render it by default."""

    model_id: str
    path: Path
    model_class: str = "sd15"
    default_steps: int = 20
    default_guidance: float = 7.5
    width: int = 512
    height: int = 512
    default_scheduler: str | None = None
    """A job scheduler name (e.g. "euler"); None means the model's own saved scheduler."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(
                f"model {self.model_id!r}: unknown class {self.model_class!r}; "
                f"expected one of {sorted(MODEL_CLASSES)}"
            )
        if self.default_steps < 1 or self.width < 8 or self.height < 8:
            raise ValueError(f"model {self.model_id!r}: steps and size must be positive")
        object.__setattr__(self, "path", Path(self.path))

    def default_job(self, prompt: str, seed: int = 0) -> RenderJob:
        """A job at this model's defaults: what `bench` measures and the catalog prices."""
        from sogni_node.render.backend import RenderJob  # render imports this module

        return RenderJob(
            model_id=self.model_id,
            prompt=prompt,
            negative_prompt="",
            steps=self.default_steps,
            guidance=self.default_guidance,
            scheduler=self.default_scheduler,
            width=self.width,
            height=self.height,
            seed=seed,
        )

    @classmethod
    def from_dict(cls, model_id: str, cfg: Mapping[str, Any]) -> ModelSpec:
        """Build from a config entry: {"path", "class", "steps", "guidance", "width", "height",
        "scheduler"}."""
        unknown = set(cfg) - {"path", "class", "steps", "guidance", "width", "height", "scheduler"}
        if unknown:
            raise ValueError(f"model {model_id!r}: unknown config keys {sorted(unknown)}")
        if "path" not in cfg:
            raise ValueError(f"model {model_id!r}: missing 'path'")
        return cls(
            model_id=model_id,
            path=Path(cfg["path"]),
            model_class=str(cfg.get("class", "sd15")),
            default_steps=int(cfg.get("steps", 20)),
            default_guidance=float(cfg.get("guidance", 7.5)),
            width=int(cfg.get("width", 512)),
            height=int(cfg.get("height", 512)),
            default_scheduler=str(cfg["scheduler"]) if cfg.get("scheduler") else None,
        )


class ModelRegistry:
    """Model id -> ModelSpec. Not thread-safe for writes; register models at start-up."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self.register(spec)

    @classmethod
    def from_config(cls, config: Mapping[str, Mapping[str, Any]]) -> ModelRegistry:
        """Build from `{model_id: {"path": ..., "class": ..., ...}}` (e.g. parsed TOML)."""
        return cls(ModelSpec.from_dict(mid, cfg) for mid, cfg in config.items())

    def register(self, spec: ModelSpec) -> None:
        if spec.model_id in self._specs:
            raise ValueError(f"model id {spec.model_id!r} registered twice")
        self._specs[spec.model_id] = spec

    def replace(self, spec: ModelSpec) -> None:
        """Register `spec` in place of the one of its id (a model re-added to the store)."""
        self._specs[spec.model_id] = spec

    def unregister(self, model_id: str) -> None:
        """Forget a model removed from the store (unknown to every later job)."""
        self._specs.pop(model_id, None)

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise UnknownModelError(model_id, self._specs) from None

    def ids(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def __len__(self) -> int:
        return len(self._specs)


def tiny_model_spec(cache_dir: Path) -> ModelSpec:
    """Spec of the tiny model, building its folder first if needed."""
    return ModelSpec(
        model_id=TINY_MODEL_ID,
        path=ensure_tiny_model(cache_dir),
        model_class="sd15",
        default_steps=TINY_DEFAULT_STEPS,
        default_guidance=TINY_DEFAULT_GUIDANCE,
        width=TINY_IMAGE_SIZE,
        height=TINY_IMAGE_SIZE,
    )


def shapes_model_spec() -> ModelSpec:
    """Spec of the shipped shapes model (read in place from the package)."""
    return ModelSpec(
        model_id=SHAPES_MODEL_ID,
        path=SHAPES_DIR,
        model_class="sd15",
        default_steps=SHAPES_DEFAULT_STEPS,
        default_guidance=SHAPES_DEFAULT_GUIDANCE,
        width=SHAPES_IMAGE_SIZE,
        height=SHAPES_IMAGE_SIZE,
        default_scheduler=SHAPES_DEFAULT_SCHEDULER,
    )
