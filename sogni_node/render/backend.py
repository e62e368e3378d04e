"""The render backend interface shared by every implementation (one file per backend).

Why: the node's job loop must not care whether pixels come from diffusers on CUDA/CPU or from
Core ML. `Backend.render` is synchronous and blocking; callers run it off the trio thread with
`trio.to_thread.run_sync` (or in a subprocess), and steer it through two callbacks.

Privacy: prompts are user data. They are excluded from reprs and must never appear in logs or
exception messages raised by a backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sogni_node.render.trajectory import Trajectory

UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class Lora:
    """One LoRA file and the strength to apply it with (1.0 = as trained, 0.0 = off)."""

    path: Path
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength):
            raise ValueError(f"LoRA strength must be finite, got {self.strength}")


@dataclass(frozen=True)
class RenderJob:
    """One text-to-image request, already resolved to concrete parameters."""

    model_id: str
    prompt: str = field(repr=False)
    negative_prompt: str = field(repr=False)
    steps: int
    guidance: float
    scheduler: str | None
    width: int
    height: int
    seed: int
    """uint32, so every backend (and every language a client uses) can reproduce it."""
    loras: tuple[Lora, ...] = ()
    """Merged into the weights in this order for this render only."""
    output_format: str = "png"

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= UINT32_MAX:
            raise ValueError(f"seed must be a uint32, got {self.seed}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.width < 8 or self.height < 8 or self.width % 8 or self.height % 8:
            raise ValueError(
                f"width and height must be positive multiples of 8, got {self.width}x{self.height}"
            )


@dataclass(frozen=True)
class RenderOutput:
    """A finished image plus what a receipt needs to say how it was made."""

    image: bytes = field(repr=False)
    """Encoded image (the job's format, no metadata); the result hash is sha256 of these
    bytes."""
    steps_done: int
    backend: str
    device: str
    dtype: str
    threads: int
    trajectory: Trajectory | None = field(default=None, repr=False, compare=False)
    """The committed denoising trajectory (root, digests, tensors to open any step; see
    docs/TRAJECTORY.md), from backends that record one (diffusers); None from the others."""
    pixels: bytes | None = field(default=None, repr=False, compare=False)
    """For a JPEG or WebP image from a backend that records a trajectory: the lossless pixels
    it was encoded from, as a PNG (kept to open for the image check, docs/IMAGE_CHECK.md);
    None for a PNG image (it is its pixels) and from the other backends."""


class RenderCancelled(Exception):
    """The caller asked to stop; `steps_done` denoising steps had completed."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"render cancelled after {steps_done} step(s)")
        self.steps_done = steps_done

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.steps_done,))


class RenderError(RuntimeError):
    """A backend failed. The message names the model and error type, never the prompt."""


@runtime_checkable
class Backend(Protocol):
    """What the node needs from a renderer."""

    name: str

    @property
    def supports_loras(self) -> bool:
        """Whether `RenderJob.loras` can be applied (the node advertises its LoRAs only then)."""
        ...

    def render(
        self,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
    ) -> RenderOutput:
        """Render `job`, blocking.

        `on_step(k)` is called after denoising step k (1-based). If `should_cancel()` turns
        true the backend stops at the next check and raises `RenderCancelled(steps_done)`.
        """
        ...

    def close(self) -> None:
        """Free models and device memory."""
        ...
