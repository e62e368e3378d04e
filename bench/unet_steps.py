"""Per-step time and memory of full-size SD 1.5 and SDXL UNets, fp32 vs quantized, on CPU;
and the shipped model's full render time through `DiffusersBackend`.

- UNets: the standard SD 1.5 and SDXL-base `UNet2DConditionModel` configs (written below, no
  hub), random weights (timing does not depend on their values). One step = one UNet forward
  at batch 2 (classifier-free guidance): SD 1.5 at 512x512 (latents 64x64, text 77x768), SDXL
  at 1024x1024 (latents 128x128, text 77x2048 plus pooled text and size conditioning). 2
  threads, one warm-up step, then the median of the timed steps; each mode's ratio is against
  fp32 measured in the same run.
- Memory: the denoiser's weight bytes after quantization (`storage_bytes`, counting the
  integer data and scales), the process's peak RSS over its whole life (building the fp32
  model, quantizing, stepping: `ru_maxrss`) and its peak RSS while stepping (the high-water
  mark is reset after quantizing). Every configuration runs in a fresh subprocess, one at a
  time, so none inherits another's memory.
- The trained model: `sogni-shapes-64` at its defaults (64x64, 8 steps, guidance 5),
  `DiffusersBackend(threads=1)`, fp32 and each CPU quantization mode, median of the renders
  after a warm-up render.

Run: ``.venv/bin/python -m bench unet`` (writes its section of BENCHMARKS.md; about 45 min
here) or ``.venv/bin/python -m bench.unet_steps [--quick]`` (prints only). ``--quick`` uses
quarter-size latents, 2 timed steps and 3 renders (a smoke run, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}
"""runwayml/stable-diffusion-v1-5 `unet/config.json` (non-default fields)."""

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
"""stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (non-default fields)."""


@dataclass(frozen=True)
class Arch:
    name: str
    config: dict[str, Any]
    pixels: int  # image side
    text_dim: int
    min_available_gib: float  # skip (and say so) when the machine has less free memory
    modes: tuple[str, ...]


ALL_CPU_MODES = ("none", "int8", "int8-dynamic", "quanto-int8", "quanto-int4")
ARCHS = {
    "sd15": Arch("SD 1.5", SD15_UNET, 512, 768, 6.0, ALL_CPU_MODES),
    # int8-dynamic is left out: ~5x slower than fp32 on SD 1.5 here, it would take an hour.
    "sdxl": Arch(
        "SDXL base", SDXL_UNET, 1024, 2048, 15.0, ("none", "int8", "quanto-int8", "quanto-int4")
    ),
}
RENDER_MODES = ALL_CPU_MODES
STEP_THREADS = 2
CHILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Settings:
    latent_div: int = 1  # latents are (pixels / 8 / latent_div) square
    steps: int = 3  # timed steps after one warm-up
    renders: int = 10  # timed renders after one warm-up


QUICK = Settings(latent_div=2, steps=2, renders=3)


# --- children ------------------------------------------------------------------------------
def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    """Peak RSS since the last `_reset_peak` (VmHWM), or of the whole process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _busy() -> tuple[float, float]:
    from bench import _common as common

    own = resource.getrusage(resource.RUSAGE_SELF)
    return common.system_busy_seconds(), own.ru_utime + own.ru_stime


def child_steps(arch_key: str, mode: str, settings: Settings) -> dict[str, Any]:
    """Build one UNet, quantize it, time its steps; runs in its own process."""
    import gc

    import torch
    from diffusers import UNet2DConditionModel

    from sogni_node.render.quantize import quantize_pipeline, quantized_layers, storage_bytes

    torch.set_num_threads(STEP_THREADS)
    torch.manual_seed(0)
    arch = ARCHS[arch_key]
    t0 = time.perf_counter()
    unet: Any = UNet2DConditionModel(**arch.config)
    unet.eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    fp32_bytes = storage_bytes(unet)

    class _Pipe:  # quantize_pipeline takes a pipeline; only its `unet` matters here
        pass

    pipe = _Pipe()
    pipe.unet = unet  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    quantize_pipeline(pipe, mode)
    quantize_s = time.perf_counter() - t0
    gc.collect()
    rss_after_quantize = _rss_now()

    side = arch.pixels // 8 // settings.latent_div
    batch = 2  # classifier-free guidance: unconditional + conditional
    sample = torch.randn(batch, 4, side, side)
    text = torch.randn(batch, 77, arch.text_dim)
    timestep = torch.tensor(500)
    added: dict[str, torch.Tensor] | None = None
    if arch.config.get("addition_embed_type") == "text_time":
        size = float(arch.pixels // settings.latent_div)
        added = {
            "text_embeds": torch.randn(batch, 1280),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch),
        }

    def step() -> float:
        t = time.perf_counter()
        with torch.no_grad():  # as diffusers pipelines; quanto int4 fails in inference_mode
            out = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added)
        assert out.sample.shape == sample.shape
        return time.perf_counter() - t

    peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the reset
    reset = _reset_peak()
    warmup_s = step()
    busy0, own0 = _busy()
    wall0 = time.perf_counter()
    times = [step() for _ in range(settings.steps)]
    wall = time.perf_counter() - wall0
    busy1, own1 = _busy()
    return {
        "arch": arch_key,
        "mode": mode,
        "params": params,
        "quantized_layers": quantized_layers(unet),
        "fp32_bytes": fp32_bytes,
        "bytes": storage_bytes(unet),
        "build_s": build_s,
        "quantize_s": quantize_s,
        "warmup_s": warmup_s,
        "step_s": times,
        "latent": side,
        "rss_after_quantize": rss_after_quantize,
        "peak_rss_steps": _peak_rss() if reset else None,
        "peak_rss": max(peak_build, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "others_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
    }


def child_render(mode: str, settings: Settings) -> dict[str, Any]:
    """Render `sogni-shapes-64` at its defaults through the node's backend; own process."""
    import torch

    from sogni_node.models import ModelRegistry
    from sogni_node.models.registry import SHAPES_MODEL_ID, shapes_model_spec
    from sogni_node.render.diffusers_backend import DiffusersBackend

    spec = shapes_model_spec()
    backend = DiffusersBackend(ModelRegistry([spec]), device="cpu", threads=1, quantize=mode)
    try:

        def render(seed: int) -> tuple[float, float]:
            job = spec.default_job("a red circle on a blue background", seed)
            wall, cpu = time.perf_counter(), time.process_time()
            backend.render(job, on_step=lambda _i: None, should_cancel=lambda: False)
            return time.perf_counter() - wall, time.process_time() - cpu

        t0 = time.perf_counter()
        backend.load(SHAPES_MODEL_ID)
        load_s = time.perf_counter() - t0
        first_s = render(0)[0]
        busy0, own0 = _busy()
        wall0 = time.perf_counter()
        runs = [render(seed) for seed in range(1, settings.renders + 1)]
        wall = time.perf_counter() - wall0
        busy1, own1 = _busy()
    finally:
        backend.close()
    return {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "first_s": first_s,
        "render_s": [w for w, _c in runs],
        "cpu_s": [c for _w, c in runs],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "others_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
    }


# --- parent --------------------------------------------------------------------------------
def _available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("inf")


def _spawn(args: list[str], threads: int, quick: bool) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its last stdout line is a JSON result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "bench.unet_steps", "--child", *args, *(["--quick"] * quick)]
    try:
        proc = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit {proc.returncode}{killed}: {tail}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(settings: Settings, quick: bool) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for arch_key, arch in ARCHS.items():
        for mode in arch.modes:
            free = _available_gib()
            if free < arch.min_available_gib / (2 if quick else 1):
                steps.append(
                    {"arch": arch_key, "mode": mode, "error": f"skipped: {free:.1f} GiB free"}
                )
                continue
            print(f"unet_steps: {arch.name} {mode} ...", file=sys.stderr, flush=True)
            result = _spawn(["steps", arch_key, mode], STEP_THREADS, quick)
            steps.append({"arch": arch_key, "mode": mode, **result})
    renders = []
    for mode in RENDER_MODES:
        print(f"unet_steps: sogni-shapes-64 {mode} ...", file=sys.stderr, flush=True)
        renders.append({"mode": mode, **_spawn(["render", mode], 1, quick)})
    return {"steps": steps, "renders": renders, "settings": settings}


STEP_HEADER = (
    "| UNet | mode | step s | ratio | weights GB | quantized layers | RSS loaded GB "
    "| peak RSS stepping GB | peak RSS overall GB | build / quantize / warm-up s |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render_markdown(m: dict[str, Any], command: str) -> str:
    settings: Settings = m["settings"]
    step_rows = []
    base: dict[str, float] = {}
    for r in m["steps"]:
        if "step_s" in r and r["mode"] == "none":
            base[r["arch"]] = statistics.median(r["step_s"])
    for r in m["steps"]:
        arch = ARCHS[r["arch"]]
        if "error" in r:
            step_rows.append(f"| {arch.name} | {r['mode']} | {r['error']} | | | | | | | |")
            continue
        med = statistics.median(r["step_s"])
        ratio = f"{med / base[r['arch']]:.2f}" if r["arch"] in base else "-"
        mode = "fp32 (baseline)" if r["mode"] == "none" else r["mode"]
        step_rows.append(
            f"| {arch.name} | {mode} | {_spread(r['step_s'], '{:.2f}')} | **{ratio}** | "
            f"{_gb(r['bytes'])} | {r['quantized_layers']} | {_gb(r['rss_after_quantize'])} | "
            f"{_gb(r['peak_rss_steps'])} | "
            f"{_gb(r['peak_rss'])} | {r['build_s']:.0f} / {r['quantize_s']:.1f} / "
            f"{r['warmup_s']:.1f} |"
        )
    params = {r["arch"]: r["params"] for r in m["steps"] if "params" in r}
    others = [r["others_cpu"] for r in (*m["steps"], *m["renders"]) if "others_cpu" in r]
    render_rows = []
    render_base = next(
        (statistics.median(r["render_s"]) for r in m["renders"] if r["mode"] == "none"), None
    )
    for r in m["renders"]:
        if "error" in r:
            render_rows.append(f"| {r['mode']} | {r['error']} | | | | |")
            continue
        med = statistics.median(r["render_s"])
        ratio = f"{med / render_base:.2f}" if render_base else "-"
        mode = "fp32 (baseline)" if r["mode"] == "none" else r["mode"]
        render_rows.append(
            f"| {mode} | {_spread([t * 1000 for t in r['render_s']], '{:.0f}')} | {ratio} | "
            f"{statistics.median(r['cpu_s']) * 1000:.0f} | {r['first_s'] * 1000:.0f} | "
            f"{_gb(r['peak_rss'])} |"
        )
    sd_side, xl_side = (512 // 8 // settings.latent_div, 1024 // 8 // settings.latent_div)
    param_text = ", ".join(f"{ARCHS[k].name} {v / 1e6:.0f} M" for k, v in params.items())
    return f"""## UNet steps: SD 1.5 and SDXL, fp32 vs quantized (CPU)

Command: `{command}`

Full-size `UNet2DConditionModel`s from the standard configs with random weights
({param_text} parameters). One step = one forward at batch 2 (classifier-free guidance)
under `torch.no_grad()`: SD 1.5 latents {sd_side}x{sd_side} with text 77x768, SDXL latents
{xl_side}x{xl_side} with text 77x2048 + pooled text and size conditioning.
{STEP_THREADS} threads; each configuration in a fresh process, one at a time; one warm-up
step, then the median of {settings.steps} steps (min-max). Ratio = step time / fp32 step time
of the same run. Quantized = the UNet's `nn.Linear` layers (`sogni_node/render/quantize.py`).
Weights = the UNet's parameter bytes after quantization (int data + scales). RSS loaded =
the process's resident memory after building and quantizing (about 0.45 GB of it is
Python, torch and diffusers); peak RSS stepping = its high-water mark from then on; peak RSS
overall also includes building the fp32 model first, as a node does when it loads and then
quantizes. SDXL int8-dynamic is not run: it is ~8x slower than fp32 on SD 1.5 here and would
take about an hour. Other processes took a median
{statistics.median(others) * 100 if others else 0:.0f}% of one core during the timed runs.

{STEP_HEADER}
{chr(10).join(step_rows)}

The trained model: `sogni-shapes-64` at its defaults (64x64, 8 steps, guidance 5, Euler)
through `DiffusersBackend(device="cpu", threads=1, quantize=mode)`, median of
{settings.renders} renders (min-max) after a first render (also shown), each mode in a fresh
process.

| mode | render ms | ratio | CPU ms | first render ms | peak RSS GB |
|---|---|---|---|---|---|
{chr(10).join(render_rows)}
"""


def run(quick: bool, command: str = "python -m bench unet") -> str:
    """Measure every configuration (one subprocess each) and return the markdown section."""
    settings = QUICK if quick else Settings()
    measured = measure(settings, quick)
    raw = Path(tempfile.gettempdir()) / f"unet_steps-{int(time.time())}.json"
    raw.write_text(json.dumps({**measured, "settings": settings.__dict__}, indent=1))
    print(f"unet_steps: raw results in {raw}", file=sys.stderr)
    return render_markdown(measured, command)


def _child_main(args: list[str], quick: bool) -> int:
    settings = QUICK if quick else Settings()
    if args[0] == "steps":
        result = child_steps(args[1], args[2], settings)
    else:
        result = child_render(args[1], settings)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        raise SystemExit(_child_main(ns.child, ns.quick))
    print(run(ns.quick, "python -m bench.unet_steps" + (" --quick" if ns.quick else "")))
