"""The shipped default model follows prompts, fast and reproducibly, through the real backend.

Why: `sogni-shapes-64` exists so a fresh node renders what was asked for: the shape's colour,
the background colour and (issue #17) the shape itself must match the prompt. Colours are
judged against the training palette; shapes by `shape_judge`, which reads the foreground
mask's geometry and shares nothing with the training code's drawing.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from sogni_node.models import ModelRegistry
from sogni_node.models.registry import DEFAULT_MODEL_ID, SHAPES_MODEL_ID, shapes_model_spec
from sogni_node.models.shape_judge import Verdict, judge
from sogni_node.models.train_shapes import classify_image, random_scene
from sogni_node.render import default_device
from sogni_node.render.backend import RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend

N_PROMPTS = 50
# Measured over 17 emulated x86-64 CPU code paths (`python -m bench cpuvar`, BENCHMARKS.md "CPU
# variation", rerun on the session-19 weights, 15 paths on an AMD EPYC without AVX-VNNI): 50/50
# shape and background colours right in every one; renders differ between paths by at most 1
# (8-bit) and none of the 50 has a colour within 5 RGB units of a palette boundary. 0.9 (45/50)
# keeps 5 misses of margin below the worst path.
MIN_ADHERENCE = 0.9


@pytest.fixture(scope="module")
def shapes_backend() -> Iterator[DiffusersBackend]:
    backend = DiffusersBackend(ModelRegistry([shapes_model_spec()]), device="cpu", threads=1)
    yield backend
    backend.close()


def _job(prompt: str, seed: int) -> RenderJob:
    spec = shapes_model_spec()
    return RenderJob(
        model_id=SHAPES_MODEL_ID,
        prompt=prompt,
        negative_prompt="",
        steps=spec.default_steps,
        guidance=spec.default_guidance,
        scheduler=spec.default_scheduler,
        width=spec.width,
        height=spec.height,
        seed=seed,
    )


def _render(backend: DiffusersBackend, job: RenderJob) -> bytes:
    return backend.render(job, on_step=lambda _: None, should_cancel=lambda: False).image


def test_shapes_is_the_default(registry: ModelRegistry) -> None:
    assert DEFAULT_MODEL_ID == SHAPES_MODEL_ID
    spec = registry.get(SHAPES_MODEL_ID)
    assert (spec.width, spec.height) == (64, 64)
    assert (spec.path / "model_index.json").is_file()


def _check_adherence(backend: DiffusersBackend) -> None:
    rng = random.Random(20250101)
    shape_ok = bg_ok = 0
    misses: list[str] = []
    for _ in range(N_PROMPTS):
        scene = random_scene(rng, jitter=False)
        png = _render(backend, _job(scene.caption, rng.randrange(2**32)))
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert image.shape == (64, 64, 3)
        shape_c, bg_c = classify_image(image)
        shape_ok += shape_c == scene.colour
        bg_ok += bg_c == scene.background
        if (shape_c, bg_c) != (scene.colour, scene.background):
            misses.append(f"{scene.colour}/{scene.background} -> {shape_c}/{bg_c}")
    assert shape_ok / N_PROMPTS >= MIN_ADHERENCE, misses
    assert bg_ok / N_PROMPTS >= MIN_ADHERENCE, misses


def test_colours_follow_the_prompt(shapes_backend: DiffusersBackend) -> None:
    _check_adherence(shapes_backend)


@pytest.mark.skipif(default_device() == "cpu", reason="no CUDA or MPS GPU here")
def test_colours_follow_the_prompt_on_this_machines_gpu() -> None:
    """A GPU node (float16 on CUDA, its own noise generator) must follow prompts as well."""
    device = default_device()
    backend = DiffusersBackend(ModelRegistry([shapes_model_spec()]), device=device)
    try:
        _check_adherence(backend)
    finally:
        backend.close()


N_SHAPE_PROMPTS = 48
MIN_SHAPE_ADHERENCE = 0.8
"""Shape bar on a fixed sample of the 168 colour-pair x shape prompts, issue #17's 80%. Here:
47/48 (circles and triangles 16/16, squares 15/16); all 168: 94.0% (BENCHMARKS.md, "Prompt
adherence"); the session-19 weights scored 38/48 (83.9% of 168), those before issue #17 35%,
chance is 33%. 39/48 leaves 8 misses of margin for other CPU kinds."""
MIN_COLOUR_ADHERENCE = 0.9


def test_shapes_follow_the_prompt(shapes_backend: DiffusersBackend) -> None:
    rng = random.Random(17)
    shape_ok = colour_ok = 0
    misses: list[str] = []
    for i in range(N_SHAPE_PROMPTS):
        colour, background = rng.sample(_PALETTE_WORDS, 2)
        shape = ("circle", "square", "triangle")[i % 3]
        prompt = f"{_a(colour)} {colour} {shape} on {_a(background)} {background} background"
        png = _render(shapes_backend, _job(prompt, 700_000 + i))
        v = judge(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        shape_ok += v.shape == shape
        colour_ok += (v.colour, v.background) == (colour, background)
        if (v.shape, v.colour, v.background) != (shape, colour, background):
            misses.append(f"{prompt!r} -> {v.colour} {v.shape} on {v.background}")
    assert shape_ok >= MIN_SHAPE_ADHERENCE * N_SHAPE_PROMPTS, misses
    assert colour_ok >= MIN_COLOUR_ADHERENCE * N_SHAPE_PROMPTS, misses


def test_position_and_size_words_move_and_scale_the_shape(shapes_backend: DiffusersBackend) -> None:
    """Position words put the shape's centroid in that third, size words scale its box.

    BENCHMARKS.md: 99% position, 99% size on 120 and 72 prompts. 20 prompts here, 16 must pass.
    """
    places = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
    rng = random.Random(23)
    ok = 0
    misses: list[str] = []
    for i in range(20):
        colour, background = rng.sample(_PALETTE_WORDS, 2)
        shape = ("circle", "square", "triangle")[i % 3]
        bg = f"on {_a(background)} {background} background"
        word = places[i % 5] if i < 10 else ("small", "large")[i % 2]
        if i < 10:
            prompt = f"{_a(colour)} {colour} {shape} {word} {bg}"
        else:
            prompt = f"a {word} {colour} {shape} {bg}"
        png = _render(shapes_backend, _job(prompt, 710_000 + i))
        v = judge(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        good = _placed(word, v) and (v.colour, v.background) == (colour, background)
        ok += good
        if not good:
            misses.append(f"{prompt!r} -> {v}")
    assert ok >= 16, misses


def _placed(word: str, v: Verdict) -> bool:
    if word in ("small", "large"):
        return v.size_word == word
    third = word.split()[-1]
    if third in ("left", "right"):
        return v.horizontal == third
    if third in ("top", "bottom"):
        return v.vertical == third
    return (v.horizontal, v.vertical) == ("centre", "centre")


_PALETTE_WORDS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def test_same_job_same_bytes(shapes_backend: DiffusersBackend) -> None:
    # Bytes are compared within one process only: across CPU code paths they differ (by 1).
    job = _job("a red circle on a blue background", 42)
    first = _render(shapes_backend, job)
    assert _render(shapes_backend, job) == first
    fresh = DiffusersBackend(ModelRegistry([shapes_model_spec()]), device="cpu", threads=1)
    try:
        assert _render(fresh, job) == first  # a fresh load gives the same bytes too
    finally:
        fresh.close()
    assert _render(shapes_backend, _job(job.prompt, 43)) != first


def test_renders_fast(shapes_backend: DiffusersBackend) -> None:
    job = _job("a yellow triangle on a purple background", 7)
    _render(shapes_backend, job)  # warm up
    started = time.perf_counter()
    _render(shapes_backend, job)
    # The target is < 1 s on one idle core; allow slack for busy CI machines.
    assert time.perf_counter() - started < 3.0
