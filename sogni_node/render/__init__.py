"""Image rendering: the `Backend` interface and a factory for the implementations.

Backends are imported lazily: diffusers alone takes seconds to import.
"""

from __future__ import annotations

from typing import Any

from sogni_node.models.registry import ModelRegistry
from sogni_node.render.backend import (
    Backend,
    RenderCancelled,
    RenderError,
    RenderJob,
    RenderOutput,
)

BACKEND_KINDS = ("diffusers", "coreml")

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "RenderCancelled",
    "RenderError",
    "RenderJob",
    "RenderOutput",
    "create_backend",
    "default_device",
]


def default_device() -> str:
    """The best local torch device: CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def create_backend(kind: str, registry: ModelRegistry, **opts: Any) -> Backend:
    """Build a backend by name; `opts` go to its constructor (device, dtype, threads)."""
    if kind == "diffusers":
        from sogni_node.render.diffusers_backend import DiffusersBackend

        if opts.get("device") is None:
            opts["device"] = default_device()
        return DiffusersBackend(registry, **opts)
    if kind == "coreml":
        from sogni_node.render.coreml_backend import CoreMLBackend

        return CoreMLBackend(registry, **opts)  # opts: cache_dir, nbits, compute_units
    raise ValueError(f"unknown backend kind {kind!r}; known: {', '.join(BACKEND_KINDS)}")
