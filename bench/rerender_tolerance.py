"""Whole re-render check: how far an honest render in one numeric mode lies from a float32
re-render of the same job, a tolerance, and what that catches.

Why: the step checks (`python -m bench tolerance`) only run for a declared mode whose honest
step distance was measured; a node declaring any other mode (CUDA float16, fp8, a CPU path
never measured), or committing no trajectory, would otherwise escape every check. Such a
receipt gets a whole re-render instead (`sogni_coordinator.rerender_verify`): a node of
another wallet renders the job again in float32 and the coordinator compares both images
(`image_verify.check_distance`: the largest mean absolute difference over any 8x8 block and
channel, 0..255 levels, the verifier's PNG put through the job's encoder). The bound must
hold for a render in a mode nobody measured, so it is set over the widest honest spread seen
across the modes this CPU can run (bf16, CPU float16, the quantization modes, threads) —
an assumption for a GPU mode (CUDA float16 and bf16 round no coarser than CPU bf16; fp8 is not
covered), stated in docs/VERIFICATION.md.

Measured with the shipped model `sogni-shapes-64` (64x64, 8 steps, guidance 5, jobs cycling
through the backend's schedulers), float32 verifier at 1 thread:

- the honest distance per provider mode, for PNG, JPEG and WebP jobs; the tolerance per format
  is `SAFETY` x the largest calibration distance of any mode; the false rejections among the
  held-out honest checks;
- the detection of each cheat (another model, a near model, 25% / all but one of the steps
  skipped, another seed, noise, replays), delivered in each format;
- the cost: one re-render is one render (the verifier's), against the step check's fraction.

Run: ``.venv/bin/python -m bench rerender`` (writes its section of BENCHMARKS.md) or
``.venv/bin/python -m bench.rerender_tolerance [--quick]`` (prints only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common as common
from bench import image_tolerance as it
from bench import trajectory_tolerance as tt
from bench.trajectory_tolerance import BF16, FP16, FP32, INT8, Job, Mode, Provider

SAFETY = 2.0
"""Tolerance = this x the largest honest calibration distance over all modes: the spread
between modes is a whole trajectory's drift (not one step's rounding), bounded by the
coarsest mode's rounding, so it does not grow 10x with the next honest job as a near-zero
step distance can; 2x the coarsest mode measured, the rule `LOSSY_SAFETY` uses."""
FORMATS = ("png", "jpeg", "webp")
PROVIDERS: tuple[Provider, ...] = (
    Provider(FP32, threads=2),
    Provider(FP32, batch=2),
    Provider(BF16),
    Provider(BF16, threads=2),
    Provider(FP16),
    Provider(INT8),
    Provider(Mode(quantize="int8-dynamic")),
    Provider(Mode(quantize="quanto-int8")),
    Provider(Mode(quantize="quanto-int4")),
)
CHEATS = tt.CHEATS
"""The step checks' cheats, each delivered as the image it renders."""


@dataclass(frozen=True)
class Settings:
    calibration: int = 24  # jobs per provider
    held_out: int = 1000  # honest checks, spread over the providers and formats
    cheat_jobs: int = 40
    quick: bool = False


QUICK = Settings(calibration=3, held_out=54, cheat_jobs=6, quick=True)


def _pixels(pipe: Any, job: Job, base: Any, *, threads: int = 1, **kw: Any) -> np.ndarray:
    rendered, _ = it.render(pipe, [job], base, threads=threads, **kw)
    return rendered[0][2]


def _honest(p: Provider, job: Job, partner: Job, pipe: Any, base: Any) -> np.ndarray:
    batch = [job] if p.batch == 1 else [job, Job(partner.prompt, partner.seed, job.scheduler)]
    return it.render(pipe, batch, base, threads=p.threads)[0][0][2]


def _distances(delivered: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The coordinator's distance for the same pixels delivered as a PNG, JPEG, WebP job."""
    ref = it.png(reference)
    return {f: it.distance(it.png(delivered, f), ref, f) for f in FORMATS}


def _cheat(
    cheat: str, job: Job, other: Job, pipes: dict[str, Any], base: Any, rng: random.Random
) -> np.ndarray:
    own = pipes["own"]
    if cheat.startswith("another model (tiny"):
        return _pixels(pipes["tiny"], job, base)
    if cheat.startswith("another model (shapes"):
        return _pixels(pipes["perturbed"], job, base)
    if cheat == "25% of steps skipped":
        skipped = set(rng.sample(range(1, tt.STEPS), tt.STEPS // 4))
        with tt.reused_unet_outputs(own, set(range(tt.STEPS)) - skipped):
            return _pixels(own, job, base)
    if cheat == "all steps but one skipped":
        with tt.reused_unet_outputs(own, {0}):
            return _pixels(own, job, base)
    if cheat == "another seed":
        return _pixels(own, job, base, seeds=[(job.seed + 1) % 2**32])
    if cheat == "pure noise":
        g = np.random.default_rng(job.seed)
        return g.integers(0, 256, size=(tt.SIZE, tt.SIZE, 3), dtype=np.uint8)
    if cheat == "replay (other prompt, other seed)":
        return _pixels(own, Job(other.prompt, other.seed, job.scheduler), base)
    if cheat == "replay (other prompt, same seed)":
        return _pixels(own, Job(other.prompt, job.seed, job.scheduler), base)
    raise ValueError(cheat)


def measure(s: Settings) -> dict[str, Any]:
    from sogni_node.models.tiny import ensure_tiny_model

    rng = random.Random(20261201)
    providers = PROVIDERS[:3] + PROVIDERS[4:5] if s.quick else PROVIDERS
    per = s.calibration + -(-s.held_out // (len(providers) * len(FORMATS)))
    jobs = tt.make_jobs(per, rng)
    partners = tt.make_jobs(per, rng)
    ref_pipe = tt.load_pipe(tt.shapes_path(), FP32)
    base = dict(ref_pipe.scheduler.config)
    started = time.perf_counter()
    refs = [_pixels(ref_pipe, j, base) for j in jobs]
    render_s = (time.perf_counter() - started) / len(jobs)
    honest: dict[str, list[dict[str, float]]] = {}
    for p in providers:
        t0 = time.perf_counter()
        pipe = ref_pipe if p.mode == FP32 else tt.load_pipe(tt.shapes_path(), p.mode)
        honest[p.name] = [
            _distances(_honest(p, j, q, pipe, base), r)
            for j, q, r in zip(jobs, partners, refs, strict=True)
        ]
        print(f"rerender: {p.name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    cheat_jobs = tt.make_jobs(s.cheat_jobs, rng)
    others = tt.make_jobs(s.cheat_jobs, rng)
    cheats: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rerender-tiny-") as tmp:
        pipes = {
            "own": ref_pipe,
            "tiny": tt.load_pipe(ensure_tiny_model(Path(tmp))),
            "perturbed": tt.load_pipe(tt.shapes_path(), FP32, weight_noise=0.01),
        }
        cheat_refs = [_pixels(ref_pipe, j, base) for j in cheat_jobs]
        for cheat in CHEATS:
            crng = random.Random(cheat)
            cheats[cheat] = [
                _distances(_cheat(cheat, j, o, pipes, base, crng), r)
                for j, o, r in zip(cheat_jobs, others, cheat_refs, strict=True)
            ]
    return {"calibration": s.calibration, "honest": honest, "cheats": cheats, "render_s": render_s}


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    """The proposed tolerance per format (`SAFETY` x the largest calibration distance of the
    covered modes), its false rejections among the held-out honest checks, and each cheat's
    detection at the proposed and at the shipped tolerance."""
    from sogni_coordinator.rerender_verify import RERENDER_TOLERANCES, rerender_weights

    cal = m["calibration"]
    declared = {p.name: p.mode.declared("cpu") for p in PROVIDERS}
    covered = {n: rows for n, rows in m["honest"].items() if not rerender_weights(declared[n])}
    calmax = {f: max(h[f] for rows in covered.values() for h in rows[:cal]) for f in FORMATS}
    tol = {f: round(max(1.0, SAFETY * calmax[f]), 1) for f in FORMATS}
    held = [h for rows in covered.values() for h in rows[cal:]]
    shipped = {f: RERENDER_TOLERANCES[f] for f in FORMATS}

    def caught(rows: Sequence[dict[str, float]], t: dict[str, float]) -> dict[str, float]:
        return {f: sum(r[f] > t[f] for r in rows) / len(rows) for f in FORMATS}

    return {
        "calibration_max": calmax,
        "all_max": {f: max(h[f] for rows in covered.values() for h in rows) for f in FORMATS},
        "tolerance": tol,
        "shipped": shipped,
        "held_out": len(held) * len(FORMATS),
        "rejected": {f: sum(h[f] > tol[f] for h in held) for f in FORMATS},
        "rejected_shipped": {f: sum(h[f] > shipped[f] for h in held) for f in FORMATS},
        "excluded": sorted(set(m["honest"]) - set(covered)),
        "caught": {c: caught(rows, tol) for c, rows in m["cheats"].items()},
        "caught_shipped": {c: caught(rows, shipped) for c, rows in m["cheats"].items()},
    }


def _worst(rows: Sequence[dict[str, float]], f: str) -> float:
    return max(r[f] for r in rows)


def render_markdown(m: dict[str, Any], command: str, seconds: float) -> str:
    x = summarise(m)
    tol, shipped = x["tolerance"], x["shipped"]
    rows = [
        (name, *(f"{common.median(r[f] for r in hs):.2f} / {_worst(hs, f):.2f}" for f in FORMATS))
        for name, hs in m["honest"].items()
    ]

    def pct(v: float) -> str:
        return f"{100 * v:.0f}%"

    crows = [
        (
            cheat,
            *(
                f"{min(r[f] for r in hs):.1f}, {pct(x['caught'][cheat][f])} / "
                f"{pct(x['caught_shipped'][cheat][f])}"
                for f in FORMATS
            ),
        )
        for cheat, hs in m["cheats"].items()
    ]
    n_jobs = len(next(iter(m["honest"].values())))
    lines = [
        "## Whole re-render check: unmeasured modes and receipts without a trajectory",
        "",
        f"Command: `{command}` ({seconds:.0f} s). A receipt the step checks cannot cover (a "
        "declared mode with no measured step tolerance, such as CUDA float16, or no committed "
        "trajectory) is checked by a whole re-render: a node of another wallet renders the job "
        "again in float32 and the coordinator compares the delivered image with it (block "
        "distance, 0..255 levels, the verifier's PNG through the job's encoder; "
        "`sogni_coordinator.rerender_verify`, docs/VERIFICATION.md). Model `sogni-shapes-64`, "
        "64x64, 8 steps, guidance 5, schedulers cycled; reference float32, 1 thread, this CPU.",
        "",
        f"Honest distance per provider (median / max over {n_jobs} jobs):",
        "",
        common.table(("provider", *FORMATS), rows),
        "",
        "Re-rendered with the worker's own weights instead (`rerender_verify.rerender_weights`"
        ", next section), so not in the bound: "
        + (", ".join(x["excluded"]) or "none")
        + ". A 4-bit mode's honest render is another picture on some jobs (over pure noise's "
        "distance) against plain float32 weights, so no bound could pass it and not every "
        "cheat.",
        "",
        f"Proposed tolerance = {SAFETY:g} x the largest calibration distance of the covered "
        f"modes ({m['calibration']} jobs per provider): "
        + ", ".join(f"{f} {tol[f]:g} (max {x['calibration_max'][f]:.2f})" for f in FORMATS)
        + "; largest over all covered honest jobs: "
        + ", ".join(f"{f} {x['all_max'][f]:.2f}" for f in FORMATS)
        + f". Held-out honest checks over it: {sum(x['rejected'].values())} of "
        f"{x['held_out']}; over the shipped `RERENDER_TOLERANCES` ("
        + ", ".join(f"{f} {shipped[f]:g}" for f in FORMATS)
        + f"): {sum(x['rejected_shipped'].values())} of {x['held_out']}.",
        "",
        f"Detection per checked job ({len(next(iter(m['cheats'].values())))} jobs per cheat; "
        "smallest distance, share caught at the proposed / the shipped tolerance):",
        "",
        common.table(("cheat", *FORMATS), crows),
        "",
        f"Cost: one check is one float32 render on the verifier ({m['render_s'] * 1000:.0f} ms "
        "here) plus the compare, i.e. about 1.0 of a render per checked job (x the sampling "
        "rate overall), against 0.4-0.9 for the step checks of a measured mode.",
    ]
    return "\n".join(lines)


SAME_WEIGHTS: tuple[tuple[str, Mode], ...] = (
    ("float32+quanto-int4", Mode(quantize="quanto-int4")),
    ("bfloat16+quanto-int4", Mode("bfloat16", "quanto-int4")),
    ("float32+fp8", Mode(quantize="fp8")),
    ("bfloat16+fp8", Mode("bfloat16", "fp8")),
)
"""The modes whose re-render reproduces the worker's weights (`rerender_verify.rerender_weights`):
each as the worker's weights (`<dtype>+<mode>`) and how an honest node runs it."""


def _quantized_pipe(mode: Mode) -> Any:
    """A pipeline in `mode`. fp8 is loaded as torchao makes it on any device: its weight-only
    kernels run on this CPU too (the node refuses fp8 off CUDA only for speed and support)."""
    from sogni_node.render import quantize

    pipe = tt.load_pipe(tt.shapes_path(), Mode(mode.dtype))
    quantize._quantize_module(quantize.denoiser(pipe), mode.quantize)
    return pipe


def same_weights(n: int) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """Honest drift of the 4-bit and fp8 modes over `n` jobs, (median, max) per format:
    against a plain float32 re-render (why they cannot share its bound) and against a float32
    re-render computing with the worker's own rounded weights (`quantize.weights_as`, what a
    `+rerender-weights` verifier does)."""
    from sogni_node.render.quantize import weights_as

    jobs = tt.make_jobs(n, random.Random(20261201))
    ref = tt.load_pipe(tt.shapes_path(), FP32)
    base = dict(ref.scheduler.config)
    plain = [_pixels(ref, j, base) for j in jobs]
    out: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for weights, mode in SAME_WEIGHTS:
        t0 = time.perf_counter()
        pipe = _quantized_pipe(mode)
        honest = [_pixels(pipe, j, base) for j in jobs]
        with weights_as(ref, weights):
            same = [_pixels(ref, j, base) for j in jobs]
        out[weights] = {}
        for against, refs in (("float32", plain), ("same weights", same)):
            rows = [_distances(h, r) for h, r in zip(honest, refs, strict=True)]
            out[weights][against] = {
                f: (common.median(r[f] for r in rows), _worst(rows, f)) for f in FORMATS
            }
        print(f"same weights: {weights} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def same_weights_markdown(
    result: dict[str, dict[str, dict[str, tuple[float, float]]]],
    jobs: int,
    command: str,
    seconds: float,
) -> str:
    from sogni_coordinator.rerender_verify import RERENDER_TOLERANCES

    rows = [
        (
            weights,
            against,
            *(f"{row[f][0]:.2f} / {row[f][1]:.2f}" for f in FORMATS),
        )
        for weights, by in result.items()
        for against, row in by.items()
    ]
    same = [row[f][1] for by in result.values() for f in FORMATS for row in [by["same weights"]]]
    plain = [row[f][1] for by in result.values() for f in FORMATS for row in [by["float32"]]]
    bound = min(RERENDER_TOLERANCES.values())
    return "\n".join(
        [
            "## Whole re-render with the worker's weights: 4-bit and fp8 modes",
            "",
            f"Command: `{command}` ({seconds:.0f} s). A 4-bit or fp8 node's receipt is "
            "re-rendered in float32 by a node naming `+rerender-weights`, computing with the "
            "worker's own weights: cast to its dtype, quantized by its mode's library, "
            "dequantized (`quantize.weights_as`, `rerender_verify.rerender_weights`). Honest "
            "nodes here: the mode as the node loads it (fp8 through torchao's weight-only "
            "kernels, which run on this CPU; the node refuses fp8 off CUDA, so a GPU's fp8 "
            "kernels are not measured). Distance as in the section above (median / max over "
            f"{jobs} jobs, 0..255 levels), "
            "against a plain float32 re-render and against the same-weights one:",
            "",
            common.table(("worker's weights", "re-rendered against", *FORMATS), rows),
            "",
            f"Largest against the same weights: {max(same):.2f} levels (bound {bound:g}; "
            f"{bound / max(max(same), 1e-9):.1f}x margin); against plain float32: "
            f"{max(plain):.2f}. With float32 compute the same weights give the same picture; "
            "with bf16 compute the drift left is bf16's, which the bound above was set over.",
        ]
    )


def run_same_weights(quick: bool, command: str = "python -m bench rerender_weights") -> str:
    started = time.perf_counter()
    jobs = 6 if quick else 62
    result = same_weights(jobs)
    return same_weights_markdown(result, jobs, command, time.perf_counter() - started)


def run(quick: bool, command: str = "python -m bench rerender") -> str:
    started = time.perf_counter()
    m = measure(QUICK if quick else Settings())
    raw = Path(tempfile.gettempdir()) / f"rerender_tolerance-{int(time.time())}.json"
    raw.write_text(json.dumps(m, indent=1, default=float))
    print(f"rerender: raw results in {raw}", file=sys.stderr)
    return render_markdown(m, command, time.perf_counter() - started)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples (about 2 min)")
    parser.add_argument(
        "--from-json", type=Path, help="print the section from a run's raw results (no measuring)"
    )
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--same-weights",
        type=int,
        metavar="N",
        help="only the 4-bit and fp8 modes' drift over N jobs, against plain float32 and "
        "against float32 with the worker's rounded weights",
    )
    ns = parser.parse_args()
    if ns.same_weights:
        t0 = time.perf_counter()
        if ns.from_json:  # the JSON line a run printed first
            result = json.loads(ns.from_json.read_text().splitlines()[0])
        else:
            result = same_weights(ns.same_weights)
            print(json.dumps(result))
        cmd = f"python -m bench.rerender_tolerance --same-weights {ns.same_weights}"
        seconds = ns.seconds or time.perf_counter() - t0
        print(same_weights_markdown(result, ns.same_weights, cmd, seconds))
        sys.exit(0)
    cmd = "python -m bench.rerender_tolerance" + (" --quick" if ns.quick else "")
    if ns.from_json:
        print(render_markdown(json.loads(ns.from_json.read_text()), cmd, ns.seconds))
    else:
        print(run(ns.quick, cmd))
