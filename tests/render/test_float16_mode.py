"""CPU float16 renders declare a path-bound mode, `float16@<compute_path>`, and re-run exactly
on the same path (issue #12 item 6; BENCHMARKS.md "Trajectory commitments": bit-exact across
threads and batches on one path, up to 7e-3 from other CPU paths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sogni_coordinator.verifiers import path_bound, tolerance_for
from sogni_node.hardware import compute_path
from sogni_node.models import TINY_MODEL_ID, ModelRegistry
from sogni_node.render import RenderJob
from sogni_node.render.diffusers_backend import SCHEDULERS, DiffusersBackend
from tests.render._steps import rerun_distances

STEPS, SIZE, SEED, GUIDANCE = 4, 64, 99, 5.0
PROMPT, NEGATIVE = "a green square", "red"
MEASURED = "float16@cpu-x86_64-avx512-avx512_core_bf16-torch2.13"


@pytest.fixture(scope="module")
def fp16_backend(registry: ModelRegistry) -> Iterator[DiffusersBackend]:
    b = DiffusersBackend(registry, device="cpu", dtype="float16", threads=1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def fp16_pipe(tiny_path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        str(tiny_path), dtype=torch.float16, local_files_only=True
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_a_cpu_float16_node_declares_its_code_path(fp16_backend: DiffusersBackend) -> None:
    declared = fp16_backend.dtype_name
    assert declared == f"float16@{compute_path('cpu')}"
    assert path_bound(declared)  # only a verifier declaring the very same string re-runs it
    # measured on one path only: there it has float32's floor; on any other it fails closed
    assert tolerance_for(declared) == (5e-5 if declared == MEASURED else None)
    for unmeasured in ("float16", "float16@cuda-sm90-torch2.13", MEASURED.replace("13", "14")):
        assert tolerance_for(unmeasured) is None


def test_float16_steps_rerun_exactly_on_the_same_path(
    fp16_backend: DiffusersBackend, fp16_pipe: Any
) -> None:
    """The backend's float16 trajectory, re-run by a float16 verifier (another thread count):
    every step reproduces bit for bit (distance 0), the receipt names the mode."""
    job = RenderJob(
        model_id=TINY_MODEL_ID,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance=GUIDANCE,
        scheduler="euler_a",
        width=SIZE,
        height=SIZE,
        seed=SEED,
    )
    out = fp16_backend.render(job, lambda _s: None, lambda: False)
    assert out.dtype == fp16_backend.dtype_name
    assert out.trajectory is not None
    cls, overrides = SCHEDULERS["euler_a"]
    sched = cls.from_config(fp16_pipe.scheduler.config, **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert rerun_distances(fp16_pipe, job, out.trajectory, sched) == [0.0] * STEPS
    finally:
        torch.set_num_threads(threads)
