"""Pinned randomness: every random number of a render comes from the job's seed, on the CPU.

Why: a verifier must be able to regenerate a job's initial noise from the seed alone, and to
re-run any one denoising step of a stochastic scheduler with the very noise the worker used,
on whatever device it has. torch's CUDA and CPU generators give different numbers for one
seed, and one generator shared across steps makes step k's noise depend on every draw before
it. So:

- the initial latent is ``torch.randn(shape, float32)`` from ``torch.Generator("cpu")`` seeded
  with the job's seed, then cast to the compute dtype and moved to the device
  (`initial_latents`). On the CPU in float32 this is exactly what diffusers drew before, so
  deterministic schedulers render the same bytes as they did;
- the k-th call of a scheduler's ``step`` (k = 1..N, the step that produces leaf k of the
  trajectory) gets a fresh ``torch.Generator("cpu")`` seeded with ``step_seed(seed, k)``
  (`pin_step_noise`). The scheduler draws its noise from it as diffusers does (``randn_tensor``
  on the CPU in the model output's dtype, then moved); deterministic schedulers ignore it.

This module needs torch but no pipeline, so a verifier can import it on its own.
"""

from __future__ import annotations

import functools
import inspect
import struct
from collections.abc import Sequence
from typing import Any

import torch
from eth_hash.auto import keccak

__all__ = [
    "STEP_SEED_DOMAIN",
    "initial_latents",
    "pin_step_noise",
    "step_generator",
    "step_seed",
    "takes_generator",
]

STEP_SEED_DOMAIN = b"sogni-step-noise-v1"


def initial_latents(
    seed: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The job's initial noise: float32 normal draws from a CPU generator seeded with `seed`,
    then cast to `dtype` and moved to `device` (unscaled: the pipeline multiplies it by the
    scheduler's ``init_noise_sigma``)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def step_seed(seed: int, step: int) -> int:
    """The generator seed for denoising step `step` (1-based) of a job seeded with `seed`:
    the top 63 bits of ``keccak256(STEP_SEED_DOMAIN | u32 seed | u32 step)`` (big-endian).

    Hashing (rather than e.g. ``seed + step``) keeps jobs with nearby seeds from sharing noise.
    """
    if not 0 <= seed < 2**32 or not 0 <= step < 2**32:
        raise ValueError(f"seed and step must be uint32, got {seed}, {step}")
    digest = keccak(STEP_SEED_DOMAIN + struct.pack(">II", seed, step))
    return int.from_bytes(digest[:8], "big") >> 1


def step_generator(seed: int, step: int) -> torch.Generator:
    """A fresh CPU generator for denoising step `step` (1-based)."""
    return torch.Generator("cpu").manual_seed(step_seed(seed, step))


def takes_generator(scheduler: Any) -> bool:
    """Whether `scheduler.step` accepts a ``generator`` (diffusers passes one only then)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def pin_step_noise(scheduler: Any, seed: int) -> None:
    """Make the k-th ``scheduler.step`` call use `step_generator(seed, k)`, for this scheduler
    instance only (use a fresh scheduler per job).

    The wrapper keeps the original signature (``inspect.signature`` follows ``__wrapped__``),
    so a pipeline still sees which keyword arguments ``step`` takes. Whatever generator the
    pipeline passes is replaced; a scheduler whose ``step`` takes no generator is unchanged.
    """
    if not takes_generator(scheduler):
        return
    original = scheduler.step
    signature = inspect.signature(original)
    calls = 0

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        bound = signature.bind(*args, **kwargs)
        bound.arguments["generator"] = step_generator(seed, calls)
        return original(*bound.args, **bound.kwargs)

    scheduler.step = step
