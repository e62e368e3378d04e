"""SDXL 1024x1024, 20 steps: the node's diffusers backend at its best settings against plain
diffusers fp16, in one run, as JSON (speedup, PSNR against the fp16 reference, VRAM peak).

Why random weights: no checkpoint needs to reach a GPU machine that reaches no registry; the
bundled SDXL config (`sogni_node/models/configs/sdxl`) gives the real shapes, so the timing
is SDXL's, and the PSNR compares the same network computed two ways (same noise, same
scheduler). The prompt goes through a tiny CLIP tokenizer (`write_tiny_tokenizer`): the text
encoders still see 77 tokens, so their cost is the real one.

Candidates (each timed through `DiffusersBackend.render`, the node's path, after one warm-up
render that also compiles): fp16 + SDPA + channels-last + torch.compile, then the same with
torchao fp8 weights (compute capability >= 8.9) and with int8-dynamic, while the time budget
(`--budget-s`, default 480 s including the model build and every compilation) allows. The
reference is `StableDiffusionXLPipeline` in fp16 as diffusers loads it, nothing else set.

    python bench/gpu/sdxl_speed.py --out sdxl.json            # on the GPU machine
    python bench/gpu/sdxl_speed.py --device cpu --tiny        # here, in seconds (tested)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file from a copy of the tree: the project is here
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL_ID = "sdxl-random"
PROMPT = "a red circle on a blue background"
SEED = 1234
GUIDANCE = 5.0
COMPILE_ESTIMATE_S = 150.0
"""Rough load + compile + runs of one candidate on a GPU: a candidate starts only if this
still fits in the budget."""


@dataclass
class Timing:
    """One configuration: seconds per image (after warm-up), first-render seconds
    (compilation included), VRAM peak, PSNR against the reference (dB; inf: identical)."""

    name: str
    seconds: list[float] = field(default_factory=list)
    first_s: float = float("nan")
    load_s: float = float("nan")
    vram_peak_gib: float | None = None
    psnr_db: float | None = None
    skipped: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        med = statistics.median(self.seconds) if self.seconds else None
        return {
            "name": self.name,
            "median_s": med,
            "runs_s": self.seconds,
            "first_render_s": _num(self.first_s),
            "load_s": _num(self.load_s),
            "vram_peak_gib": self.vram_peak_gib,
            "psnr_db_vs_fp16": _num(self.psnr_db),
            "skipped": self.skipped,
        }


def _num(v: float | None) -> float | str | None:
    if v is None or math.isnan(v):
        return None
    return "inf" if math.isinf(v) else round(v, 4)


# --- the model -------------------------------------------------------------------------------
def _tiny_configs(cfg: Path) -> None:
    """Shrink the SDXL skeleton to a few thousand parameters per part (same layout, same
    conditioning: two text encoders, pooled embeds, time ids), for the CPU check."""

    def edit(sub: str, name: str, **values: Any) -> None:
        path = cfg / sub / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(values)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")

    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "projection_dim": 32}  # fmt: skip
    edit("text_encoder", "config.json", **text)
    edit("text_encoder_2", "config.json", **text)
    edit(
        "unet",
        "config.json",
        block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        transformer_layers_per_block=[1, 1],
        attention_head_dim=[2, 4],
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        sample_size=8,
    )
    edit(
        "vae",
        "config.json",
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        sample_size=64,
    )


def build_model(dest: Path, *, tiny: bool, device: str) -> Path:
    """A diffusers SDXL folder with seeded random weights (fp16 on CUDA, fp32 elsewhere)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sogni_node.models.single_file import prepare_config_dir
    from sogni_node.models.tiny import write_tiny_tokenizer

    tok = dest.parent / "_tokenizer"
    write_tiny_tokenizer(tok)
    prepare_config_dir("sdxl", dest, tokenizer_dirs={"tokenizer": tok, "tokenizer_2": tok})
    if tiny:
        _tiny_configs(dest)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes on a CPU
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(dest / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(dest / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(dest / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(dest / "text_encoder_2")
            ),
        }
    for sub, module in parts.items():
        module.to(dtype).save_pretrained(dest / sub, safe_serialization=True)
    del parts
    _free(device)
    return dest


# --- timing ----------------------------------------------------------------------------------
def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def _timed(fn: Callable[[], np.ndarray], runs: int, device: str, t: Timing) -> None:
    start = time.perf_counter()
    t.image = fn()
    _sync(device)
    t.first_s = time.perf_counter() - start
    for _ in range(runs):
        start = time.perf_counter()
        t.image = fn()
        _sync(device)
        t.seconds.append(time.perf_counter() - start)
    t.vram_peak_gib = _peak_gib(device)


def reference(folder: Path, args: argparse.Namespace) -> Timing:
    """Plain diffusers: `StableDiffusionXLPipeline` in fp16 (fp32 on CPU), defaults."""
    from diffusers import StableDiffusionXLPipeline

    from sogni_node.render.encoding import float_image_to_uint8
    from sogni_node.render.noise import initial_latents

    t = Timing("diffusers fp16 (reference)" if args.device.startswith("cuda") else "diffusers")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    _reset_peak(args.device)
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    t.load_s = time.perf_counter() - start
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, args.size // scale, args.size // scale)

    def once() -> np.ndarray:
        out = pipe(
            prompt=PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            width=args.size,
            height=args.size,
            latents=initial_latents(SEED, shape, dtype, args.device),
            output_type="np",
        )
        return float_image_to_uint8(np.asarray(out.images)[0])

    _timed(once, args.runs, args.device, t)
    return t  # the pipeline goes with this frame; the caller frees the memory


@dataclass(frozen=True)
class Candidate:
    name: str
    dtype: str
    quantize: str = "none"
    compile: bool = True
    channels_last: bool = True


def candidates(device: str, compile_cpu: bool) -> list[Candidate]:
    """Best first. fp8 only where the GPU has fp8 kernels and torchao is installed."""
    if not device.startswith("cuda"):
        return [Candidate("node fp32 + channels-last" + (" + compile" if compile_cpu else ""),
                          "float32", compile=compile_cpu)]  # fmt: skip
    from sogni_node.render.quantize import check_quant_mode

    out = [Candidate("node fp16 + SDPA + channels-last + compile", "float16")]
    for mode in ("fp8", "int8-dynamic"):
        try:
            check_quant_mode(mode, device)
        except ValueError:
            continue
        out.append(Candidate(f"node fp16 + {mode} + channels-last + compile", "float16", mode))
    out.append(Candidate("node bf16 + SDPA + channels-last + compile", "bfloat16"))
    return out


def through_backend(folder: Path, c: Candidate, args: argparse.Namespace) -> Timing:
    """`DiffusersBackend.render` (trajectory recording, pinned noise, PNG encoding: the
    node's whole render path) with the candidate's settings."""
    from PIL import Image

    from sogni_node.models.registry import ModelRegistry, ModelSpec
    from sogni_node.render.backend import RenderJob
    from sogni_node.render.diffusers_backend import DiffusersBackend
    from sogni_node.render.quantize import compile_pipeline

    t = Timing(c.name)
    _reset_peak(args.device)
    registry = ModelRegistry([ModelSpec(MODEL_ID, folder, model_class="sdxl")])
    backend = DiffusersBackend(
        registry, device=args.device, dtype=c.dtype, quantize=c.quantize, compile=False
    )
    start = time.perf_counter()
    pipe = backend._get(MODEL_ID).pipe  # loaded (and quantized) as the node loads it
    if c.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if c.compile:
        compile_pipeline(pipe, args.compile_mode)  # the node's call; compiles on first render
    t.load_s = time.perf_counter() - start
    job = RenderJob(
        model_id=MODEL_ID,
        prompt=PROMPT,
        negative_prompt="",
        steps=args.steps,
        guidance=GUIDANCE,
        scheduler=None,
        width=args.size,
        height=args.size,
        seed=SEED,
    )

    def once() -> np.ndarray:
        out = backend.render(job, lambda _step: None, lambda: False)
        return np.asarray(Image.open(BytesIO(out.image)).convert("RGB"))

    _timed(once, args.runs, args.device, t)
    return t  # the backend goes with this frame; the caller frees the memory


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --- main --------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "diffusers", "transformers", "torchao"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _progress(args: argparse.Namespace, started: float, what: str, partial: dict[str, Any]) -> None:
    """One stderr line per phase, and the figures so far in `--out`: a run killed at its time
    limit still leaves what it measured (the first GPU run left nothing)."""
    print(f"sdxl_speed: {what} at {time.perf_counter() - started:.0f} s", file=sys.stderr,
          flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({**partial, "partial": True}, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdxl-speed-"))
    try:
        build_start = time.perf_counter()
        folder = build_model(work / "model", tiny=args.tiny, device=args.device)
        build_s = time.perf_counter() - build_start
        _progress(args, started, "model built", {"build_s": build_s})
        ref = reference(folder, args)
        _free(args.device)
        results: list[Timing] = []
        _progress(
            args, started, "reference timed", {"build_s": build_s, "reference": ref.as_json()}
        )
        for c in candidates(args.device, args.compile_cpu):
            left = args.budget_s - (time.perf_counter() - started)
            need = COMPILE_ESTIMATE_S if args.device.startswith("cuda") else 0.0
            if results and left < need:
                results.append(Timing(c.name, skipped=f"{left:.0f} s left of the budget"))
                continue
            try:
                t = through_backend(folder, c, args)
            except Exception as exc:  # one candidate failing must not lose the others
                results.append(Timing(c.name, skipped=f"{type(exc).__name__}: {exc}"[:300]))
                _free(args.device)
                continue
            _free(args.device)
            if ref.image is not None and t.image is not None:
                t.psnr_db = psnr(ref.image, t.image)
            results.append(t)
            so_far = {"reference": ref.as_json(), "candidates": [r.as_json() for r in results]}
            _progress(args, started, f"{c.name} timed", {"build_s": build_s, **so_far})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ran = [r for r in results if r.seconds]
    ref_s = statistics.median(ref.seconds)
    best = min(ran, key=lambda r: statistics.median(r.seconds)) if ran else None
    acceptable = [r for r in ran if r.psnr_db is not None and r.psnr_db >= args.min_psnr]
    best_ok = min(acceptable, key=lambda r: statistics.median(r.seconds)) if acceptable else None
    return {
        "device": _device_name(args.device),
        "tiny": args.tiny,
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "compile_mode": args.compile_mode,
        "versions": _versions(),
        "build_s": round(build_s, 2),
        "reference": ref.as_json(),
        "candidates": [r.as_json() for r in results],
        "min_psnr_db": args.min_psnr,
        "best": None if best_ok is None else best_ok.name,
        "speedup": None if best_ok is None else ref_s / statistics.median(best_ok.seconds),
        "fastest_any_psnr": None if best is None else best.name,
        "total_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped model (CPU check)")
    parser.add_argument("--size", type=int, default=None, help="pixels (1024; tiny: 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps (20; tiny: 2)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs after warm-up (2)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no candidate after")
    parser.add_argument("--min-psnr", type=float, default=30.0, help="dB a candidate must reach")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode (default: the node's)"
    )
    parser.add_argument("--compile-cpu", action="store_true", help="also compile on CPU (slow)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--workdir", default=None, help="build the model here (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the built model folder")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"sdxl_speed: device {args.device!r} but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.size is None:
        args.size = 64 if args.tiny else 1024
    if args.steps is None:
        args.steps = 2 if args.tiny else 20
    if args.runs is None:
        args.runs = 2
    if args.size % 8 or args.size < 64 or args.steps < 1 or args.runs < 1:
        print("sdxl_speed: --size must be a multiple of 8 >= 64, --steps and --runs >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    report = run(args)
    line = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
