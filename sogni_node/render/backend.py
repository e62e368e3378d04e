"""The render backend interface shared by every implementation (one file per backend).

Why: the node's job loop must not care whether pixels come from diffusers on CUDA/CPU or from
Core ML. `Backend.render` is synchronous and blocking; callers run it off the trio thread with
`trio.to_thread.run_sync` (or in a subprocess), and steer it through two callbacks.

Privacy: prompts are user data. They are excluded from reprs and must never appear in logs or
exception messages raised by a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

UINT32_MAX = 2**32 - 1


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
    """PNG bytes, no text chunks; the result hash is sha256 of exactly these bytes."""
    steps_done: int
    backend: str
    device: str
    dtype: str
    threads: int


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
