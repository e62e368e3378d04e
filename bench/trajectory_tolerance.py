"""Trajectory commitments: the honest distance of a re-run step, a tolerance, and what it catches.

A provider commits every latent x_0 .. x_n of a render; a verifier re-runs one step k from the
committed x_k (`sogni_node.verify.step_check.recompute_step`), measures
d = |x_{k+1} - x'_{k+1}| / |x_{k+1} - x_k|, and checks x_0 against the job's seed
(`start_distance`). This measures, on this machine, with the shipped trained model
`sogni-shapes-64` (64x64, 8 steps, guidance 5; jobs cycle through every scheduler the backend
offers):

- the honest distance across what honest nodes differ in: thread count (1 vs 2), a batch of 2
  (the job rendered next to another one), the x86-64 code paths of other CPUs (torch, oneDNN
  and MKL ISA forced in a subprocess, as `python -m bench cpuvar` does), and the numeric mode:
  float32, bfloat16, float16 (CPU float16: about 10x float32's time on a CPU without
  AVX512-FP16/AMX-FP16, as here) and every CPU quantization mode of
  `sogni_node.render.quantize`. Every
  honest render is checked twice: by a verifier in the provider's declared mode ("matched":
  1 thread, batch 1, this CPU's own code paths) and by a float32 verifier ("cross-mode");
- tolerances: SAFETY x the largest honest distance of a calibration set (one for matched
  checks; one per declared mode for cross-mode checks), then the false rejections among N
  further honest checks (other prompts and seeds);
- the detection rate per checked job of each cheat: another model (the tiny random-weight
  model; the shapes UNet with 1% weight noise), 25% of the steps skipped and all but one
  skipped (a skipped step reuses the last UNet output, the cheapest way to fake it and still
  commit a latent), another seed, pure noise, and a replayed older render (other prompt and
  seed; other prompt, same seed). Every step of every cheat job is re-run, so the rate for c
  random checks per job is exact: 1 - C(n - bad, c) / C(n, c) averaged over the jobs, with a
  failed x_0 check counted as caught;
- the cost of one check against the render's time (float32, 1 thread, same run).

Renders pin their randomness as the diffusers backend does (`sogni_node.render.noise`): x_0
from `initial_latents(seed, ...)`, and the noise of the backend's step k (1-based) from
`step_generator(seed, k)`; here the generators are re-seeded from the step callback, one per
image, so a batch of 2 draws each image's own noise.

Run: ``.venv/bin/python -m bench tolerance`` (writes its section of BENCHMARKS.md; 36
minutes on this 2-core machine under load with float16, whose CPU renders take 10x
float32's; 6 with --quick) or ``.venv/bin/python -m bench.trajectory_tolerance [--quick]``
(prints only). After a change to the tables only: ``.venv/bin/python -m
bench.trajectory_tolerance --from-json /tmp/trajectory_tolerance-<time>.json`` re-renders its
section of BENCHMARKS.md from a run's raw results (no measuring; other sections untouched);
``--extend-json RAW`` also measures the providers the run lacks (e.g. one added since) and
recomputes the tolerances with today's rules (bf16 and fp16 path-bound: `PATH_BOUND`); it
also runs the cheat regimes the run lacks (e.g. "declares fp16").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import _common as common
from sogni_coordinator.verification_config import VerificationConfig

REPO = Path(__file__).resolve().parent.parent

STEPS = 8
GUIDANCE = 5.0
SIZE = 64
SCHEDULER_NAMES = ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm")
SAFETY = 10.0
"""Proposed tolerance = SAFETY x the largest honest distance of the calibration set."""
PATH_BOUND = ("bf16", "fp16")
"""Modes checked only by a verifier on the provider's own CPU code path (the node declares
`bfloat16@<compute_path>` / `float16@<compute_path>`, `DiffusersBackend.dtype_name`): their
matched tolerance comes from the providers on the verifier's path alone; the other paths'
distances are shown, never checked against it."""
PATH_FLOOR = 5e-5
"""Least tolerance of a path-bound mode: the float32 one. Same-path bf16 and fp16 measured
exactly 0 (threads, batches), and an all-zero calibration must not reject the next rounding."""

CHECKS_PER_JOB = (1, 2, 4)
"""Random steps re-run per checked job in the detection table (and all of them)."""
POLICY = VerificationConfig()
"""The coordinator's default `[verification]` policy: the steps it re-runs per checked job of
STEPS steps (`steps_to_check`) get their own column and the floor's verdict."""

_ISA_KEYS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)
ALL_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
BASELINE = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
}


@dataclass(frozen=True)
class Mode:
    """A numeric mode a node declares in its receipts (`dtype_name`)."""

    dtype: str = "float32"
    quantize: str = "none"

    @property
    def name(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        return short if self.quantize == "none" else self.quantize

    def declared(self, path: str) -> str:
        """The string a node rendering in this mode on `path` declares (`dtype_name`), the key
        of `sogni_coordinator.verifiers.TOLERANCES`."""
        name = self.dtype if self.quantize == "none" else f"{self.dtype}+{self.quantize}"
        return f"{name}@{path}" if self.name in PATH_BOUND else name


FP32 = Mode()
BF16 = Mode("bfloat16")
FP16 = Mode("float16")
INT8 = Mode(quantize="int8")


@dataclass(frozen=True)
class Provider:
    """How an honest provider renders, as far as it changes the numbers."""

    mode: Mode
    threads: int = 1
    batch: int = 1
    cpu: str = ""  # a named CPU code path, rendered in a subprocess
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # a /proc/cpuinfo flag that code path needs

    @property
    def other_path(self) -> bool:
        """A path-bound mode on another code path than the verifier's: never its job."""
        return bool(self.cpu) and self.mode.name in PATH_BOUND

    @property
    def name(self) -> str:
        parts = [self.mode.name, f"{self.threads} thread{'s' if self.threads > 1 else ''}"]
        if self.batch > 1:
            parts.append(f"batch {self.batch}")
        if self.cpu:
            parts.append(f"CPU {self.cpu}")
        return ", ".join(parts)


def _variants(mode: Mode, *, same: bool, cpu: bool) -> list[Provider]:
    out = [Provider(mode)] if same else []
    out += [Provider(mode, threads=2), Provider(mode, batch=2)]
    if cpu:
        out.append(Provider(mode, cpu="all-AVX2", env=ALL_AVX2, needs="avx2"))
    return out


PROVIDERS: tuple[Provider, ...] = (
    *_variants(FP32, same=True, cpu=True),
    Provider(FP32, cpu="baseline", env=BASELINE),
    *_variants(BF16, same=True, cpu=True),
    Provider(BF16, threads=4),
    *_variants(FP16, same=True, cpu=True),
    Provider(FP16, cpu="baseline", env=BASELINE),
    Provider(FP16, threads=4),
    *_variants(INT8, same=True, cpu=True),
    *_variants(Mode(quantize="int8-dynamic"), same=False, cpu=False),
    *_variants(Mode(quantize="quanto-int8"), same=False, cpu=False),
    *_variants(Mode(quantize="quanto-int4"), same=False, cpu=False),
)
QUICK_PROVIDERS = (
    "fp32, 1 thread",
    "fp32, 2 threads",
    "fp32, 1 thread, batch 2",
    "fp32, 1 thread, CPU all-AVX2",
    "bf16, 2 threads",
    "bf16, 1 thread, CPU all-AVX2",
    "fp16, 2 threads",
    "fp16, 1 thread, CPU all-AVX2",
    "int8, 2 threads",
)


@dataclass(frozen=True)
class Settings:
    calibration_renders: int = 6  # per provider
    honest_checks: int = 1000  # held out, spread over the providers
    cheat_jobs: int = 25  # per cheat and regime
    cost_runs: int = 20
    quick: bool = False


QUICK = Settings(calibration_renders=2, honest_checks=112, cheat_jobs=3, cost_runs=6, quick=True)


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    scheduler: str
    negative_prompt: str = ""


def make_jobs(n: int, rng: random.Random) -> list[Job]:
    from sogni_node.models.train_shapes import random_scene

    names = SCHEDULER_NAMES
    return [
        Job(random_scene(rng, jitter=False).caption, rng.randrange(2**32), names[i % len(names)])
        for i in range(n)
    ]


# --- pipelines and renders --------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Mute diffusers/transformers chatter (config notes, progress bars, stderr prints)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from sogni_node.render.quantize import quiet_quant_imports

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    with contextlib.redirect_stderr(io.StringIO()), quiet_quant_imports():
        yield


def load_pipe(path: Path, mode: Mode = FP32, weight_noise: float = 0.0) -> Any:
    """The pipeline in `mode`; with `weight_noise`, its UNet's float32 weights first get
    Gaussian noise of that many times each tensor's standard deviation (a near model: a light
    fine-tune, another checkpoint of the same architecture)."""
    from diffusers import StableDiffusionPipeline

    from sogni_node.render.diffusers_backend import parse_dtype
    from sogni_node.render.quantize import quantize_pipeline

    with quiet():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        if weight_noise:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in pipe.unet.parameters():
                    if p.numel() > 1:
                        p.add_(torch.randn(p.shape, generator=g) * p.std() * weight_noise)
        pipe.to(dtype=parse_dtype(mode.dtype, "cpu"))
        if mode.quantize != "none":
            quantize_pipeline(pipe, mode.quantize)
    return pipe


def shapes_path() -> Path:
    from sogni_node.models.registry import SHAPES_DIR

    return SHAPES_DIR


def make_scheduler(base_config: Any, name: str) -> Any:
    from sogni_node.render.diffusers_backend import SCHEDULERS

    cls, overrides = SCHEDULERS[name]
    with quiet():
        return cls.from_config(base_config, **overrides)


Trajectory = list[torch.Tensor]
"""x_0 .. x_n of one image, each (1, C, H, W) float32 on the CPU."""


def render(
    pipe: Any,
    jobs: Sequence[Job],
    base_config: Any,
    *,
    threads: int = 1,
    seeds: Sequence[int] | None = None,
) -> tuple[list[Trajectory], float]:
    """Render `jobs` (one batch, one scheduler) with pinned noise, capturing every latent.

    `seeds` overrides the jobs' seeds (the 'another seed' cheat). Returns the trajectories and
    the seconds the pipeline call took.
    """
    from sogni_node.render.noise import initial_latents, step_generator, step_seed
    from sogni_node.verify.step_check import latent_shape

    if len({j.scheduler for j in jobs}) != 1:
        raise ValueError("a batch shares one scheduler")
    seeds = [j.seed for j in jobs] if seeds is None else list(seeds)
    torch.set_num_threads(threads)
    pipe.scheduler = make_scheduler(base_config, jobs[0].scheduler)
    dtype = pipe.unet.dtype
    shape = latent_shape(pipe, width=SIZE, height=SIZE)
    noise = torch.cat([initial_latents(s, shape) for s in seeds])
    generators = [step_generator(s, 1) for s in seeds]
    rows: list[Trajectory] = [[] for _ in jobs]

    def step_end(_p: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        for row, latents in zip(rows, kwargs["latents"], strict=True):
            row.append(latents.unsqueeze(0).to(torch.float32).clone())
        for g, s in zip(generators, seeds, strict=True):
            g.manual_seed(step_seed(s, i + 2))  # the backend's step i + 2 (1-based) is next
        return kwargs

    single = len(jobs) == 1
    started = time.perf_counter()
    with quiet():
        pipe(
            prompt=jobs[0].prompt if single else [j.prompt for j in jobs],
            negative_prompt=(
                (jobs[0].negative_prompt or None) if single else [j.negative_prompt for j in jobs]
            ),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=SIZE,
            height=SIZE,
            generator=generators[0] if single else generators,
            latents=noise.to(dtype),
            output_type="np",
            callback_on_step_end=step_end,
        )
    seconds = time.perf_counter() - started
    sigma = pipe.scheduler.init_noise_sigma
    for row, x in zip(rows, noise, strict=True):
        row.insert(0, (x.unsqueeze(0).to(dtype) * sigma).to(torch.float32))
    return rows, seconds


def check_step(ver: Any, job: Job, sched: Any, traj: Trajectory, k: int) -> float:
    """One check: re-run step k from the committed x_k (the multistep state rebuilt from
    x_{k-1}) and return the normalised distance to the committed x_{k+1}."""
    from sogni_node.verify import step_check as sc

    args: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "guidance": GUIDANCE,
        "steps": STEPS,
        "scheduler": sched,
        "k": k,
    }
    state = sc.multistep_state(ver, **args, previous=traj[:k])
    pred = sc.recompute_step(
        ver,
        **args,
        width=SIZE,
        height=SIZE,
        seed=job.seed,
        latents_k=traj[k],
        scheduler_state=state,
    )
    return sc.normalised_distance(traj[k + 1], pred, traj[k])


def verify(ver: Any, job: Job, base_config: Any, traj: Trajectory) -> tuple[float, list[float]]:
    """A verifier (1 thread) re-runs every step: the x_0 distance and each step's distance."""
    from sogni_node.verify import step_check as sc

    torch.set_num_threads(1)
    sched = make_scheduler(base_config, job.scheduler)
    x0 = sc.start_latents(ver, seed=job.seed, width=SIZE, height=SIZE, steps=STEPS, scheduler=sched)
    start = sc.start_distance(traj[0], x0)
    return start, [check_step(ver, job, sched, traj, k) for k in range(STEPS)]


# --- honest providers -------------------------------------------------------------------------
def provide(provider: Provider, jobs: Sequence[Job], pipe: Any, base: Any) -> list[Trajectory]:
    """Render each job as `provider` would, in this process."""
    out: list[Trajectory] = []
    partners = make_jobs(len(jobs), random.Random(len(jobs)))
    for job, partner in zip(jobs, partners, strict=True):
        batch = [job]
        if provider.batch == 2:  # rendered next to another job with the same scheduler
            batch.append(Job(partner.prompt, partner.seed, job.scheduler))
        out.append(render(pipe, batch, base, threads=provider.threads)[0][0])
    return out


def provide_in_subprocess(
    provider: Provider, jobs: Sequence[Job], workdir: Path
) -> list[Trajectory]:
    """Render each job in a child process whose torch/oneDNN/MKL take `provider.env`'s path."""
    out = workdir / f"{provider.mode.name}-{provider.cpu}.pt"
    env = {k: v for k, v in os.environ.items() if k not in _ISA_KEYS}
    env.update(provider.env)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "bench.trajectory_tolerance", "--child", str(out)]
    argv += ["--dtype", provider.mode.dtype, "--quantize", provider.mode.quantize]
    done = subprocess.run(
        argv,
        input=json.dumps([j.__dict__ for j in jobs]),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{provider.name} failed:\n{done.stderr[-4000:]}")
    trajectories: list[Trajectory] = torch.load(out)
    return trajectories


def _child(out: Path, mode: Mode) -> None:
    jobs = [Job(**d) for d in json.loads(sys.stdin.read())]
    pipe = load_pipe(shapes_path(), mode)
    base = dict(pipe.scheduler.config)  # the model's own; not changed by dtype or quantization
    torch.save(provide(Provider(mode), jobs, pipe, base), out)


def unavailable(provider: Provider) -> str | None:
    """Why a provider cannot run here (None: it can)."""
    from bench.cpu_variation import cpu_flags
    from sogni_node.render.quantize import check_quant_mode

    if provider.needs and provider.needs not in cpu_flags():
        return f"this CPU lacks {provider.needs}"
    try:
        check_quant_mode(provider.mode.quantize, "cpu")
    except ValueError as exc:
        return str(exc)
    return None


# --- cheats -----------------------------------------------------------------------------------
@contextlib.contextmanager
def reused_unet_outputs(pipe: Any, fresh_steps: set[int]) -> Iterator[None]:
    """While active the UNet runs only at the steps in `fresh_steps`; at the others its last
    output is returned again (a skipped step that still commits a latent)."""
    unet = pipe.unet
    original = unet.forward
    calls = [0]
    last: list[Any] = [None]

    def forward(*args: Any, **kwargs: Any) -> Any:
        i = calls[0]
        calls[0] += 1
        if i in fresh_steps or last[0] is None:
            last[0] = original(*args, **kwargs)
        return last[0]

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward


CHEATS = (
    "another model (tiny, random weights)",
    "another model (shapes UNet + 1% weight noise)",
    "25% of steps skipped",
    "all steps but one skipped",
    "another seed",
    "pure noise",
    "replay (other prompt, other seed)",
    "replay (other prompt, same seed)",
)


def cheat_trajectory(
    cheat: str, job: Job, other: Job, pipes: dict[str, Any], base: Any, rng: random.Random
) -> Trajectory:
    """What a provider that cheats this way commits for `job` (`other`: an older job)."""
    own = pipes["own"]
    if cheat.startswith("another model (tiny"):
        return render(pipes["tiny"], [job], base)[0][0]
    if cheat.startswith("another model (shapes"):
        return render(pipes["perturbed"], [job], base)[0][0]
    if cheat == "25% of steps skipped":
        skipped = set(rng.sample(range(1, STEPS), STEPS // 4))
        with reused_unet_outputs(own, set(range(STEPS)) - skipped):
            return render(own, [job], base)[0][0]
    if cheat == "all steps but one skipped":
        with reused_unet_outputs(own, {0}):
            return render(own, [job], base)[0][0]
    if cheat == "another seed":
        return render(own, [job], base, seeds=[(job.seed + 1) % 2**32])[0][0]
    if cheat == "pure noise":  # x_0 right (it is free), every later latent noise of its size
        honest = render(own, [job], base)[0][0]
        g = torch.Generator().manual_seed(job.seed)
        faked = [honest[0]]
        for x in honest[1:]:
            r = torch.randn(x.shape, generator=g)
            faked.append(r * (torch.linalg.vector_norm(x) / torch.linalg.vector_norm(r)))
        return faked
    if cheat == "replay (other prompt, other seed)":
        return render(own, [Job(other.prompt, other.seed, job.scheduler)], base)[0][0]
    if cheat == "replay (other prompt, same seed)":
        return render(own, [Job(other.prompt, job.seed, job.scheduler)], base)[0][0]
    raise ValueError(cheat)


def detection(start_bad: bool, bad: int, n: int, c: int) -> float:
    """Probability that the x_0 check or c distinct random step checks catch the job."""
    return 1.0 if start_bad else 1.0 - math.comb(n - bad, c) / math.comb(n, c)


@dataclass(frozen=True)
class Regime:
    """Who checks a cheat: the mode the cheater renders in and declares, the verifier's mode."""

    label: str
    declared: Mode
    verifier: Mode


REGIMES = (
    Regime("declares fp32", FP32, FP32),
    Regime("declares int8", INT8, INT8),
    Regime("declares bf16", BF16, BF16),
    Regime("declares fp16", FP16, FP16),
)
"""The cheater renders in the mode it declares; the verifier re-runs steps in that mode."""


# --- the run ----------------------------------------------------------------------------------
def _tolerance(honest_max: float, floor: float = 1e-7) -> float:
    """SAFETY x the largest honest value rounded up to one significant digit, at least `floor`
    (an all-zero calibration must not reject the next honest rounding difference)."""
    value = max(honest_max * SAFETY, floor)
    exponent = math.floor(math.log10(value))
    return float(f"{math.ceil(round(value / 10**exponent, 9)) * 10**exponent:.1e}")


def _other_path(name: str, row: dict[str, Any]) -> bool:
    """A row of a path-bound mode rendered on another path (older raw results lack the key)."""
    return bool(row.get("other_path", row["mode"] in PATH_BOUND and "CPU " in name))


def tolerances(honest: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The largest calibration distances per declared mode and the tolerances they give
    (matched and cross-mode, steps and x_0); a path-bound mode's matched ones from its
    verifier's path alone."""
    order = [m.name for m in _modes()]
    modes = sorted({h["mode"] for h in honest.values()}, key=order.index)

    def calib(row: dict[str, Any], kind: str, what: str) -> list[float]:
        r, n = row[kind], row["n_cal"]
        if what == "start":
            return list(r["start"][:n])
        return [d for ds in r["steps"][:n] for d in ds]

    def worst(kind: str, what: str) -> dict[str, float]:
        return {
            m: max(
                max(calib(row, kind, what))
                for name, row in honest.items()
                if row["mode"] == m and not (kind == "matched" and _other_path(name, row))
            )
            for m in modes
        }

    honest_max = {kind: worst(kind, "steps") for kind in ("matched", "cross")}
    tolerance: dict[str, Any] = {
        kind: {
            m: _tolerance(v, PATH_FLOOR if kind == "matched" and m in PATH_BOUND else 1e-7)
            for m, v in honest_max[kind].items()
        }
        for kind in ("matched", "cross")
    }
    for kind in ("matched", "cross"):
        tolerance[f"{kind}_start"] = {
            m: _tolerance(v, floor=1e-6) for m, v in worst(kind, "start").items()
        }
    return honest_max, tolerance


def measure_provider(
    p: Provider, jobs: list[Job], n_cal: int, pipe_for: Any, base: Any, fp32: Any, tmp: Path
) -> dict[str, Any]:
    """Render `jobs` as `p` and check every step: matched and cross-mode (float32)."""
    if p.env:
        trajectories = provide_in_subprocess(p, jobs, tmp)
    else:
        trajectories = provide(p, jobs, pipe_for(p.mode), base)
    row: dict[str, Any] = {"mode": p.mode.name, "n_cal": n_cal, "other_path": p.other_path}
    for kind, ver in (("matched", pipe_for(p.mode)), ("cross", fp32)):
        if kind == "cross" and p.mode == FP32:
            row["cross"] = row["matched"]
            continue
        checked = [verify(ver, j, base, t) for j, t in zip(jobs, trajectories, strict=True)]
        row[kind] = {
            "start": [s for s, _ in checked],
            "steps": [ds for _, ds in checked],
            "schedulers": [j.scheduler for j in jobs],
        }
    return row


def extend(raw: Path) -> Path:
    """Add to a full run's raw results the providers of `PROVIDERS` it lacks (measured now,
    6 calibration and 7 held-out renders each, other prompts and seeds than the run's),
    recompute the tolerances with today's rules, run the cheat regimes it lacks and
    re-render the BENCHMARKS.md section.
    Why: a full run is 15-40 minutes on a shared 2-core machine; this re-uses its numbers
    for everything it measured. Writes the extended raw results beside the input."""
    m = json.loads(raw.read_text())
    rng = random.Random(f"extend-{raw.name}")
    pipes: dict[Mode, Any] = {FP32: load_pipe(shapes_path())}
    base = dict(pipes[FP32].scheduler.config)

    def pipe_for(mode: Mode) -> Any:
        if mode not in pipes:
            pipes[mode] = load_pipe(shapes_path(), mode)
        return pipes[mode]

    with tempfile.TemporaryDirectory(prefix="tolerance-") as tmp:
        for p in PROVIDERS:
            if p.name in m["honest"] or p.name in m["skipped"] or unavailable(p):
                continue
            n_cal = m["settings"]["calibration_renders"]
            jobs = make_jobs(n_cal + 7, rng)
            m["honest"][p.name] = measure_provider(
                p, jobs, n_cal, pipe_for, base, pipes[FP32], Path(tmp)
            )
            m["providers"].append(p.name)
            m.setdefault("extended", []).append(p.name)
            print(f"tolerance: added {p.name}", file=sys.stderr)
    for name, row in m["honest"].items():
        row["other_path"] = _other_path(name, row)
    from sogni_node.hardware import compute_path

    m["compute_path"] = compute_path("cpu")
    m["honest_max"], m["tolerance"] = tolerances(m["honest"])
    missing = [
        r
        for r in REGIMES
        if r.label not in m["cheats"] and r.declared.name in m["tolerance"]["matched"]
    ]
    if missing:
        n = m["settings"]["cheat_jobs"]
        cheat_jobs, others = make_jobs(n, rng), make_jobs(n, rng)
        m["cheats"].update(measure_cheats(missing, cheat_jobs, others, pipe_for, base))
        m.setdefault("extended", []).extend(r.label for r in missing)
    out = raw.with_name(raw.stem + "-extended.json")
    out.write_text(json.dumps(m, indent=1, default=float))
    print(f"tolerance: extended raw results in {out}", file=sys.stderr)
    return rewrite_section(out)


def measure(settings: Settings) -> dict[str, Any]:
    rng = random.Random(20250612)
    pipes: dict[Mode, Any] = {FP32: load_pipe(shapes_path())}
    base = dict(pipes[FP32].scheduler.config)

    def pipe_for(mode: Mode) -> Any:
        if mode not in pipes:
            pipes[mode] = load_pipe(shapes_path(), mode)
        return pipes[mode]

    providers = [p for p in PROVIDERS if not settings.quick or p.name in QUICK_PROVIDERS]
    skipped = {p.name: why for p in providers if (why := unavailable(p))}
    providers = [p for p in providers if p.name not in skipped]
    calibration = {p.name: make_jobs(settings.calibration_renders, rng) for p in providers}
    heldout_jobs = make_jobs(math.ceil(settings.honest_checks / STEPS), rng)
    held: dict[str, list[Job]] = {p.name: [] for p in providers}
    checked = [p for p in providers if not p.other_path]  # held-out: what is checked
    for i, job in enumerate(heldout_jobs):
        held[checked[i % len(checked)].name].append(job)

    honest: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tolerance-") as tmp:
        for p in providers:
            started = time.perf_counter()
            jobs = calibration[p.name] + held[p.name]
            n_cal = len(calibration[p.name])
            row = measure_provider(p, jobs, n_cal, pipe_for, base, pipes[FP32], Path(tmp))
            honest[p.name] = row
            largest = max(max(ds) for ds in row["matched"]["steps"])
            print(
                f"tolerance: {p.name}: matched max {largest:.1e} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )

    honest_max, tolerance = tolerances(honest)

    # cheats, in each regime
    cheat_jobs = make_jobs(settings.cheat_jobs, rng)
    others = make_jobs(settings.cheat_jobs, rng)
    regimes = [r for r in REGIMES if r.declared.name in tolerance["matched"]]  # runs here
    cheats = measure_cheats(regimes, cheat_jobs, others, pipe_for, base)
    cost = measure_cost(pipes[FP32], base, settings.cost_runs, rng)
    from sogni_node.hardware import compute_path

    return {
        "settings": settings.__dict__,
        "compute_path": compute_path("cpu"),
        "providers": [p.name for p in providers],
        "skipped": skipped,
        "honest": honest,
        "honest_max": honest_max,
        "tolerance": tolerance,
        "cheats": cheats,
        "cost": cost,
    }


Cheats = dict[str, dict[str, list[tuple[float, list[float]]]]]
"""Regime label -> cheat -> per job (x_0 distance, each step's distance)."""


def measure_cheats(
    regimes: Sequence[Regime],
    cheat_jobs: Sequence[Job],
    others: Sequence[Job],
    pipe_for: Any,
    base: Any,
) -> Cheats:
    """Every cheat of `CHEATS` on every job, in each regime, every step re-run."""
    from sogni_node.models.tiny import ensure_tiny_model

    cheats: Cheats = {}
    with tempfile.TemporaryDirectory(prefix="tolerance-tiny-") as tmp:
        tiny_path = ensure_tiny_model(Path(tmp))
        for regime in regimes:
            cheat_pipes = {
                "own": pipe_for(regime.declared),
                "tiny": load_pipe(tiny_path, regime.declared),
                "perturbed": load_pipe(shapes_path(), regime.declared, weight_noise=0.01),
            }
            ver = pipe_for(regime.verifier)
            cheats[regime.label] = {}
            started = time.perf_counter()
            for cheat in CHEATS:
                crng = random.Random(cheat)
                rows = []
                for job, other in zip(cheat_jobs, others, strict=True):
                    traj = cheat_trajectory(cheat, job, other, cheat_pipes, base, crng)
                    rows.append(verify(ver, job, base, traj))
                cheats[regime.label][cheat] = rows
            print(
                f"tolerance: cheats, {regime.label} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
    return cheats


def _modes() -> list[Mode]:
    return list(dict.fromkeys(p.mode for p in PROVIDERS))


def measure_cost(ref: Any, base: Any, runs: int, rng: random.Random) -> dict[str, Any]:
    """Render and one-check times, float32, 1 thread, interleaved, per kind of scheduler."""
    out: dict[str, Any] = {}
    for name in ("euler", "dpmpp_2m_karras"):
        jobs = [Job(j.prompt, j.seed, name) for j in make_jobs(runs + 1, rng)]
        sched = make_scheduler(base, name)
        renders: list[float] = []
        checks: list[float] = []
        for i, job in enumerate(jobs):
            traj, seconds = render(ref, [job], base)
            k = rng.randrange(1, STEPS)  # k >= 1: a multistep check pays its second UNet call
            torch.set_num_threads(1)
            started = time.perf_counter()
            check_step(ref, job, sched, traj[0], k)
            check_s = time.perf_counter() - started
            if i:  # the first of each is a warm-up
                renders.append(seconds)
                checks.append(check_s)
        out[name] = {"render": renders, "check": checks}
    return out


# --- markdown ---------------------------------------------------------------------------------
def _e(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _flat(steps: list[list[float]]) -> list[float]:
    return [d for ds in steps for d in ds]


def _job_rates(
    rows: list[tuple[float, list[float]]], tol: float, start_tol: float, c: int
) -> float:
    return sum(
        detection(s > start_tol, sum(d > tol for d in ds), STEPS, c) for s, ds in rows
    ) / len(rows)


def _cross_path(m: dict[str, Any]) -> str:
    """What a path-bound mode's other-path renders measured against this path's verifier
    (why the mode is path-bound, or how far its paths agree here)."""
    worst: dict[str, tuple[float, list[str]]] = {}
    for name, h in m["honest"].items():
        if h.get("other_path"):
            d = max(_flat(h["matched"]["steps"]) + list(h["matched"]["start"]))
            prev, paths = worst.get(h["mode"], (0.0, []))
            worst[h["mode"]] = (max(prev, d), [*paths, name.split("CPU ", 1)[1]])
    if not worst:
        return ""
    return (
        " Largest matched distance of another path's honest renders (x_0 included) against "
        "this path's verifier: "
        + ", ".join(f"{mode} {_e(d)} ({', '.join(p)})" for mode, (d, p) in worst.items())
        + "; a mode measured 0 across the paths this CPU can force stays path-bound all the "
        "same, since CPUs with native kernels for it (AVX512-FP16, AMX, Arm) take code paths "
        "no run here covered."
    )


def render_markdown(m: dict[str, Any], command: str, seconds: float) -> str:
    s, tol = m["settings"], m["tolerance"]
    lines = [
        "## Trajectory commitments: honest step distance, tolerance, detection",
        "",
        f"Command: `{command}` ({seconds:.0f} s). Model `sogni-shapes-64` (trained, 64x64, "
        f"{STEPS} steps, guidance {GUIDANCE:g}), jobs cycling through the schedulers "
        f"{', '.join(SCHEDULER_NAMES)}, random shape captions and seeds. A check re-runs step "
        "k from the committed x_k (`sogni_node.verify.step_check.recompute_step`) and measures "
        "d = |x_{k+1} - x'_{k+1}| / |x_{k+1} - x_k|; a job also fails when its x_0 is not its "
        "seed's noise (`start_distance`: |x_0 - x'_0| / |x'_0|). Renders pin their noise "
        "as the diffusers backend does (`sogni_node.render.noise`). The verifier runs 1 "
        "thread, batch 1, this CPU's own code paths, in the provider's declared mode "
        "(*matched*) or in float32 (*cross-mode*, shown for comparison). See "
        "docs/VERIFICATION.md.",
        "",
        f"Sizes: {s['calibration_renders']} calibration renders per provider (every step "
        f"checked), then {math.ceil(s['honest_checks'] / STEPS) * STEPS} held-out honest "
        f"checks (every step of {math.ceil(s['honest_checks'] / STEPS)} more renders, other "
        f"prompts and seeds, spread over the providers); {s['cheat_jobs']} jobs per cheat and "
        f"declared mode. Tolerance per declared mode = {SAFETY:g} x the largest honest "
        "distance of that mode's calibration renders, rounded up."
        + (
            " **Quick run**: small samples; the numbers to use come from the full run."
            if s["quick"]
            else ""
        ),
        "",
        *(
            [
                "Extended (`--extend-json`): measured later and added to this run's raw "
                f"results: {', '.join(m['extended'])} (a provider: 6 calibration + 7 "
                "held-out renders; a 'declares' regime: every cheat on new jobs); the "
                "tolerances recomputed with the current rules.",
                "",
            ]
            if m.get("extended")
            else []
        ),
        "### Honest distance per provider",
        "",
    ]
    rows = []
    held_total = rej_matched = rej_cross = 0
    for name in m["providers"]:
        h = m["honest"][name]
        n_cal, mode = h["n_cal"], h["mode"]
        mt, cr = h["matched"], h["cross"]
        every = _flat(mt["steps"])
        held_m = _flat(mt["steps"][n_cal:])
        held_c = _flat(cr["steps"][n_cal:])
        t, ts = tol["matched"][mode], tol["matched_start"][mode]
        r_m = sum(d > t for d in held_m) + sum(x > ts for x in mt["start"][n_cal:])
        tc, tcs = tol["cross"][mode], tol["cross_start"][mode]
        r_c = sum(d > tc for d in held_c) + sum(x > tcs for x in cr["start"][n_cal:])
        other = h.get("other_path", False)
        if not other:  # another path's render is never checked by this path's verifier
            held_total += len(held_m)
            rej_matched += r_m
            rej_cross += r_c
        rows.append(
            (
                name,
                len(every),
                _e(common.median(every)),
                _e(common.percentile(every, 99)),
                _e(max(every)),
                _e(max(mt["start"])),
                "other path: never checked here" if other else f"{r_m} / {len(held_m)}",
                _e(max(_flat(cr["steps"]))),
            )
        )
    lines.append(
        common.table(
            (
                "provider (declared mode, threads, ...)",
                "steps",
                "matched: median d",
                "p99 d",
                "max d",
                "max x_0 dist.",
                "held-out rejected",
                "cross-mode: max d",
            ),
            rows,
        )
    )
    if m["skipped"]:
        lines += [
            "",
            "Not run here: " + "; ".join(f"{k} ({v})" for k, v in m["skipped"].items()) + ".",
        ]
    by_sched: dict[str, float] = {}
    by_step = [0.0] * STEPS
    for h in m["honest"].values():
        if h["mode"] != FP32.name:
            continue
        for sched, ds in zip(h["matched"]["schedulers"], h["matched"]["steps"], strict=True):
            by_sched[sched] = max(by_sched.get(sched, 0.0), *ds)
            by_step = [max(a, b) for a, b in zip(by_step, ds, strict=True)]
    lines += [
        "",
        "fp32 providers, largest d by scheduler: "
        + ", ".join(f"{k} {_e(v)}" for k, v in by_sched.items())
        + f"; by step k = 0..{STEPS - 1}: "
        + ", ".join(_e(v) for v in by_step)
        + ".",
        "",
        "### Proposed tolerance",
        "",
        f"Path-bound modes ({', '.join(PATH_BOUND)}; CPU float16 here, CUDA float16 and fp8 "
        "unmeasured): the node declares `bfloat16@<its code path>` or `float16@<its code "
        "path>` (`sogni_node.hardware.compute_path`) and only a verifier declaring the same "
        "string re-runs its steps, so their matched tolerance is measured on the verifier's "
        f"own path (here `{m.get('compute_path', '?')}`: threads, batch) and is at least "
        f"{PATH_FLOOR:g}; renders on other paths (CPU all-AVX2, baseline) are shown above, "
        "never checked against it. Any other (mode, path) has no tolerance: never sampled."
        + _cross_path(m),
        "",
    ]
    trows = []
    for mode in tol["matched"]:
        trows.append(
            (
                mode,
                _e(m["honest_max"]["matched"][mode]),
                f"**{_e(tol['matched'][mode])}**",
                _e(tol["matched_start"][mode]),
                _e(m["honest_max"]["cross"][mode]),
                _e(tol["cross"][mode]),
            )
        )
    lines += [
        common.table(
            (
                "declared mode",
                "matched: max honest d (calibration)",
                "tolerance",
                "x_0 tolerance",
                "cross-mode: max honest d",
                "cross-mode tolerance",
            ),
            trows,
        ),
        "",
        "Proposed `sogni_coordinator.verifiers.TOLERANCES` entries (declared mode -> matched "
        "tolerance): "
        + ", ".join(
            f"`{mo.declared(m.get('compute_path', '?'))}`: {_e(tol['matched'][mo.name])}"
            for mo in _modes()
            if mo.name in tol["matched"]
        )
        + ".",
        "",
        f"Held-out honest checks over their declared mode's tolerance: matched {rej_matched} "
        f"of {held_total}, cross-mode {rej_cross} of {held_total}. "
        + (
            f"Floor, 0 false rejections in 1,000 honest checks: **"
            f"{'met' if held_total >= 1000 and rej_matched == 0 else 'not met'}**"
            + (" (fewer than 1,000 checks in a quick run)." if held_total < 1000 else ".")
        ),
        "",
        "### Detection per checked job",
        "",
        "The cheater renders in the mode it declares; the verifier re-runs steps in that mode "
        "with that mode's tolerance. A job is caught when its x_0 is off or any of c distinct "
        "random steps is over the tolerance; every step of every cheat job was re-run, so the "
        "rates are exact over the steps. 'd at changed steps': min / median of the nonzero "
        "distances.",
        "",
    ]
    floor_misses: dict[str, list[str]] = {}
    policy_k = POLICY.steps_to_check(STEPS)
    lines[-2] += (
        f" 'policy c={policy_k}': the coordinator's default, `pairs_needed("
        f"{POLICY.catch_fraction:g}, {POLICY.confidence:g}, {STEPS})` random steps per checked "
        'job (docs/VERIFICATION.md, "The floor per checked job, by policy"); step 1 is '
        "re-run besides when not drawn, which only adds."
    )
    for regime in REGIMES:
        if regime.label not in m["cheats"]:
            continue
        mode = regime.declared.name
        t, ts = tol["matched"][mode], tol["matched_start"][mode]
        lines += [f"{regime.label} (tolerance {_e(t)}):", ""]
        crow = []
        for cheat, rows_ in m["cheats"][regime.label].items():
            nonzero = [d for d in _flat([ds for _s, ds in rows_]) if d > 0]
            bad = sum(sum(d > t for d in ds) for _s, ds in rows_)
            rates = [_job_rates(rows_, t, ts, c) for c in (*CHECKS_PER_JOB, STEPS)]
            at_policy = _job_rates(rows_, t, ts, policy_k)
            if at_policy < 0.99:
                floor_misses.setdefault(regime.label, []).append(cheat)
            enough = [c for c in range(1, STEPS + 1) if _job_rates(rows_, t, ts, c) >= 0.99]
            crow.append(
                (
                    cheat,
                    f"{_e(min(nonzero))} / {_e(common.median(nonzero))}" if nonzero else "0",
                    f"{bad} / {len(rows_) * STEPS}",
                    f"{sum(x > ts for x, _ in rows_)} / {len(rows_)}",
                    *(_pct(r) for r in rates),
                    f"**{_pct(at_policy)}**",
                    str(enough[0]) if enough else "never",
                )
            )
        near = [ds for _s, ds in m["cheats"][regime.label][CHEATS[1]]]
        lines += [
            f"{CHEATS[1]}: smallest d by step k = 0..{STEPS - 1}: "
            + ", ".join(_e(min(col)) for col in zip(*near, strict=True))
            + ".",
            "",
            common.table(
                (
                    "cheat",
                    "d at changed steps",
                    "steps over tol.",
                    "x_0 off",
                    *(f"c={c}" for c in CHECKS_PER_JOB),
                    f"all {STEPS}",
                    f"policy c={policy_k}",
                    "c for >= 99%",
                ),
                crow,
            ),
            "",
        ]
    met = [r.label for r in REGIMES if r.label in m["cheats"] and r.label not in floor_misses]
    if met:
        lines.append(
            f"Floor, >= 99% detection of each cheat per checked job, at the policy's c = "
            f"{policy_k} of {STEPS} steps: **met** for {', '.join(met)}."
        )
    if floor_misses:
        lines.append(
            f"{'' if not met else chr(10)}Floor at c = {policy_k}: **not met** for "
            + "; ".join(f"{r}: {', '.join(cs)}" for r, cs in floor_misses.items())
            + ". A cheat that fakes only some steps is caught by a step check only when the "
            "check lands on a faked step (b of n faked, c checked: 1 - C(n-b, c)/C(n, c)), so "
            "partial faking needs more steps checked per job, not a tighter tolerance (the "
            "policy derives c from that); a mode whose honest spread is wide (bf16 across CPUs) "
            "hides near models and partial skipping at any c."
        )
    lines += ["", "### Cost of one check", ""]
    cost_rows = []
    for name, c in m["cost"].items():
        r, ch = common.median(c["render"]), common.median(c["check"])
        cost_rows.append(
            (
                name,
                f"{1000 * r:.0f} ({1000 * min(c['render']):.0f}-{1000 * max(c['render']):.0f})",
                f"{1000 * ch:.1f} ({1000 * min(c['check']):.1f}-{1000 * max(c['check']):.1f})",
                f"{ch / r:.2f}",
                f"{STEPS * ch / r:.2f}",
            )
        )
    lines += [
        common.table(
            (
                "scheduler",
                "render ms (baseline)",
                "one check ms",
                "check / render",
                f"all {STEPS} steps / render",
            ),
            cost_rows,
        ),
        "",
        f"Median (min-max) of {s['cost_runs']} renders and {s['cost_runs']} checks after one "
        "warm-up, interleaved, float32, 1 thread. The render is the whole pipeline call "
        f"(prompt encoding, {STEPS} UNet steps at batch 2 for guidance, VAE decode) capturing "
        "every latent; a check encodes the prompt and runs one UNet step (dpmpp_2m_karras: "
        "two, the first rebuilding the solver's state from x_{k-1}). This model's UNet is "
        "small, so prompt encoding weighs more than on SD-sized models, where a check costs "
        f"about 1/{STEPS} (2/{STEPS}) of a render's UNet time.",
    ]
    return "\n".join(lines)


def run(quick: bool, command: str = "python -m bench tolerance") -> str:
    started = time.perf_counter()
    m = measure(QUICK if quick else Settings())
    raw = Path(tempfile.gettempdir()) / f"trajectory_tolerance-{int(time.time())}.json"
    raw.write_text(json.dumps(m, indent=1, default=float))
    print(f"tolerance: raw results in {raw}", file=sys.stderr)
    return render_markdown(m, command, time.perf_counter() - started)


def rewrite_section(raw: Path) -> Path:
    """Re-render this bench's BENCHMARKS.md section from a full run's raw results (the JSON
    `run` leaves in the temp folder) after a change to the tables (its command and time kept)."""
    m = json.loads(raw.read_text())
    return common.rewrite_section(
        "tolerance", lambda took: render_markdown(m, "python -m bench tolerance", float(took))
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples (about 1 min)")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="re-render the BENCHMARKS.md section from this run's raw results (no measuring)",
    )
    parser.add_argument(
        "--extend-json",
        type=Path,
        help="add the providers a run's raw results lack, then re-render the section",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        _child(ns.child, Mode(ns.dtype, ns.quantize))
    elif ns.from_json:
        print(f"wrote {rewrite_section(ns.from_json)}")
    elif ns.extend_json:
        print(f"wrote {extend(ns.extend_json)}")
    else:
        cmd = "python -m bench.trajectory_tolerance" + (" --quick" if ns.quick else "")
        print(run(ns.quick, cmd))
