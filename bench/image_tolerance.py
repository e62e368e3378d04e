"""Image check: the honest distance between a delivered image and a verifier's decode of the
committed final latent, a tolerance, and what it catches.

A worker commits its trajectory's final latent x_N and delivers an image; a verifier node
decodes x_N with the model's VAE as the backend does (`sogni_node.verify.decode_check`) and
the coordinator compares both (`sogni_coordinator.image_verify.image_distance`: the largest
mean absolute difference over any 8x8 block and channel, in 0..255 levels). This measures, on
this machine, with the shipped model `sogni-shapes-64` (64x64, 8 steps, guidance 5, jobs
cycling through the backend's schedulers):

- the honest distance across what honest workers differ in: thread count (1 vs 2), a batch
  of 2 (the VAE decodes two latents at once), the x86-64 code paths of other CPUs (in a
  subprocess, as `python -m bench tolerance` does), and the declared numeric mode (float32,
  bfloat16, the CPU quantization modes). The verifier decodes in the declared mode, 1 thread,
  batch 1, this CPU's own code paths;
- what the lossy output formats add (JPEG and WebP at the backend's fixed settings);
- tolerances (per mode: SAFETY x the largest calibration distance, at least 1 level; per lossy
  format: FORMAT_SAFETY x its largest calibration distance), then the false rejections among
  >= 1,000 held-out honest checks (other prompts and seeds);
- the detection of each cheat (the worker commits an honest trajectory and delivers another
  image): another seed's image, another prompt's image, a replayed older image, pure noise,
  the decode of the second-to-last latent (a truncated schedule), a JPEG re-encode of the
  honest image, and small painted patches (8x8 and 4x4 pixels);
- the cost of one check (the verifier's decode plus the coordinator's compare) against the
  render's time (float32, 1 thread, same run).

Run: ``.venv/bin/python -m bench image`` (writes its section of BENCHMARKS.md; about 4 minutes
here, 1 with --quick) or ``.venv/bin/python -m bench.image_tolerance [--quick]`` (prints only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _common as common
from bench import trajectory_tolerance as tt
from bench.trajectory_tolerance import BF16, FP32, INT8, Job, Mode, Provider

REPO = Path(__file__).resolve().parent.parent
SAFETY = 10.0
FORMAT_SAFETY = 2.0
FLOOR = 1.0
"""No mode's tolerance is below one level: an all-zero calibration must not reject the next
honest rounding of one pixel."""

PROVIDERS: tuple[Provider, ...] = (
    Provider(FP32),
    Provider(FP32, threads=2),
    Provider(FP32, batch=2),
    Provider(FP32, cpu="all-AVX2", env=tt.ALL_AVX2, needs="avx2"),
    Provider(FP32, cpu="baseline", env=tt.BASELINE),
    Provider(BF16),
    Provider(BF16, threads=2),
    Provider(BF16, cpu="all-AVX2", env=tt.ALL_AVX2, needs="avx2"),
    Provider(INT8),
    Provider(INT8, threads=2),
    Provider(Mode(quantize="int8-dynamic")),
    Provider(Mode(quantize="quanto-int8")),
    Provider(Mode(quantize="quanto-int4")),
)
QUICK_PROVIDERS = ("fp32, 1 thread", "fp32, 2 threads", "fp32, 1 thread, batch 2", "bf16, 1 thread")
FORMATS = ("jpeg", "webp")
CHEATS = (
    "another seed's image",
    "another prompt's image",
    "replayed older image",
    "pure noise",
    "truncated schedule (x_{N-1} decoded)",
    "JPEG re-encode (quality 92)",
    "8x8 patch painted",
    "4x4 patch painted",
)


@dataclass(frozen=True)
class Settings:
    calibration_renders: int = 12  # per provider
    honest_checks: int = 1000  # held out, spread over the providers
    cheat_jobs: int = 50
    cost_runs: int = 20
    quick: bool = False


QUICK = Settings(calibration_renders=3, honest_checks=100, cheat_jobs=8, cost_runs=6, quick=True)

Rendered = tuple[torch.Tensor, torch.Tensor, np.ndarray]
"""(x_{N-1}, x_N) float32 (1, C, h, w), and the delivered pixels HxWx3 uint8."""


def render(
    pipe: Any,
    jobs: Sequence[Job],
    base: Any,
    *,
    threads: int = 1,
    seeds: Sequence[int] | None = None,
) -> tuple[list[Rendered], float]:
    """Render `jobs` (one batch, one scheduler) as the backend does (pinned noise,
    `output_type="np"`, the backend's rounding); the last two latents and the pixels of each."""
    from sogni_node.render.encoding import float_image_to_uint8
    from sogni_node.render.noise import initial_latents, step_generator, step_seed
    from sogni_node.verify.step_check import latent_shape

    seeds = [j.seed for j in jobs] if seeds is None else list(seeds)
    torch.set_num_threads(threads)
    pipe.scheduler = tt.make_scheduler(base, jobs[0].scheduler)
    shape = latent_shape(pipe, width=tt.SIZE, height=tt.SIZE)
    noise = torch.cat([initial_latents(s, shape) for s in seeds])
    generators = [step_generator(s, 1) for s in seeds]
    last: list[list[torch.Tensor]] = [[] for _ in jobs]

    def step_end(_p: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        for row, latents in zip(last, kwargs["latents"], strict=True):
            row[:] = [*row[-1:], latents.unsqueeze(0).to(torch.float32).clone()]
        for g, s in zip(generators, seeds, strict=True):
            g.manual_seed(step_seed(s, i + 2))
        return kwargs

    single = len(jobs) == 1
    started = time.perf_counter()
    with tt.quiet():
        out = pipe(
            prompt=jobs[0].prompt if single else [j.prompt for j in jobs],
            negative_prompt=None if single else ["" for _ in jobs],
            num_inference_steps=tt.STEPS,
            guidance_scale=tt.GUIDANCE,
            width=tt.SIZE,
            height=tt.SIZE,
            generator=generators[0] if single else generators,
            latents=noise.to(pipe.unet.dtype),
            output_type="np",
            callback_on_step_end=step_end,
        )
    seconds = time.perf_counter() - started
    images = np.asarray(out.images)
    return [
        (row[0], row[1], float_image_to_uint8(img)) for row, img in zip(last, images, strict=True)
    ], seconds


def provide(provider: Provider, jobs: Sequence[Job], pipe: Any, base: Any) -> list[Rendered]:
    out: list[Rendered] = []
    partners = tt.make_jobs(len(jobs), random.Random(len(jobs)))
    for job, partner in zip(jobs, partners, strict=True):
        batch = [job]
        if provider.batch == 2:
            batch.append(Job(partner.prompt, partner.seed, job.scheduler))
        out.append(render(pipe, batch, base, threads=provider.threads)[0][0])
    return out


def provide_in_subprocess(provider: Provider, jobs: Sequence[Job], workdir: Path) -> list[Rendered]:
    """Render in a child process whose torch/oneDNN/MKL take `provider.env`'s code path."""
    out = workdir / f"{provider.mode.name}-{provider.cpu}.pt"
    env = {k: v for k, v in os.environ.items() if k not in tt._ISA_KEYS}
    env.update(provider.env)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "bench.image_tolerance", "--child", str(out)]
    argv += ["--dtype", provider.mode.dtype, "--quantize", provider.mode.quantize]
    done = subprocess.run(
        argv, input=json.dumps([j.__dict__ for j in jobs]), env=env, cwd=REPO,
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{provider.name} failed:\n{done.stderr[-4000:]}")
    rows: list[Rendered] = torch.load(out, weights_only=False)
    return rows


def _child(out: Path, mode: Mode) -> None:
    jobs = [Job(**d) for d in json.loads(sys.stdin.read())]
    pipe = tt.load_pipe(tt.shapes_path(), mode)
    torch.save(provide(Provider(mode), jobs, pipe, dict(pipe.scheduler.config)), out)


# --- the check, as the network runs it --------------------------------------------------------
def png(pixels: np.ndarray, fmt: str = "png") -> bytes:
    from sogni_node.render.encoding import encode_image

    return encode_image(pixels, fmt)


def decode(ver: Any, latent: torch.Tensor) -> bytes:
    """The verifier's answer: its decode of `latent` as a PNG (1 thread)."""
    from sogni_node.verify.decode_check import decode_png

    torch.set_num_threads(1)
    return decode_png(ver, latent, width=tt.SIZE, height=tt.SIZE)  # in the VAE's dtype


def distance(delivered: bytes, reference: bytes) -> float:
    from sogni_coordinator.image_verify import image_distance

    return image_distance(delivered, reference, tt.SIZE, tt.SIZE).block


def cheat_image(
    cheat: str, job: Job, honest: Rendered, older: Rendered, ver: Any, pipe: Any, base: Any,
    rng: random.Random,
) -> bytes:  # fmt: skip
    """What a worker that committed `honest`'s trajectory delivers when cheating this way."""
    pixels = honest[2]
    if cheat == "another seed's image":
        return png(render(pipe, [job], base, seeds=[(job.seed + 1) % 2**32])[0][0][2])
    if cheat == "another prompt's image":
        other = tt.make_jobs(1, rng)[0]
        return png(render(pipe, [Job(other.prompt, job.seed, job.scheduler)], base)[0][0][2])
    if cheat == "replayed older image":
        return png(older[2])
    if cheat == "pure noise":
        return png(np.random.default_rng(job.seed).integers(0, 256, pixels.shape, dtype=np.uint8))
    if cheat.startswith("truncated"):
        return decode(ver, honest[0])
    if cheat.startswith("JPEG"):
        return png(pixels, "jpeg")
    side = 8 if cheat.startswith("8x8") else 4
    edited = pixels.copy()
    y, x = rng.randrange(tt.SIZE - side + 1), rng.randrange(tt.SIZE - side + 1)
    edited[y : y + side, x : x + side] = rng.choice(((255, 255, 255), (0, 0, 0), (255, 0, 0)))
    return png(edited)


def _tolerance(honest_max: float, safety: float, floor: float) -> float:
    """safety x the largest honest value rounded up to two significant digits, >= floor."""
    value = max(honest_max * safety, floor)
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(round(value / 10**exponent, 9)) * 10**exponent


# --- the run ----------------------------------------------------------------------------------
def measure(settings: Settings) -> dict[str, Any]:
    rng = random.Random(20261130)
    pipes: dict[Mode, Any] = {FP32: tt.load_pipe(tt.shapes_path())}
    base = dict(pipes[FP32].scheduler.config)

    def pipe_for(mode: Mode) -> Any:
        if mode not in pipes:
            pipes[mode] = tt.load_pipe(tt.shapes_path(), mode)
        return pipes[mode]

    providers = [p for p in PROVIDERS if not settings.quick or p.name in QUICK_PROVIDERS]
    skipped = {p.name: why for p in providers if (why := tt.unavailable(p))}
    providers = [p for p in providers if p.name not in skipped]
    calibration = {p.name: tt.make_jobs(settings.calibration_renders, rng) for p in providers}
    held: dict[str, list[Job]] = {p.name: [] for p in providers}
    for i, job in enumerate(tt.make_jobs(settings.honest_checks, rng)):
        held[providers[i % len(providers)].name].append(job)

    honest: dict[str, dict[str, Any]] = {}
    fmt_cal: dict[str, list[float]] = {f: [] for f in FORMATS}
    fmt_held: dict[str, list[float]] = {f: [] for f in FORMATS}
    with tempfile.TemporaryDirectory(prefix="image-tolerance-") as tmp:
        for p in providers:
            started = time.perf_counter()
            jobs = calibration[p.name] + held[p.name]
            if p.env:
                rows = provide_in_subprocess(p, jobs, Path(tmp))
            else:
                rows = provide(p, jobs, pipe_for(p.mode), base)
            ver = pipe_for(p.mode)
            n_cal = len(calibration[p.name])
            ds: list[float] = []
            for i, (_prev, final, pixels) in enumerate(rows):
                ref = decode(ver, final)
                ds.append(distance(png(pixels), ref))
                if p.mode == FP32:  # what a lossy format adds, on top of the mode's spread
                    for f in FORMATS:
                        (fmt_cal if i < n_cal else fmt_held)[f].append(
                            distance(png(pixels, f), ref)
                        )
            honest[p.name] = {"mode": p.mode.name, "n_cal": n_cal, "d": ds}
            print(
                f"image: {p.name}: max {max(ds):.3g} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )

    modes = list(dict.fromkeys(p.mode.name for p in providers))
    worst = {
        m: max(max(h["d"][: h["n_cal"]]) for h in honest.values() if h["mode"] == m) for m in modes
    }
    tol = {m: _tolerance(worst[m], SAFETY, FLOOR) for m in modes}
    fmt_worst = {f: max(fmt_cal[f]) for f in FORMATS}
    fmt_tol = {f: _tolerance(fmt_worst[f], FORMAT_SAFETY, 0.0) for f in FORMATS}

    # cheats: the worker (fp32) commits an honest trajectory and delivers another image
    own = pipes[FP32]
    cheat_jobs = tt.make_jobs(settings.cheat_jobs + 1, rng)
    cheats: dict[str, list[float]] = {c: [] for c in CHEATS}
    started = time.perf_counter()
    rendered = [render(own, [j], base)[0][0] for j in cheat_jobs]
    for i, job in enumerate(cheat_jobs[1:], start=1):
        honest_row = rendered[i]
        ref = decode(own, honest_row[1])
        for c in CHEATS:
            img = cheat_image(c, job, honest_row, rendered[i - 1], own, own, base, rng)
            cheats[c].append(distance(img, ref))
    print(f"image: cheats ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # cost: one render vs one check (decode + PNG + compare), float32, 1 thread, interleaved
    cost: dict[str, list[float]] = {"render": [], "decode": [], "compare": []}
    for i, job in enumerate(tt.make_jobs(settings.cost_runs + 1, rng)):
        (row,), seconds = render(own, [job], base)
        t0 = time.perf_counter()
        ref = decode(own, row[1])
        t1 = time.perf_counter()
        distance(png(row[2]), ref)
        t2 = time.perf_counter()
        if i:
            cost["render"].append(seconds)
            cost["decode"].append(t1 - t0)
            cost["compare"].append(t2 - t1)
    return {
        "settings": settings.__dict__,
        "providers": [p.name for p in providers],
        "skipped": skipped,
        "honest": honest,
        "worst": worst,
        "tolerance": tol,
        "formats": {"cal": fmt_cal, "held": fmt_held, "worst": fmt_worst, "tolerance": fmt_tol},
        "cheats": cheats,
        "cost": cost,
    }


# --- markdown ---------------------------------------------------------------------------------
def _v(x: float) -> str:
    return "inf" if math.isinf(x) else ("0" if x == 0 else f"{x:.3g}")


def render_markdown(m: dict[str, Any], command: str, seconds: float) -> str:
    s, tol = m["settings"], m["tolerance"]
    n_held = sum(len(h["d"]) - h["n_cal"] for h in m["honest"].values())
    lines = [
        "## Image check: delivered image vs the committed final latent's decode",
        "",
        f"Command: `{command}` ({seconds:.0f} s). Model `sogni-shapes-64` (64x64, "
        f"{tt.STEPS} steps, guidance {tt.GUIDANCE:g}), jobs cycling through the schedulers, "
        "random shape captions and seeds. The worker renders as the backend does and delivers "
        "a PNG; a verifier decodes the worker's final latent x_N in the declared mode, 1 "
        "thread, batch 1, this CPU's code paths (`sogni_node.verify.decode_check`); the "
        "distance is the largest mean absolute difference over any 8x8 block and channel, in "
        "0..255 levels (`sogni_coordinator.image_verify.image_distance`). See "
        "docs/IMAGE_CHECK.md.",
        "",
        f"Sizes: {s['calibration_renders']} calibration renders per provider, {n_held} "
        f"held-out honest checks (other prompts and seeds, spread over the providers), "
        f"{s['cheat_jobs']} jobs per cheat. Tolerance per declared mode = {SAFETY:g} x the "
        f"largest calibration distance, at least {FLOOR:g} level; per lossy format, "
        f"{FORMAT_SAFETY:g} x the largest calibration distance its encoding adds, added to "
        "the mode's."
        + (" **Quick run**: small samples; use the full run's numbers." if s["quick"] else "")
        + (
            f" Run with OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (idle OpenMP threads "
            "sleep: on a loaded 2-core machine spinning made 2-thread renders 20x slower; "
            "the pixels do not depend on it)."
            if os.environ.get("OMP_WAIT_POLICY")
            else ""
        ),
        "",
        "### Honest distance per provider",
        "",
    ]
    rows = []
    rejected = 0
    for name in m["providers"]:
        h = m["honest"][name]
        d, n = h["d"], h["n_cal"]
        bad = sum(x > tol[h["mode"]] for x in d[n:])
        rejected += bad
        rows.append(
            (name, len(d), _v(common.median(d)), _v(max(d)), sum(x > 0 for x in d),
             f"{bad} / {len(d) - n}")
        )  # fmt: skip
    lines.append(
        common.table(("provider", "checks", "median", "max", "nonzero", "held-out rejected"), rows)
    )
    if m["skipped"]:
        lines += ["", "Not run here: " + "; ".join(f"{k} ({v})" for k, v in m["skipped"].items())]
    f = m["formats"]
    lines += [
        "",
        "### Tolerance",
        "",
        common.table(
            ("declared mode", "max honest (calibration)", "tolerance (PNG)"),
            [(mode, _v(m["worst"][mode]), f"**{_v(t)}**") for mode, t in tol.items()],
        ),
        "",
        common.table(
            (
                "output format (fp32 workers)",
                "max added (calibration)",
                "added tolerance",
                "held-out max",
                "held-out over fp32 + format tol.",
            ),
            [
                (
                    fmt,
                    _v(f["worst"][fmt]),
                    f"**{_v(f['tolerance'][fmt])}**",
                    _v(max(f["held"][fmt])),
                    f"{sum(x > tol['fp32'] + f['tolerance'][fmt] for x in f['held'][fmt])} / "
                    f"{len(f['held'][fmt])}",
                )
                for fmt in FORMATS
            ],
        ),
        "",
        f"Held-out honest PNG checks over their mode's tolerance: {rejected} of {n_held}. "
        f"Floor, 0 false rejections in 1,000 honest checks: **"
        f"{'met' if n_held >= 1000 and rejected == 0 else 'not met'}**"
        + (" (fewer than 1,000 checks in a quick run)." if n_held < 1000 else "."),
        "",
        "### Detection per checked job",
        "",
        "The worker (fp32) commits an honest trajectory and delivers another image. Caught: "
        "over the fp32 PNG tolerance, and (last column) over fp32 + the JPEG allowance, "
        "as for a job asking for JPEG.",
        "",
    ]
    t_png = tol["fp32"]
    t_jpeg = t_png + f["tolerance"]["jpeg"]
    crow = []
    for cheat, ds in m["cheats"].items():
        crow.append(
            (cheat, f"{_v(min(ds))} / {_v(common.median(ds))}",
             f"{100 * sum(x > t_png for x in ds) / len(ds):.0f}%",
             f"{100 * sum(x > t_jpeg for x in ds) / len(ds):.0f}%")
        )  # fmt: skip
    lines += [
        common.table(
            (
                "cheat",
                "distance min / median",
                f"caught (PNG, tol. {_v(t_png)})",
                f"caught (JPEG job, tol. {_v(t_jpeg)})",
            ),
            crow,
        ),
        "",
        "### Cost of one check",
        "",
    ]
    c = m["cost"]
    r, dec, cmp_ = (common.median(c[k]) for k in ("render", "decode", "compare"))
    lines += [
        common.table(
            (
                "render ms (baseline)",
                "verifier decode ms",
                "coordinator compare ms",
                "check / render",
            ),
            [
                (
                    f"{1000 * r:.0f}",
                    f"{1000 * dec:.1f}",
                    f"{1000 * cmp_:.2f}",
                    f"{(dec + cmp_) / r:.3f}",
                )
            ],
        ),
        "",
        f"Median of {s['cost_runs']} renders and checks after one warm-up, interleaved, "
        "float32, 1 thread. The render is the whole pipeline call; the check is one VAE "
        "decode and PNG encode on the verifier and two PNG decodes and the block compare on "
        "the coordinator (the network round trip is not counted).",
    ]
    return "\n".join(lines)


def run(quick: bool, command: str = "python -m bench image") -> str:
    started = time.perf_counter()
    m = measure(QUICK if quick else Settings())
    raw = Path(tempfile.gettempdir()) / f"image_tolerance-{int(time.time())}.json"
    raw.write_text(json.dumps(m, indent=1, default=float))
    print(f"image: raw results in {raw}", file=sys.stderr)
    return render_markdown(m, command, time.perf_counter() - started)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples (about 1 min)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        _child(ns.child, Mode(ns.dtype, ns.quantize))
    else:
        cmd = "python -m bench.image_tolerance" + (" --quick" if ns.quick else "")
        print(run(ns.quick, cmd))
