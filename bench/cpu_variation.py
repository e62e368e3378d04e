"""How much the tests' renders vary across x86-64 CPU code paths, emulated on one machine.

Why: the render tests run on whatever CPU CI has. torch picks its vector kernels
(`ATEN_CPU_CAPABILITY`), oneDNN its convolution/matmul ISA (`ONEDNN_MAX_CPU_ISA`) and MKL its
GEMM kernels (`MKL_ENABLE_INSTRUCTIONS`) from the CPU, so an Intel Xeon and an AMD EPYC round
differently; a test that checks one machine's exact output fails on the other. Each
configuration below forces those choices (and the quantized engine) in a fresh subprocess,
because the variables are read when torch loads, and renders what the tests render:

- `sogni-shapes-64`, the 6 prompts of tests/render/test_quantize.py, in fp32 and each CPU
  quantization mode (the pipeline called directly, 1 thread);
- the 50 prompts of tests/render/test_shapes_adherence.py through `DiffusersBackend(threads=1)`;
- the tiny model (built here, random weights): tests/render/test_diffusers_backend.py's job
  twice, and test_lora.py's two LoRAs merged in both orders;
- a tiny SDXL (tests/models/conftest.py) at 64x64, 2 steps.

Per configuration it reports PSNR and max abs pixel difference against the machine's own
configuration, the colour classifier's verdicts and adherence, and the figures the tests
assert on: the PSNR of each quantized render against fp32 *of the same configuration* and
the colour shift between them (`colour_shift`, also used by test_quantize.py).

Run: ``.venv/bin/python -m bench cpuvar`` (writes its section of BENCHMARKS.md) or
``.venv/bin/python -m bench.cpu_variation`` (prints only); about 10 minutes here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sogni_node.hardware import cpu_flags  # also read by bench.trajectory_tolerance

REPO = Path(__file__).resolve().parent.parent

QUANT_MODES = ("int8", "int8-dynamic", "quanto-int8", "quanto-int4")
"""The modes tests/render/test_quantize.py renders on CPU."""

QUANT_PROMPTS, QUANT_PROMPT_SEED = 6, 5  # test_quantize.py: N_PROMPTS, random.Random(5)
ADHERENCE_PROMPTS, ADHERENCE_SEED = 50, 20250101  # test_shapes_adherence.py


@dataclass(frozen=True)
class Config:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    engine: str | None = None  # torch.backends.quantized.engine; None: torch's default
    needs: str | None = None  # a /proc/cpuinfo flag the configuration needs

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if self.engine:
            parts.append(f"quantized.engine={self.engine}")
        return ", ".join(parts) or "(none: this CPU's defaults)"


CONFIGS: tuple[Config, ...] = (
    Config("native"),
    Config("aten-default", {"ATEN_CPU_CAPABILITY": "default"}),
    Config("aten-avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, needs="avx2"),
    Config("onednn-sse41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
    Config("onednn-avx", {"ONEDNN_MAX_CPU_ISA": "AVX"}),
    Config("onednn-avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, needs="avx2"),
    Config("onednn-avx2-vnni", {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, needs="avx_vnni"),
    Config("onednn-avx512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, needs="avx512f"),
    Config("onednn-avx512-vnni", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, needs="avx512_vnni"),
    Config("mkl-sse42", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    Config("mkl-avx2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, needs="avx2"),
    # An older Xeon without AVX-512 (Haswell..Comet Lake): every library on its AVX2 path.
    Config(
        "all-avx2",
        {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        },
        needs="avx2",
    ),
    # A client CPU with AVX-VNNI but no AVX-512 (Alder Lake and later).
    Config(
        "all-avx2-vnni",
        {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        },
        needs="avx_vnni",
    ),
    # The most portable path of each library.
    Config(
        "all-baseline",
        {
            "ATEN_CPU_CAPABILITY": "default",
            "ONEDNN_MAX_CPU_ISA": "SSE41",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        },
    ),
    Config("engine-fbgemm", engine="fbgemm"),
    Config("engine-qnnpack", engine="qnnpack"),
    Config("engine-onednn", engine="onednn"),
)
QUICK = ("native", "aten-default", "onednn-avx2", "all-avx2")

_ENV_KEYS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)


# --- what the tests measure ------------------------------------------------------------------
def to_u8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] float image as the backend stores it (rounded to 8 bits)."""
    return np.asarray((np.clip(image, 0.0, 1.0) * 255).round(), dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(peak**2 / mse))


def _regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels `classify_image` reads, as it reads them: the 4-pixel border (corners
    twice) and the central half, each as an Nx3 float array."""
    img = np.asarray(image, np.float64)
    h, w = img.shape[:2]
    sides = (img[:4], img[-4:], img[:, :4], img[:, -4:])
    border = np.concatenate([side.reshape(-1, 3) for side in sides])
    return border, img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3)


def _shape_mask(border: np.ndarray, centre: np.ndarray) -> np.ndarray | None:
    """classify_image's shape pixels: central pixels more than 60 from the background's
    median; None when fewer than 16 (no shape)."""
    far = np.sqrt(((centre - np.median(border, axis=0)) ** 2).sum(axis=1)) > 60.0
    return far if far.sum() >= 16 else None


def colour_shift(ref: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """(background, shape) colour distance in RGB units (0-255) of `image` from `ref`, two
    uint8 HxWx3 renders of the same prompt.

    The regions are the ones `classify_image` reads, the shape's taken from `ref` for both
    images (0.0 when ref has no shape). Each colour is the region's median. Unlike comparing
    the classifier's verdicts, this does not flip when a colour sits on the boundary between
    two palette entries and a tiny rounding difference tips it over.
    """
    border_a, centre_a = _regions(ref)
    border_b, centre_b = _regions(image)
    bg = float(np.linalg.norm(np.median(border_b, axis=0) - np.median(border_a, axis=0)))
    far = _shape_mask(border_a, centre_a)
    if far is None:
        return bg, 0.0
    shape = np.median(centre_b[far], axis=0) - np.median(centre_a[far], axis=0)
    return bg, float(np.linalg.norm(shape))


def boundary_margin(rgb: np.ndarray) -> float:
    """How far (RGB units) a colour is from the nearest palette decision boundary: the
    distance to the bisecting plane between its nearest palette entry and the runner-up. A
    verdict can only flip when rendering moves the colour at least this far."""
    from sogni_node.models.train_shapes import PALETTE

    ref = np.array(list(PALETTE.values()), dtype=np.float64)
    d2 = ((ref - np.asarray(rgb, np.float64)) ** 2).sum(axis=1)
    best = int(np.argmin(d2))
    gaps = np.linalg.norm(ref - ref[best], axis=1)
    others = [(d2[i] - d2[best]) / (2 * gaps[i]) for i in range(len(ref)) if i != best]
    return float(min(others))


def verdict_margin(image: np.ndarray) -> float:
    """The smaller boundary margin of an image's background and shape colour (as
    `classify_image` reads them; the shape is skipped when there is none)."""
    border, centre = _regions(image)
    margins = [boundary_margin(np.median(border, axis=0))]
    far = _shape_mask(border, centre)
    if far is not None:
        margins.append(boundary_margin(np.median(centre[far], axis=0)))
    return min(margins)


def int8_matmul_is_exact() -> bool:
    """See `sogni_node.render.quantize.int8_matmul_is_exact` (the node refuses int8-dynamic
    where it is False)."""
    from sogni_node.render.quantize import int8_matmul_is_exact as exact

    return exact()


def quant_prompts() -> list[tuple[str, int]]:
    from sogni_node.models.train_shapes import random_scene

    rng = random.Random(QUANT_PROMPT_SEED)
    return [
        (random_scene(rng, jitter=False).caption, rng.randrange(2**32))
        for _ in range(QUANT_PROMPTS)
    ]


def adherence_prompts() -> list[tuple[str, int, str, str]]:
    """(caption, seed, shape colour, background colour), as test_shapes_adherence draws them."""
    from sogni_node.models.train_shapes import random_scene

    rng = random.Random(ADHERENCE_SEED)
    out = []
    for _ in range(ADHERENCE_PROMPTS):
        scene = random_scene(rng, jitter=False)
        out.append((scene.caption, rng.randrange(2**32), scene.colour, scene.background))
    return out


# --- child: render everything under one configuration ---------------------------------------
def _child(out: Path, engine: str | None) -> None:
    import hashlib

    import torch
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
    from PIL import Image

    from sogni_node.models import ModelRegistry, ensure_tiny_model
    from sogni_node.models.defaults import default_registry
    from sogni_node.models.registry import SHAPES_DIR, SHAPES_MODEL_ID, shapes_model_spec
    from sogni_node.models.tiny import TINY_MODEL_ID, write_tiny_lora
    from sogni_node.render.backend import RenderJob
    from sogni_node.render.diffusers_backend import DiffusersBackend
    from sogni_node.render.encoding import encode_png, float_image_to_uint8
    from sogni_node.render.lora import Lora, applied_loras
    from sogni_node.render.quantize import _quantize_module, denoiser

    if engine:
        torch.backends.quantized.engine = engine
    torch.set_num_threads(1)
    result: dict[str, Any] = {}

    def png_pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    # test_quantize.py: the pipeline called directly, float images.
    spec = shapes_model_spec()
    prompts = quant_prompts()
    for mode in ("fp32", *QUANT_MODES):
        pipe: Any = DiffusionPipeline.from_pretrained(str(SHAPES_DIR), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if mode != "fp32":
            # not `quantize_pipeline`: a node refuses int8-dynamic where its int8 matmul is
            # inexact, and that broken case is what this bench measures
            _quantize_module(denoiser(pipe), mode)
        images = []
        for prompt, seed in prompts:
            r = pipe(
                prompt=prompt,
                num_inference_steps=spec.default_steps,
                guidance_scale=spec.default_guidance,
                width=spec.width,
                height=spec.height,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
            )
            images.append(np.asarray(r.images[0], dtype=np.float32))
        result[f"q_{mode}"] = np.stack(images)

    # test_shapes_adherence.py: PNGs through the backend.
    backend = DiffusersBackend(ModelRegistry([spec]), device="cpu", threads=1)
    try:
        pngs = []
        for caption, seed, _c, _b in adherence_prompts():
            job = RenderJob(
                SHAPES_MODEL_ID, caption, "", spec.default_steps, spec.default_guidance,
                spec.default_scheduler, spec.width, spec.height, seed,
            )  # fmt: skip
            pngs.append(png_pixels(backend.render(job, lambda _s: None, lambda: False).image))
        result["adherence"] = np.stack(pngs)
    finally:
        backend.close()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        tiny = ensure_tiny_model(cache)
        weights = (tiny / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
        result["tiny_unet_sha"] = np.array(hashlib.sha256(weights).hexdigest())

        # test_diffusers_backend.py's JOB, twice in one process.
        backend = DiffusersBackend(default_registry(cache, test_model=True), device="cpu")
        try:
            job = RenderJob(
                TINY_MODEL_ID, "a red circle on a blue background zanzibarquokka", "green",
                4, 5.0, None, 64, 64, 1234,
            )  # fmt: skip
            first = backend.render(job, lambda _s: None, lambda: False).image
            again = backend.render(job, lambda _s: None, lambda: False).image
            result["tiny_job"] = png_pixels(first)
            result["tiny_rerun_identical"] = np.array(first == again)
        finally:
            backend.close()

        # test_lora.py: two LoRAs merged in both orders (only float rounding differs).
        lpipe: Any = DiffusionPipeline.from_pretrained(str(tiny), local_files_only=True)
        lpipe.set_progress_bar_config(disable=True)

        def lora_render() -> np.ndarray:
            r = lpipe(
                prompt="red circle", num_inference_steps=2, guidance_scale=5.0, width=64,
                height=64, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
            )  # fmt: skip
            return png_pixels(encode_png(float_image_to_uint8(np.asarray(r.images)[0])))

        a = Lora(write_tiny_lora(cache / "a.safetensors", 1), 0.8)
        b = Lora(_diffusers_lora(cache / "b.safetensors", 2), 1.0)
        with applied_loras(lpipe, [a, b]):
            both = lora_render()
        with applied_loras(lpipe, [b, a]):
            reverse = lora_render()
        result["lora_both"], result["lora_reverse"] = both, reverse

        # tests/models: a tiny SDXL (random weights, seeded) rendered directly.
        conftest = _load_models_conftest()
        sdxl_dir = conftest.build_tiny_sdxl(tiny / "tokenizer", cache / "tiny-sdxl")
        spipe: Any = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
        spipe.set_progress_bar_config(disable=True)
        r = spipe(
            prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, width=64,
            height=64, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
        )  # fmt: skip
        result["sdxl"] = float_image_to_uint8(np.asarray(r.images)[0])

    result["int8_mm_exact"] = np.array(int8_matmul_is_exact())
    result["capability"] = np.array(torch.backends.cpu.get_cpu_capability())
    result["engine"] = np.array(torch.backends.quantized.engine)
    np.savez_compressed(out, **result)


def _diffusers_lora(path: Path, seed: int, rank: int = 2) -> Path:
    """test_lora.py's second LoRA (diffusers/peft layout)."""
    import torch
    from safetensors.torch import save_file

    unet = "down_blocks.1.attentions.0.transformer_blocks.0"
    te = "text_model.encoder.layers.0.self_attn"
    g = torch.Generator().manual_seed(seed)
    t = {
        f"unet.{unet}.attn1.to_v.lora_A.weight": torch.randn(rank, 64, generator=g),
        f"unet.{unet}.attn1.to_v.lora_B.weight": torch.randn(64, rank, generator=g),
        f"text_encoder.{te}.v_proj.lora_A.weight": torch.randn(rank, 32, generator=g),
        f"text_encoder.{te}.v_proj.lora_B.weight": torch.randn(32, rank, generator=g),
    }
    save_file(t, str(path))
    return path


def _load_models_conftest() -> Any:
    import importlib.util

    path = REPO / "tests" / "models" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_models_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- parent: run the configurations, compare ---------------------------------------------------
def cpu_description() -> str:
    """CPU model, family/model numbers and the ISA flags that pick code paths here."""
    from bench._common import _cpu_model

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = cpu_flags()
    isa = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    have = ", ".join(f for f in isa if f in flags) or "none of " + ", ".join(isa)
    lacks = ", ".join(f for f in isa if f not in flags)
    family = f"family {info.get('cpu family', '?')}, model {info.get('model', '?')}"
    return f"{_cpu_model()} ({family}; has {have}" + (f"; lacks {lacks})" if lacks else ")")


def run_config(config: Config, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{config.name}.npz"
    env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
    env.update(config.env)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "bench.cpu_variation", "--child", str(out)]
    if config.engine:
        argv += ["--engine", config.engine]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:  # the libraries' progress bars and warnings only on failure
        raise RuntimeError(f"{config.name} failed:\n{done.stderr[-4000:]}")
    with np.load(out) as data:
        loaded = {k: data[k] for k in data.files}
    loaded["seconds"] = time.perf_counter() - started
    return loaded


def _max_abs(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: drift from the native configuration and what the tests assert."""
    from sogni_node.models.train_shapes import classify_image

    base = results["native"]
    expected = [(c, b) for _p, _s, c, b in adherence_prompts()]
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row: dict[str, Any] = {"capability": str(r["capability"]), "engine": str(r["engine"])}
        ref_u8 = [to_u8(x) for x in r["q_fp32"]]
        ref_verdicts = [classify_image(x) for x in ref_u8]
        row["fp32_psnr_vs_native"] = min(
            psnr(a, b) for a, b in zip(r["q_fp32"], base["q_fp32"], strict=True)
        )
        row["fp32_maxdiff_vs_native"] = _max_abs(to_u8(r["q_fp32"]), to_u8(base["q_fp32"]))
        row["fp32_verdicts_as_native"] = ref_verdicts == [
            classify_image(to_u8(x)) for x in base["q_fp32"]
        ]
        for mode in QUANT_MODES:
            imgs = r[f"q_{mode}"]
            u8 = [to_u8(x) for x in imgs]
            shifts = [colour_shift(a, b) for a, b in zip(ref_u8, u8, strict=True)]
            row[mode] = {
                "psnr_vs_fp32_min": min(psnr(a, b) for a, b in zip(r["q_fp32"], imgs, strict=True)),
                "psnr_vs_fp32_mean": float(
                    np.mean([psnr(a, b) for a, b in zip(r["q_fp32"], imgs, strict=True)])
                ),
                "bg_shift_max": max(s[0] for s in shifts),
                "shape_shift_max": max(s[1] for s in shifts),
                "verdict_flips": sum(
                    classify_image(x) != v for x, v in zip(u8, ref_verdicts, strict=True)
                ),
                "psnr_vs_native_min": min(
                    psnr(a, b) for a, b in zip(imgs, base[f"q_{mode}"], strict=True)
                ),
                "maxdiff_vs_native": _max_abs(to_u8(imgs), to_u8(base[f"q_{mode}"])),
            }
        verdicts = [classify_image(x) for x in r["adherence"]]
        row["adherence_shape"] = sum(v[0] == e[0] for v, e in zip(verdicts, expected, strict=True))
        row["adherence_bg"] = sum(v[1] == e[1] for v, e in zip(verdicts, expected, strict=True))
        row["adherence_borderline"] = sum(verdict_margin(x) < 5.0 for x in r["adherence"])
        row["fp32_margin_min"] = min(verdict_margin(x) for x in ref_u8)
        row["int8_mm_exact"] = bool(r["int8_mm_exact"])
        row["adherence_psnr_vs_native"] = min(
            psnr(a, b, 255.0) for a, b in zip(r["adherence"], base["adherence"], strict=True)
        )
        row["adherence_maxdiff_vs_native"] = _max_abs(r["adherence"], base["adherence"])
        row["tiny_same_weights"] = str(r["tiny_unet_sha"]) == str(base["tiny_unet_sha"])
        row["tiny_rerun_identical"] = bool(r["tiny_rerun_identical"])
        row["tiny_maxdiff_vs_native"] = _max_abs(r["tiny_job"], base["tiny_job"])
        row["lora_order_maxdiff"] = _max_abs(r["lora_both"], r["lora_reverse"])
        row["sdxl_maxdiff_vs_native"] = _max_abs(r["sdxl"], base["sdxl"])
        row["seconds"] = float(r["seconds"])
        rows[name] = row
    return rows


def measure(quick: bool = False) -> tuple[dict[str, dict[str, Any]], list[str]]:
    flags = cpu_flags()
    chosen = [c for c in CONFIGS if not quick or c.name in QUICK]
    skipped = [c.name for c in chosen if c.needs and c.needs not in flags]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cpuvar-") as tmp:
        for config in chosen:
            if config.name in skipped:
                continue
            print(f"cpu_variation: {config.name} ({config.label()})", file=sys.stderr)
            results[config.name] = run_config(config, Path(tmp))
    return compare(results), skipped


def _worst(rows: dict[str, dict[str, Any]], mode: str, exact: bool) -> tuple[str, ...]:
    """One mode's worst figures over the configurations whose int8 matmul is exact (all
    configurations for the weight-only modes, which do not use it) or inexact."""
    if mode == "int8-dynamic":
        rows = {n: r for n, r in rows.items() if r["int8_mm_exact"] == exact}
    if not rows:
        return ()
    label = "all" if mode != "int8-dynamic" else ("int8 matmul exact" if exact else "inexact")
    return (
        mode,
        f"{label} ({len(rows)})",
        f"{min(r[mode]['psnr_vs_fp32_min'] for r in rows.values()):.1f}",
        f"{max(r[mode]['bg_shift_max'] for r in rows.values()):.1f}",
        f"{max(r[mode]['shape_shift_max'] for r in rows.values()):.1f}",
        str(sum(r[mode]["verdict_flips"] for r in rows.values())),
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _fmt_db(value: float) -> str:
    return "identical" if value == float("inf") else f"{value:.1f}"


def render_markdown(
    rows: dict[str, dict[str, Any]], skipped: list[str], command: str, cpu: str
) -> str:
    from bench._common import table

    labels = {c.name: c.label() for c in CONFIGS}
    seconds = [r["seconds"] for r in rows.values()]
    lines = [
        "## CPU variation: the tests' renders across CPU code paths",
        "",
        f"Command: `{command}`. CPU: {cpu}. Each configuration is a fresh process with the",
        "environment shown (read when torch loads) and 1 thread; `native` is this CPU's own",
        'choice and the reference for the "vs native" columns. PSNR in dB over images in',
        "[0, 1] (min over the prompts); max diff in 8-bit pixel values.",
    ]
    if skipped:
        lines.append(f"Skipped (this CPU lacks the ISA): {', '.join(skipped)}.")
    lines += [
        "Limits: a configuration can only take paths this CPU can run (no AMX here, so not a",
        "Sapphire Rapids' int8 path), and MKL may keep vendor-specific kernels whatever it is",
        "told; torchao and optimum-quanto do not use torch's quantized engine.",
    ]
    lines += [
        "",
        "Drift of fp32 renders from `native`: `sogni-shapes-64` (6 test_quantize prompts, and",
        "the 50 adherence prompts through the backend), the tiny model's backend job, the",
        "tiny SDXL; whether the classifier's verdicts on the 6 fp32 renders match `native`'s;",
        "adherence = prompts with the right shape / background colour out of 50; int8",
        "matmul exact = `torch._int_mm` (torchao's int8-dynamic kernel on CPU) matches int32.",
        "",
        table(
            (
                "config",
                "environment",
                "aten",
                "shapes PSNR",
                "shapes max diff",
                "verdicts as native",
                "adherence shape / bg",
                "adherence max diff",
                "tiny max diff",
                "SDXL max diff",
                "tiny weights same",
                "LoRA order max diff",
                "int8 matmul exact",
            ),
            [
                (
                    name,
                    labels[name],
                    r["capability"],
                    _fmt_db(r["fp32_psnr_vs_native"]),
                    r["fp32_maxdiff_vs_native"],
                    _yes(r["fp32_verdicts_as_native"]),
                    f"{r['adherence_shape']} / {r['adherence_bg']}",
                    r["adherence_maxdiff_vs_native"],
                    r["tiny_maxdiff_vs_native"],
                    r["sdxl_maxdiff_vs_native"],
                    _yes(r["tiny_same_weights"]),
                    r["lora_order_maxdiff"],
                    _yes(r["int8_mm_exact"]),
                )
                for name, r in rows.items()
            ],
        ),
        "",
        "Quantized vs fp32 of the same configuration (what test_quantize.py asserts): PSNR",
        "min (mean), the largest background / shape colour shift (`colour_shift`, RGB units),",
        "how many of the 6 classifier verdicts differ from fp32's, and the quantized render's",
        "own drift from `native` (PSNR min / max diff).",
        "",
        table(
            ("config", *QUANT_MODES),
            [
                (
                    name,
                    *(
                        f"{r[m]['psnr_vs_fp32_min']:.1f} ({r[m]['psnr_vs_fp32_mean']:.1f}); "
                        f"{r[m]['bg_shift_max']:.1f} / {r[m]['shape_shift_max']:.1f}; "
                        f"flips {r[m]['verdict_flips']}; "
                        f"{_fmt_db(r[m]['psnr_vs_native_min'])} / {r[m]['maxdiff_vs_native']}"
                        for m in QUANT_MODES
                    ),
                )
                for name, r in rows.items()
            ],
        ),
        "",
        "Worst over the configurations, per mode (flips: summed over configurations). With",
        "an inexact int8 matmul (oneDNN without VNNI/AMX) int8-dynamic is broken, not noisy;",
        "its row over those configurations is separate.",
        "",
        table(
            (
                "mode",
                "configurations",
                "PSNR vs fp32 min",
                "bg shift max",
                "shape shift max",
                "verdict flips",
            ),
            [
                _worst(rows, m, exact)
                for m in QUANT_MODES
                for exact in (True, False)
                if (m == "int8-dynamic" or exact) and _worst(rows, m, exact)
            ],
        ),
        "",
        f"Adherence worst: shape {min(r['adherence_shape'] for r in rows.values())}/50, "
        f"background {min(r['adherence_bg'] for r in rows.values())}/50; adherence renders "
        f"within 5 RGB units of a palette boundary (a verdict that rounding could flip): "
        f"{max(r['adherence_borderline'] for r in rows.values())}. Smallest boundary margin "
        f"of the 6 fp32 quantize-test renders: "
        f"{min(r['fp32_margin_min'] for r in rows.values()):.1f}. Same-process reruns "
        f"byte-identical in every configuration: "
        f"{_yes(all(r['tiny_rerun_identical'] for r in rows.values()))}. Seconds per "
        f"configuration: {min(seconds):.0f}-{max(seconds):.0f}.",
    ]
    return "\n".join(lines)


def run(quick: bool, command: str = "python -m bench cpuvar") -> str:
    rows, skipped = measure(quick)
    raw = Path(tempfile.gettempdir()) / f"cpu_variation-{int(time.time())}.json"
    raw.write_text(json.dumps(rows, indent=1, default=float))
    print(f"cpu_variation: raw results in {raw}", file=sys.stderr)
    return render_markdown(rows, skipped, command, cpu_description())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        _child(ns.child, ns.engine)
    else:
        cmd = "python -m bench.cpu_variation" + (" --quick" if ns.quick else "")
        print(run(ns.quick, cmd))
