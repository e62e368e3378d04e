"""DiffusersBackend on CPU with the tiny model: PNG output, determinism, progress, cancel;
and a render on this machine's GPU where it has one."""

from __future__ import annotations

import io
import logging
import pickle
import struct
import threading
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio
from PIL import Image

from sogni_coordinator.verifiers import tolerance_for
from sogni_node.hardware import compute_path
from sogni_node.models import TINY_MODEL_ID, ModelRegistry, UnknownModelError
from sogni_node.models.registry import SHAPES_MODEL_ID
from sogni_node.render import (
    Backend,
    RenderCancelled,
    RenderError,
    RenderJob,
    create_backend,
    default_device,
)
from sogni_node.render.diffusers_backend import SCHEDULERS, DiffusersBackend

SECRET = "zanzibarquokka"

JOB = RenderJob(
    model_id=TINY_MODEL_ID,
    prompt=f"a red circle on a blue background {SECRET}",
    negative_prompt="green",
    steps=4,
    guidance=5.0,
    scheduler=None,
    width=64,
    height=64,
    seed=1234,
)


def _never() -> bool:
    return False


def _ignore(_step: int) -> None:
    pass


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks


def test_render_gives_plain_png(backend: DiffusersBackend) -> None:
    out = backend.render(JOB, _ignore, _never)
    img = Image.open(io.BytesIO(out.image))
    img.load()
    assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
    assert _png_chunks(out.image) == [b"IHDR", b"IDAT", b"IEND"]  # no text/metadata chunks
    assert img.getextrema() != ((0, 0), (0, 0), (0, 0))  # not a blank (NaN) image
    assert out.steps_done == JOB.steps
    # the session backend is pinned to the CPU (conftest), whatever GPU this machine has
    assert (out.backend, out.device, out.dtype) == ("diffusers", "cpu", "float32")
    assert out.threads == backend.threads


@pytest.mark.skipif(default_device() == "cpu", reason="no CUDA or MPS GPU here")
def test_render_on_this_machines_gpu(registry: ModelRegistry) -> None:
    """The same job on the GPU: a real PNG (float16 on CUDA must not overflow to NaN/black),
    with the device and dtype it really ran on in the render metadata."""
    device = default_device()
    gpu = DiffusersBackend(registry, device=device, threads=1)
    try:
        job = registry.get(SHAPES_MODEL_ID).default_job("a red circle on a blue background", 7)
        out = gpu.render(job, _ignore, _never)
        img = Image.open(io.BytesIO(out.image))
        img.load()
        assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
        assert img.getextrema() != ((0, 0), (0, 0), (0, 0))
        assert out.steps_done == job.steps
        expected_dtype = "float16" if device == "cuda" else "float32"
        assert (out.backend, out.device, out.dtype) == ("diffusers", device, expected_dtype)
        assert gpu.render(replace(JOB, steps=2), _ignore, _never).steps_done == 2  # tiny too
    finally:
        gpu.close()


def test_same_job_same_bytes_across_threads(backend: DiffusersBackend) -> None:
    first = backend.render(JOB, _ignore, _never).image
    assert backend.render(JOB, _ignore, _never).image == first
    results: list[bytes] = []
    worker = threading.Thread(
        target=lambda: results.append(backend.render(JOB, _ignore, _never).image)
    )
    worker.start()
    worker.join()
    assert results == [first]


def test_seed_and_prompt_change_the_image(backend: DiffusersBackend) -> None:
    base = backend.render(JOB, _ignore, _never).image
    assert backend.render(replace(JOB, seed=1235), _ignore, _never).image != base
    assert backend.render(replace(JOB, prompt="a blue square"), _ignore, _never).image != base


def test_other_size(backend: DiffusersBackend) -> None:
    out = backend.render(replace(JOB, width=96, height=48, steps=2), _ignore, _never)
    assert Image.open(io.BytesIO(out.image)).size == (96, 48)


def test_on_step_once_per_step(backend: DiffusersBackend) -> None:
    seen: list[int] = []
    out = backend.render(replace(JOB, steps=5), seen.append, _never)
    assert seen == [1, 2, 3, 4, 5]
    assert out.steps_done == 5


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs_all_steps(backend: DiffusersBackend, scheduler: str) -> None:
    seen: list[int] = []
    out = backend.render(replace(JOB, scheduler=scheduler, steps=3), seen.append, _never)
    assert seen == [1, 2, 3] and out.steps_done == 3


def test_scheduler_choice_does_not_leak(backend: DiffusersBackend) -> None:
    default = backend.render(JOB, _ignore, _never).image
    assert backend.render(replace(JOB, scheduler="ddim"), _ignore, _never).image != default
    assert backend.render(JOB, _ignore, _never).image == default


def test_cancel_after_step_two(backend: DiffusersBackend) -> None:
    seen: list[int] = []
    with pytest.raises(RenderCancelled) as info:
        backend.render(replace(JOB, steps=6), seen.append, lambda: len(seen) >= 2)
    assert info.value.steps_done == 2
    assert seen == [1, 2]
    assert pickle.loads(pickle.dumps(info.value)).steps_done == 2
    # The pipeline (and its lock) is fine afterwards.
    assert backend.render(JOB, _ignore, _never).steps_done == JOB.steps


def test_cancel_before_start(backend: DiffusersBackend) -> None:
    seen: list[int] = []
    with pytest.raises(RenderCancelled) as info:
        backend.render(JOB, seen.append, lambda: True)
    assert info.value.steps_done == 0 and seen == []


def test_caller_errors_propagate_unchanged(backend: DiffusersBackend) -> None:
    class Boom(Exception):
        pass

    def on_step(_k: int) -> None:
        raise Boom

    with pytest.raises(Boom):
        backend.render(JOB, on_step, _never)


def test_unknown_model(backend: DiffusersBackend) -> None:
    with pytest.raises(UnknownModelError, match="nope"):
        backend.render(replace(JOB, model_id="nope"), _ignore, _never)


def test_unknown_scheduler(backend: DiffusersBackend) -> None:
    with pytest.raises(ValueError, match="heun_turbo"):
        backend.render(replace(JOB, scheduler="heun_turbo"), _ignore, _never)


def test_job_validation() -> None:
    for bad in ({"seed": -1}, {"seed": 2**32}, {"steps": 0}, {"width": 60}, {"height": 0}):
        with pytest.raises(ValueError):
            replace(JOB, **bad)  # type: ignore[arg-type]
    replace(JOB, seed=2**32 - 1)


def test_prompt_not_in_repr() -> None:
    assert SECRET not in repr(JOB) and "green" not in repr(JOB)


def test_truncated_prompt_is_not_logged(backend: DiffusersBackend) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.DEBUG)
    watched = [logging.getLogger("diffusers"), logging.getLogger()]
    for lg in watched:
        lg.addHandler(handler)
    try:
        long_prompt = " ".join(["red circle"] * 60 + [SECRET] * 10)  # > 77 tokens
        backend.render(replace(JOB, prompt=long_prompt, steps=1), _ignore, _never)
    finally:
        for lg in watched:
            lg.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("withheld" in m for m in messages)  # the warning fired, redacted
    assert not any(SECRET in m for m in messages)


def test_pipeline_errors_hide_the_prompt(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = backend._get(TINY_MODEL_ID).pipe

    def leaky(prompt: str, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot encode {prompt!r}")

    monkeypatch.setattr(pipe, "encode_prompt", leaky)
    with pytest.raises(RenderError) as info:
        backend.render(JOB, _ignore, _never)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None  # the leaky original is not chained
    monkeypatch.undo()
    assert backend.render(JOB, _ignore, _never).steps_done == JOB.steps


async def test_render_from_trio_thread(backend: DiffusersBackend) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def on_step(k: int) -> None:
        seen.append(k)
        if k == 3:
            cancel.set()

    with pytest.raises(RenderCancelled) as info:
        await trio.to_thread.run_sync(backend.render, replace(JOB, steps=8), on_step, cancel.is_set)
    assert info.value.steps_done == 3
    out = await trio.to_thread.run_sync(backend.render, JOB, _ignore, _never)
    assert out.steps_done == JOB.steps


def test_factory(registry: ModelRegistry) -> None:
    b = create_backend("diffusers", registry, threads=1)
    assert isinstance(b, Backend) and isinstance(b, DiffusersBackend)
    assert b.device == default_device()
    assert b.threads == 1
    b.close()
    with pytest.raises(ValueError, match="unknown backend kind 'nope'"):
        create_backend("nope", registry)


def test_bad_options(registry: ModelRegistry) -> None:
    with pytest.raises(ValueError, match="dtype"):
        DiffusersBackend(registry, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        DiffusersBackend(registry, device="xpu")
    bf16 = DiffusersBackend(registry, dtype="bf16").dtype_name
    assert bf16 == f"bfloat16@{compute_path('cpu')}"  # checked on the same code path only
    assert DiffusersBackend(registry).dtype_name == "float32"  # CPU float32: step-checked
    # float32 on a GPU names its path (TF32 convolutions): never held to CPU float32's
    # step tolerance, its receipts get the whole re-render (no GPU here: the property alone)
    gpu = SimpleNamespace(dtype=torch.float32, quantize="none", compile=False, device="cuda")
    cuda = DiffusersBackend.dtype_name.fget(gpu)  # type: ignore[attr-defined]
    assert cuda == f"float32@{compute_path('cuda')}" and tolerance_for(cuda) is None
