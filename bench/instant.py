"""`InstantBackend`: a `Backend` that answers every job at once with a ready PNG.

It makes the render cost zero, so a benchmark measures only what the node daemon, the wire
and the coordinator add per job. The image is a fixed 64x64 noise PNG (incompressible, like
the tiny model's output, about 12 KB), encoded once by the same deterministic encoder the
real backends use.

Seeds at or above `DISTINCT_SEEDS` get a PNG of their own instead (noise drawn from the seed,
encoded per job, ~0.5 ms of the node's CPU), as a real model's output differs per seed: the
coordinator's image check then cannot answer from memory, so a benchmark round with such
seeds measures what the check costs on every image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sogni_node.render.backend import Backend, RenderCancelled, RenderJob, RenderOutput
from sogni_node.render.encoding import encode_png

DISTINCT_SEEDS = 1 << 31
"""Jobs whose seed is at least this get a distinct image (see the module's docstring)."""


def noise_png(side: int = 64, seed: int = 0, height: int | None = None) -> bytes:
    shape = (height or side, side, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return encode_png(pixels)


class InstantBackend:
    """Reports every step, then returns the same PNG; honours cancellation like a real one."""

    name = "instant"
    supports_loras = False

    def __init__(self, image: bytes | None = None) -> None:
        self.image = image if image is not None else noise_png()
        self.renders = 0

    def render(
        self,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
    ) -> RenderOutput:
        for step in range(1, job.steps + 1):
            if should_cancel():
                raise RenderCancelled(step - 1)
            on_step(step)
        self.renders += 1
        distinct = job.seed >= DISTINCT_SEEDS
        return RenderOutput(
            image=noise_png(job.width, job.seed, job.height) if distinct else self.image,
            steps_done=job.steps,
            backend=self.name,
            device="cpu",
            dtype="none",
            threads=1,
        )

    def close(self) -> None:
        pass


def _check_protocol() -> Backend:
    return InstantBackend()  # mypy: InstantBackend satisfies the Backend protocol
