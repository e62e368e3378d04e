"""Decoding a committed final latent (`sogni_node.verify.decode_check`) gives back the very
image the backend delivered for that render: the same PNG bytes, on the shipped model and the
tiny test model; and for a JPEG or WebP job, the coordinator's re-encode of that PNG is the
delivered file byte for byte (one shared encoder). What the image check (docs/IMAGE_CHECK.md)
rests on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sogni_coordinator.image_verify import (
    PIXELS_RULE,
    check_distance,
    judge_image,
    reference_image,
)
from sogni_node.models import ModelRegistry
from sogni_node.models.registry import SHAPES_MODEL_ID, shapes_model_spec
from sogni_node.models.tiny import TINY_MODEL_ID
from sogni_node.render.backend import RenderJob, RenderOutput
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.verify.decode_check import decode_png, final_latent_shape
from sogni_protocol.image_encoding import encoder_build
from sogni_protocol.messages import PixelsOpening


@pytest.fixture(scope="module")
def shapes_backend() -> Iterator[DiffusersBackend]:
    backend = DiffusersBackend(ModelRegistry([shapes_model_spec()]), device="cpu", threads=1)
    yield backend
    backend.close()


def _job(
    model_id: str, scheduler: str, seed: int = 11, size: int = 64, output_format: str = "png"
) -> RenderJob:
    return RenderJob(
        model_id=model_id,
        prompt="a red circle on a blue background",
        negative_prompt="",
        steps=6,
        guidance=5.0,
        scheduler=scheduler,
        width=size,
        height=size,
        seed=seed,
        output_format=output_format,
    )


def _render(backend: DiffusersBackend, job: RenderJob) -> RenderOutput:
    out = backend.render(job, on_step=lambda _: None, should_cancel=lambda: False)
    assert out.trajectory is not None
    return out


def _leaf(out: RenderOutput, step: int) -> torch.Tensor:
    assert out.trajectory is not None
    array = out.trajectory.open(step).record.tensors["latents"]
    return torch.from_numpy(array.copy())


def _decode(backend: DiffusersBackend, model_id: str, x: torch.Tensor, size: int = 64) -> bytes:
    pipe = backend._get(model_id).pipe
    return decode_png(pipe, x, width=size, height=size, dtype=backend.dtype)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_the_final_leaf_decodes_to_the_delivered_png_on_the_shipped_model(
    shapes_backend: DiffusersBackend, scheduler: str
) -> None:
    out = _render(shapes_backend, _job(SHAPES_MODEL_ID, scheduler))
    n = out.steps_done
    assert _decode(shapes_backend, SHAPES_MODEL_ID, _leaf(out, n)) == out.image
    # the step before is another image: the check sees a truncated schedule
    assert _decode(shapes_backend, SHAPES_MODEL_ID, _leaf(out, n - 1)) != out.image


def test_a_float16_final_leaf_decodes_to_the_delivered_png() -> None:
    """StableDiffusionPipeline decodes a float16 VAE in float16 even when its config asks
    for `force_upcast` (the shipped VAE's does): the check must decode as the pipeline did,
    or a float16 worker's image is never byte-identical to the verifier's."""
    registry = ModelRegistry([shapes_model_spec()])
    backend = DiffusersBackend(registry, device="cpu", threads=1, dtype="float16")
    try:
        pipe = backend._get(SHAPES_MODEL_ID).pipe
        assert pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        out = _render(backend, _job(SHAPES_MODEL_ID, "euler"))
        assert _decode(backend, SHAPES_MODEL_ID, _leaf(out, out.steps_done)) == out.image
    finally:
        backend.close()


def test_the_final_leaf_decodes_to_the_delivered_png_on_the_tiny_model(
    backend: DiffusersBackend,
) -> None:
    out = _render(backend, _job(TINY_MODEL_ID, "euler_a", size=64))
    assert _decode(backend, TINY_MODEL_ID, _leaf(out, out.steps_done)) == out.image
    assert out.pixels is None  # a PNG job's image is its pixels: none kept beside it


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_lossy_jobs_delivered_file_is_the_coordinators_re_encode_of_the_decode(
    shapes_backend: DiffusersBackend, fmt: str
) -> None:
    out = _render(shapes_backend, _job(SHAPES_MODEL_ID, "euler", seed=12, output_format=fmt))
    decoded = _decode(shapes_backend, SHAPES_MODEL_ID, _leaf(out, out.steps_done))
    assert decoded.startswith(b"\x89PNG")  # the verifier answers a PNG whatever the format
    assert reference_image(decoded, fmt, 64, 64) == out.image
    # the pixels the node keeps to open (the pixels rule): the decode itself, and the
    # delivered file is their encode; the rule passes at distance 0
    assert out.pixels == decoded
    pixels = PixelsOpening(png=out.pixels, encoder=encoder_build())
    judged = judge_image(out.image, decoded, fmt, 64, 64, "float32", pixels)
    assert judged is not None and judged.passed and judged.rule == PIXELS_RULE
    assert judged.distance == 0.0
    # the truncated schedule's decode, re-encoded alike, is far from the delivered file
    truncated = _decode(shapes_backend, SHAPES_MODEL_ID, _leaf(out, out.steps_done - 1))
    assert check_distance(out.image, truncated, fmt, 64, 64).block > 1


def test_a_leaf_that_is_no_final_latent_of_the_job_is_a_value_error(
    shapes_backend: DiffusersBackend,
) -> None:
    pipe = shapes_backend._get(SHAPES_MODEL_ID).pipe
    shape = final_latent_shape(pipe, width=64, height=64)
    assert shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="shape"):  # another job size
        decode_png(pipe, torch.zeros(1, 4, 8, 8), width=64, height=64)
    with pytest.raises(ValueError, match="shape"):
        decode_png(pipe, torch.zeros(4 * 16 * 16), width=64, height=64)
    nan = torch.zeros(shape)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        decode_png(pipe, nan, width=64, height=64)
