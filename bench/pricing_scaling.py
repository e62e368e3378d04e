"""Measure how render time scales with steps and pixels; propose `configs/pricing_factors.toml`.

The whitepaper benchmarks each model class once at its defaults and then "the impact of
modification to parameters like increase in inference steps and output resolution". This
measures that impact on the tiny model (`sogni-tiny-sd`, `DiffusersBackend`, CPU, 1 thread):

- steps, at the model's native size: ``t(s) = a + b*s``; pricing uses
  ``step_factor(s) = (s + o) / (s0 + o)`` with ``o = a / b`` (fixed cost in step units);
- pixels, at the model's default steps: ``t(p) = k * p**e``; pricing uses
  ``pixel_factor(p) = (p / p0) ** e``.

Both factors are 1 at a model's defaults, so a baseline job keeps its catalog price exactly.

Run: ``.venv/bin/python -m bench.pricing_scaling [--quick] [--adopt]``. The measured factors
go to a proposal file (`.cache/pricing_factors.proposed.toml`): every coordinator of a network
must price alike, so the committed `configs/pricing_factors.toml` changes only on purpose
(`--adopt`, then commit it), never as a side effect of a benchmark run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from sogni_protocol.atomic import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
FACTORS_TOML = REPO / "configs" / "pricing_factors.toml"
PROPOSAL_TOML = REPO / ".cache" / "pricing_factors.proposed.toml"
MODEL = "sogni-tiny-sd"


def _fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b*x``; returns (a, b, r2)."""
    b, a = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    pred = a + b * np.asarray(xs)
    ss_res = float(np.sum((np.asarray(ys) - pred) ** 2))
    ss_tot = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2)) or 1.0
    return float(a), float(b), 1.0 - ss_res / ss_tot


def _fit_power(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares in log-log space ``y = k * x**e``; returns (k, e, r2 of the log fit)."""
    log_k, e, r2 = _fit_linear([float(np.log(x)) for x in xs], [float(np.log(y)) for y in ys])
    return float(np.exp(log_k)), e, r2


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure(quick: bool) -> dict[str, object]:
    import torch

    from sogni_node.models.defaults import default_registry
    from sogni_node.render.backend import RenderJob
    from sogni_node.render.diffusers_backend import DiffusersBackend

    cache = Path(os.environ.get("SOGNI_BENCH_MODELS", "~/.cache/sogni-bench-models")).expanduser()
    backend = DiffusersBackend(default_registry(cache, test_model=True), device="cpu", threads=1)
    reps = 1 if quick else 3
    native, default_steps = 64, 4
    step_grid = [2, 4, 8, 16] if quick else [2, 4, 8, 16, 32]
    side_grid = [64, 96, 128, 192] if quick else [64, 96, 128, 160, 192, 256]

    def timed(steps: int, side: int) -> float:
        job = RenderJob(
            model_id=MODEL,
            prompt="a red circle on a blue background",
            negative_prompt="",
            steps=steps,
            guidance=5.0,
            scheduler=None,
            width=side,
            height=side,
            seed=7,
        )
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            backend.render(job, lambda _k: None, lambda: False)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    try:
        timed(default_steps, native)  # warm-up: load the pipeline, first-call allocations
        by_steps = [(s, timed(s, native)) for s in step_grid]
        by_pixels = [(side * side, timed(default_steps, side)) for side in side_grid]
    finally:
        backend.close()
    a, b, r2_steps = _fit_linear([float(s) for s, _ in by_steps], [t for _, t in by_steps])
    _k, e, r2_pixels = _fit_power([float(p) for p, _ in by_pixels], [t for _, t in by_pixels])
    return {
        "overhead_steps": max(0.0, a / b),
        "seconds_per_step": b,
        "r2_steps": r2_steps,
        "pixel_exponent": e,
        "r2_pixels": r2_pixels,
        "by_steps": by_steps,
        "by_pixels": by_pixels,
        "reps": reps,
        "native": native,
        "default_steps": default_steps,
        "torch": torch.__version__,
    }


def _toml(m: dict[str, object], quick: bool) -> str:
    by_steps = ", ".join(f"[{s}, {t:.4f}]" for s, t in m["by_steps"])  # type: ignore[attr-defined]
    by_px = ", ".join(f"[{p}, {t:.4f}]" for p, t in m["by_pixels"])  # type: ignore[attr-defined]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""\
# Render-time scaling factors used by sogni_protocol/pricing.py.
# Generated by `python -m bench.pricing_scaling{" --quick" if quick else ""}`; do not edit by hand.
# Measured {now} on {_cpu()} (CPU, 1 thread), torch {m["torch"]},
# model {MODEL} (DiffusersBackend), median of {m["reps"]} run(s) per point after a warm-up.
#   step_factor(s)  = (s + overhead_steps) / (default_steps + overhead_steps)
#   pixel_factor(p) = (p / default_pixels) ** pixel_exponent

[steps]
overhead_steps = {m["overhead_steps"]:.4f}  # fixed cost (text encoder, VAE, setup) in steps
seconds_per_step = {m["seconds_per_step"]:.5f}  # tiny model at {m["native"]}x{m["native"]}
r2 = {m["r2_steps"]:.4f}
samples = [{by_steps}]  # [steps, seconds] at {m["native"]}x{m["native"]}

[pixels]
exponent = {m["pixel_exponent"]:.4f}
r2 = {m["r2_pixels"]:.4f}  # of the log-log fit
samples = [{by_px}]  # [pixels, seconds] at {m["default_steps"]} steps
"""


def write_factors(text: str, *, adopt: bool = False) -> Path:
    """Write measured factors: to the proposal file, or with `adopt` to the committed file
    that `sogni_protocol.pricing` reads. Returns where it wrote."""
    target = FACTORS_TOML if adopt else PROPOSAL_TOML
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)
    return target


def run(quick: bool, adopt: bool = False) -> str:
    """Measure, write the factors (`write_factors`), return a markdown section."""
    m = _measure(quick)
    written = write_factors(_toml(m, quick), adopt=adopt)
    note = "" if adopt else " (a proposal: `--adopt` writes configs/pricing_factors.toml)"
    rows = "\n".join(f"| {s} | {t * 1000:.0f} |" for s, t in m["by_steps"])  # type: ignore[attr-defined]
    prow = "\n".join(f"| {p} | {t * 1000:.0f} |" for p, t in m["by_pixels"])  # type: ignore[attr-defined]
    return f"""## Pricing scaling ({MODEL}, CPU, 1 thread)

Render time vs steps at {m["native"]}x{m["native"]}: fit `t = a + b*s`, fixed cost
= **{m["overhead_steps"]:.2f} steps** (R² {m["r2_steps"]:.3f}).

| steps | ms |
|---|---|
{rows}

Render time vs pixels at {m["default_steps"]} steps: fit `t = k * p^e`,
**e = {m["pixel_exponent"]:.3f}** (R² {m["r2_pixels"]:.3f}).

| pixels | ms |
|---|---|
{prow}

Written to `{written.relative_to(REPO)}`{note}.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--adopt", action="store_true", help="write configs/pricing_factors.toml (then commit it)"
    )
    args = parser.parse_args()
    print(run(args.quick, args.adopt))
