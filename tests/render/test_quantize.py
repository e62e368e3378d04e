"""Quantized denoisers render close to full precision, and bad modes fail clearly.

Why: a quantized node signs receipts for images it claims are the model's; if quantization
drifted far from fp32 (or silently did nothing) nobody would notice from the outside. The
shipped model `sogni-shapes-64` is rendered for the same seeded prompts in fp32 and in each
mode that runs on CPU, and each quantized image must stay above a PSNR floor against fp32
and keep fp32's colours.

The bounds hold on any x86-64 CPU: they come from `python -m bench cpuvar` (BENCHMARKS.md,
"CPU variation"), which renders these prompts under 17 emulated CPU code paths (torch's
ATEN_CPU_CAPABILITY, oneDNN's ISA, MKL's, the quantized engine), not from one machine's output.
"""

from __future__ import annotations

import importlib.util
import io
import random
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from bench.cpu_variation import colour_shift, int8_matmul_is_exact, to_u8
from sogni_node.models import ModelRegistry
from sogni_node.models.registry import SHAPES_DIR, SHAPES_MODEL_ID, shapes_model_spec
from sogni_node.models.train_shapes import random_scene
from sogni_node.render.backend import RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.render.quantize import (
    FP8_MIN_CAPABILITY,
    QUANT_EXTRA,
    QUANT_MODES,
    _quantize_module,
    build_cpu_kernels,
    check_quant_mode,
    compile_pipeline,
    denoiser,
    is_target,
    parse_weights,
    quantize_pipeline,
    quantized_layers,
    storage_bytes,
    weights_as,
)

N_PROMPTS = 6

# PSNR floors (dB, images in [0, 1]) against the fp32 render of the same machine: minimum
# over the N_PROMPTS prompts below, worst of 17 emulated CPU configurations, 1 thread, torch
# 2.13, torchao 0.18.0, optimum-quanto 0.2.7. int8 61.2, quanto-int8 57.1, quanto-int4 29.2:
# the same in every configuration (weight-only modes compute in fp32). int8-dynamic 46.9,
# spread 46.9-51.7 across configurations (an Intel Xeon measured 47.9): quantizing the
# activations per token amplifies fp32 rounding differences. Floors sit 5-11 dB below the
# worst; int8-dynamic's 6.9 dB, 1.4x its spread. (Those are for the weights before session
# 19; the retrained weights on this AMD path only, `bench cpuvar` not rerun: int8 58.0,
# int8-dynamic 50.9, quanto-int8 54.8, quanto-int4 39.2, all 4.8-15 dB above the floors.)
PSNR_FLOOR = {"int8": 50.0, "int8-dynamic": 40.0, "quanto-int8": 48.0, "quanto-int4": 24.0}
CPU_MODES = tuple(PSNR_FLOOR)

# Largest colour shift (RGB units, 0-255; `colour_shift`: the median colour of the background
# and of fp32's shape pixels) of a quantized render from fp32, same prompts and configurations.
# Shape: int8 1.0, quanto-int8 2.3, quanto-int4 52.8 (int4 weights move colours, though no
# verdict changes), all three the same in every configuration; int8-dynamic 5.9 (1.4-5.9
# across configurations). Background: int8 0.0, int8-dynamic and quanto-int8 1.0, quanto-int4
# 3.6. Bounds: worst + 4 RGB units, or + 3x the spread across configurations where larger
# (int8-dynamic's shape: 5.9 + 13.5); quanto-int4's shape 25% above its worst. All but int4's
# shape bound stay far below half the smallest palette gap (orange-yellow, 81), so no colour
# can drift into another name unseen. Retrained weights (session 19, this AMD path only):
# shape int8 1.0, int8-dynamic 1.0, quanto-int8 1.0, quanto-int4 8.5; background at most 3.2.
# The classifier's verdicts are not compared: one fp32 shape sits 1.3 RGB units from the
# yellow/white boundary, and int8-dynamic's shift of a few units flips it on some CPUs (the
# Xeon failure; emulated with ONEDNN_MAX_CPU_ISA=AVX2_VNNI).
MAX_SHAPE_SHIFT = {"int8": 5.0, "int8-dynamic": 20.0, "quanto-int8": 6.5, "quanto-int4": 66.0}
MAX_BACKGROUND_SHIFT = {"int8": 4.0, "int8-dynamic": 5.0, "quanto-int8": 5.0, "quanto-int4": 8.0}


def _available(mode: str) -> bool:
    module = "optimum.quanto" if mode.startswith("quanto") else "torchao"
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _load() -> Any:
    pipe = DiffusionPipeline.from_pretrained(str(SHAPES_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    spec = shapes_model_spec()
    result = pipe(
        prompt=prompt,
        num_inference_steps=spec.default_steps,
        guidance_scale=spec.default_guidance,
        width=spec.width,
        height=spec.height,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return np.asarray(result.images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(1.0 / mse))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts() -> list[tuple[str, int]]:
    rng = random.Random(5)
    return [
        (random_scene(rng, jitter=False).caption, rng.randrange(2**32)) for _ in range(N_PROMPTS)
    ]


@pytest.fixture(scope="module")
def reference(one_thread: None, prompts: list[tuple[str, int]]) -> list[np.ndarray]:
    pipe = _load()
    return [_render(pipe, prompt, seed) for prompt, seed in prompts]


@pytest.mark.parametrize("mode", CPU_MODES)
def test_quantized_render_is_close_to_fp32(
    mode: str,
    prompts: list[tuple[str, int]],
    reference: list[np.ndarray],
    request: pytest.FixtureRequest,
) -> None:
    if not _available(mode):
        pytest.skip(f"{mode} needs the quant extra: {QUANT_EXTRA}")
    if mode == "int8-dynamic" and not int8_matmul_is_exact():
        # A product bug, not rounding: on x86 CPUs without VNNI or AMX oneDNN's int8 matmul
        # saturates, and int8-dynamic renders land at 22.7 dB with shapes shifted by up to 102
        # (emulated with ONEDNN_MAX_CPU_ISA=AVX2 or AVX512_CORE). Still run, so a fix shows.
        request.applymarker(
            pytest.mark.xfail(reason="torch._int_mm is inexact on this CPU (no VNNI)")
        )
    pipe = _load()
    unet = denoiser(pipe)
    fp32_bytes = storage_bytes(unet)
    targets = sum(is_target(m) for m in unet.modules())
    quantize_pipeline(pipe, mode)

    # The weights really are quantized: every targeted layer, and they take less memory.
    assert targets > 0
    assert quantized_layers(denoiser(pipe)) == targets
    assert storage_bytes(denoiser(pipe)) < fp32_bytes

    images = [_render(pipe, prompt, seed) for prompt, seed in prompts]
    scores = [psnr(ref, img) for ref, img in zip(reference, images, strict=True)]
    print(f"{mode}: PSNR min {min(scores):.1f} mean {np.mean(scores):.1f} dB")
    assert min(scores) >= PSNR_FLOOR[mode], scores
    # ...and they change the output (a silent no-op would give identical floats).
    assert all(not np.array_equal(ref, img) for ref, img in zip(reference, images, strict=True))
    # The colours a requester asked for survive quantization: fp32's background and shape
    # colours move by no more than quantization moves them on any measured CPU path.
    pairs = zip(reference, images, strict=True)
    shifts = [colour_shift(to_u8(ref), to_u8(img)) for ref, img in pairs]
    bg_shift, shape_shift = max(s[0] for s in shifts), max(s[1] for s in shifts)
    print(f"{mode}: colour shift max background {bg_shift:.1f} shape {shape_shift:.1f}")
    assert bg_shift <= MAX_BACKGROUND_SHIFT[mode], shifts
    assert shape_shift <= MAX_SHAPE_SHIFT[mode], shifts


def _shapes_job(*, steps: int, seed: int) -> RenderJob:
    spec = shapes_model_spec()
    return RenderJob(
        model_id=SHAPES_MODEL_ID,
        prompt="a red circle on a blue background",
        negative_prompt="",
        steps=steps,
        guidance=spec.default_guidance,
        scheduler=None,
        width=spec.width,
        height=spec.height,
        seed=seed,
    )


def test_backend_renders_quantized() -> None:
    """The node's backend takes the mode, records it in receipts and refuses LoRAs."""
    if not _available("int8"):
        pytest.skip(f"int8 needs the quant extra: {QUANT_EXTRA}")
    registry = ModelRegistry([shapes_model_spec()])
    backend = DiffusersBackend(registry, device="cpu", threads=1, quantize="int8")
    try:
        job = _shapes_job(steps=2, seed=1)
        out = backend.render(job, on_step=lambda _: None, should_cancel=lambda: False)
        assert out.dtype == "float32+int8"
        assert out.image.startswith(b"\x89PNG")
        assert not backend.supports_loras
    finally:
        backend.close()


# --- another node's weights, for a whole re-render (docs/VERIFICATION.md) -----------------
@pytest.mark.parametrize("weights", ["bfloat16+quanto-int4", "float32+fp8", "float16+int8"])
def test_weights_as_holds_a_quantized_nodes_own_weights_and_puts_them_back(weights: str) -> None:
    """Inside `weights_as`, every target layer computes with exactly what a node loaded in
    that dtype and quantized by that mode computes with (fp8 weights are made on a CPU too);
    after it, the plain weights are back bit for bit."""
    dtype_name, _, mode = weights.partition("+")
    if not _available(mode):
        pytest.skip(f"{mode} needs the quant extra: {QUANT_EXTRA}")
    pipe = _load()
    before = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}
    node = _load().to(dtype=getattr(torch, dtype_name))
    _quantize_module(denoiser(node), mode)  # as quantize_pipeline, without its device check
    theirs = [_weight(m).dequantize().float() for m in denoiser(node).modules() if is_target(m)]
    with weights_as(pipe, weights) as changed:
        ours = [_weight(m) for m in denoiser(pipe).modules() if is_target(m)]
        assert changed == len(theirs) == len(ours) > 0
        assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
        assert any(not torch.equal(w, before[k]) for k, w in denoiser(pipe).state_dict().items())
    after = denoiser(pipe).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _weight(module: torch.nn.Module) -> Any:
    """A target layer's weight (a quantized tensor subclass, or a plain parameter)."""
    return module.weight


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ("quanto-int4", "not <dtype>+<mode>"),
        ("float64+fp8", "not <dtype>+<mode>"),
        ("float32+none", "not <dtype>+<mode>"),
        ("float32+int3", "not <dtype>+<mode>"),
    ],
)
def test_weights_that_name_no_mode_are_refused(weights: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_weights(weights)


def test_a_plain_backend_renders_with_a_4bit_nodes_weights() -> None:
    """A float32 verifier re-rendering with `weights` gives the 4-bit node's picture (within
    one level: the same weights, the same float32 compute, another matmul kernel), not its
    own; a quantized backend cannot round its weights again."""
    if not _available("quanto-int4"):
        pytest.skip(f"quanto-int4 needs the quant extra: {QUANT_EXTRA}")
    spec = shapes_model_spec()
    job = _shapes_job(steps=4, seed=3)
    images = {}
    cases = (("none", ""), ("none", "float32+quanto-int4"), ("quanto-int4", ""))
    for quantize, weights in cases:
        backend = DiffusersBackend(
            ModelRegistry([spec]), device="cpu", threads=1, quantize=quantize
        )
        try:
            out = backend.render(job, lambda _: None, lambda: False, weights=weights)
            images[quantize, weights] = _pixels(out.image)
            if quantize != "none":
                asked = cases[1][1]
                with pytest.raises(ValueError, match=re.escape(f"cannot use {asked}")):
                    backend.render(job, lambda _: None, lambda: False, weights=asked)
        finally:
            backend.close()
    plain, rounded, node = (images[k] for k in images)
    assert np.abs(rounded - node).max() <= 1
    assert np.abs(plain - node).max() > 1


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_none_is_a_no_op() -> None:
    pipe = _load()
    before = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}
    quantize_pipeline(pipe, "none")
    after = denoiser(pipe).state_dict()
    assert quantized_layers(denoiser(pipe)) == 0
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_mode_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'") as info:
        check_quant_mode("int3", "cpu")
    assert all(mode in str(info.value) for mode in QUANT_MODES)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_pipeline(_load(), "int3")


def test_fp8_needs_a_recent_cuda_gpu() -> None:
    with pytest.raises(ValueError, match=r"'fp8' needs a CUDA GPU with compute capability >= 8\.9"):
        check_quant_mode("fp8", "cpu")
    with pytest.raises(ValueError, match="'fp8'"):
        quantize_pipeline(_load(), "fp8")  # a CPU pipeline


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_fp8_on_this_machines_cuda_gpu() -> None:
    """What a CUDA node is told about fp8 follows its GPU's compute capability."""
    capability = torch.cuda.get_device_capability(0)
    if capability < FP8_MIN_CAPABILITY:
        with pytest.raises(ValueError, match=r"'fp8' needs CUDA compute capability >= 8\.9"):
            check_quant_mode("fp8", "cuda")
    elif _available("int8"):  # torchao, which fp8 uses too
        check_quant_mode("fp8", "cuda")
    else:
        with pytest.raises(ValueError, match="not installed"):
            check_quant_mode("fp8", "cuda")


@pytest.mark.parametrize(("mode", "package"), [("int8", "torchao"), ("quanto-int4", "optimum")])
def test_missing_package_names_the_extra(
    mode: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, package, None)
    if package == "optimum":
        monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ValueError, match="not installed") as info:
        check_quant_mode(mode, "cpu")
    assert QUANT_EXTRA in str(info.value)
    assert QUANT_EXTRA == "pip install 'sogni-supernet[quant]'"


def test_compile_wraps_the_denoiser_in_place() -> None:
    """Only the wiring: compiling and rendering the model on CPU takes 90 s cold (see
    docs/MODEL.md), too slow for the suite."""
    pipe = _load()
    unet = denoiser(pipe)
    compile_pipeline(pipe)
    assert denoiser(pipe) is unet  # same module, same class and config for the pipeline
    assert getattr(unet, "_compiled_call_impl", None) is not None
    with pytest.raises(ValueError, match=r"unknown torch\.compile mode"):
        compile_pipeline(_load(), "fastest")


def test_int8_dynamic_is_refused_where_int8_matmul_is_inexact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node on a CPU whose int8 matmul saturates must not serve int8-dynamic renders."""
    import sogni_node.render.quantize as quantize

    monkeypatch.setattr(quantize, "int8_matmul_is_exact", lambda: False)
    with pytest.raises(ValueError, match="wrong images on this CPU"):
        quantize.check_quant_mode("int8-dynamic", "cpu")
    if _available("int8"):
        quantize.check_quant_mode("int8", "cpu")  # the other modes stay available


@pytest.mark.skipif(not _available("quanto-int4"), reason="quant extra")
def test_quanto_cpu_kernels_are_built_ahead_of_a_render() -> None:
    """`make install` builds quanto's JIT kernels; a later call loads them, compiling nothing
    (a compile inside a render took minutes under load in fresh-clone CI)."""
    from optimum.quanto.library.extensions import get_extension

    assert build_cpu_kernels() is True
    ext = get_extension("quanto_cpp")
    assert ext._lib is not None
    packed = torch.tensor([[0x21, 0x43]], dtype=torch.uint8)
    assert ext.lib.unpack(packed, 4).tolist() == [[1, 3], [2, 4]]
