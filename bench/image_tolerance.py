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
  bfloat16, CPU float16, the CPU quantization modes). The verifier decodes in the declared
  mode, 1 thread, batch 1, this CPU's own code paths; float16 is path-bound like bfloat16
  (`float16@<path>`: its rows go to `image_verify.FLOAT16_CPU`, the one path measured);
- the same for JPEG and WebP jobs: the worker delivers its pixels through the node's encoder,
  the coordinator puts the verifier's decode through the same encoder
  (`sogni_coordinator.image_verify.check_distance`, `sogni_protocol.image_encoding`), and the
  share of honest checks whose bytes came out identical;
- tolerances (per declared mode and output format: SAFETY x the largest calibration distance,
  at least 1 level), then the false rejections among >= 1,000 held-out honest checks per
  format (other prompts and seeds), at those and at the shipped ones (`image_verify`: what
  a coordinator applies; a run's proposal rests on 12-40 calibration renders and moves
  between runs, so the tables give both);
- the detection of each cheat (the worker commits an honest trajectory and delivers another
  image): another seed's image, another prompt's image, a replayed older image, pure noise,
  the decode of the second-to-last latent (a truncated schedule), a lossy re-encode of the
  honest image (JPEG quality 92 delivered for a PNG job; quality 75 in the job's format for a
  JPEG or WebP job), and small painted patches (8x8 and 4x4 pixels), each delivered in the
  job's format, for PNG, JPEG and WebP jobs; for a float32 worker and, on the same jobs, a
  float16 one (`CHEAT_MODES`: block rule and pixels rule at float16's tolerances);
- the same cheats against the pixels rule (a worker naming `+open-pixels` opens the lossless
  pixels of its JPEG or WebP: they must be within the PNG tolerance of the decode and the
  delivered file their encode byte for byte; `image_verify.judge_image`): a cheat passes if
  any pixels it could open do (its honest pixels, the cheat's pixels, the delivered file's
  decode);
- the codec rule (a worker that opens its pixels and claims a codec build not measured to
  encode alike: the delivered file must lie within `CODEC_TOLERANCES` of the shared encoder's
  output of the pixels): the honest distance of simulated other builds of each codec (the
  opened pixels encoded otherwise: a float colour conversion for JPEG, as the tolerance's
  basis; Pillow's own colour conversion, other libwebp methods and +-1 on 0.2% of the samples,
  reported as not covered), the tolerance, its false rejections on the held-out honest checks,
  and each cheat's detection when the cheat claims such a build;
- the cost of one check (the verifier's decode plus the coordinator's compare) against the
  render's time (float32, 1 thread, same run).

Run: ``.venv/bin/python -m bench image`` (writes its section of BENCHMARKS.md; 19 minutes
at load 5-6, about 10 of them float16's providers and cheats, as CPU float16 renders take about
10x float32's; 1.5 with --quick; set OMP_WAIT_POLICY=PASSIVE on a loaded machine) or
``.venv/bin/python -m bench.image_tolerance [--quick]`` (prints only);
``--from-json RAW`` re-renders the section from a run's raw results (no measuring).
"""

from __future__ import annotations

import argparse
import io
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
from bench.trajectory_tolerance import BF16, FP16, FP32, INT8, Job, Mode, Provider
from sogni_coordinator.image_verify import CODEC_TOLERANCES, FLOAT16_CPU, image_tolerance

REPO = Path(__file__).resolve().parent.parent
SAFETY = 10.0
LOSSY_SAFETY = 2.0
"""A lossy job's honest distance comes from whole quantised coefficients flipping where the
worker's and the verifier's pixels differ by a level: steps of the encoder's quantiser, which
do not grow with the numeric noise. So 2x the largest calibration distance (over more
calibration renders, `Settings.lossy_calibration_renders`), not 10x."""
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
    # CPU float16 (path-bound like bf16; last, so the other providers' calibration draws stay)
    Provider(FP16),
    Provider(FP16, threads=2),
    Provider(FP16, batch=2),
    Provider(FP16, cpu="all-AVX2", env=tt.ALL_AVX2, needs="avx2"),
)
QUICK_PROVIDERS = (
    "fp32, 1 thread", "fp32, 2 threads", "fp32, 1 thread, batch 2", "bf16, 1 thread",
    "fp16, 1 thread",
)  # fmt: skip
CHEAT_MODES = (FP16,)
"""Modes whose own worker the cheats are also run against (besides fp32): the worker
commits an honest trajectory in that mode, the verifier decodes in it, and the verdict uses
that mode's tolerance. The cheat images needing a render (another seed's, another prompt's)
are rendered in float32: a cheater may make them any way it likes."""
FORMATS = ("jpeg", "webp")
CODEC_SAFETY = 2.0
"""The codec rule's tolerance: this x the largest calibration distance of `CODEC_BASIS`."""
CODEC_BASIS = "float colour conversion"
"""The simulated other build the codec tolerance rests on: another implementation of the same
arithmetic, rounding otherwise (see `other_builds`)."""
UNMEASURED = "aarch64 jpeg:ijg-9f webp:1.2.4"
"""The build line the codec rule's cheats and cost runs claim (not in `BYTE_EXACT_CODECS`)."""
JOB_FORMATS = ("png", *FORMATS)
CHEAT_QUALITY = 75
"""A lossy job's re-encode cheat: the honest pixels at this quality in the job's format."""
CHEATS = (
    "another seed's image",
    "another prompt's image",
    "replayed older image",
    "pure noise",
    "truncated schedule (x_{N-1} decoded)",
    "lossy re-encode (JPEG q92 for PNG jobs, q75 in the job's format)",
    "8x8 patch painted",
    "4x4 patch painted",
)


@dataclass(frozen=True)
class Settings:
    calibration_renders: int = 12  # per provider
    lossy_calibration_renders: int = 28  # more per provider, for the lossy formats' tolerance
    honest_checks: int = 1000  # held out, spread over the providers
    cheat_jobs: int = 50
    cost_runs: int = 20
    quick: bool = False


QUICK = Settings(
    calibration_renders=3,
    lossy_calibration_renders=2,
    honest_checks=100,
    cheat_jobs=8,
    cost_runs=6,
    quick=True,
)

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


def pixels_of(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode(ver: Any, latent: torch.Tensor) -> bytes:
    """The verifier's answer: its decode of `latent` as a PNG (1 thread)."""
    from sogni_node.verify.decode_check import decode_png

    torch.set_num_threads(1)
    return decode_png(ver, latent, width=tt.SIZE, height=tt.SIZE)  # in the VAE's dtype


def distance(delivered: bytes, decoded: bytes, fmt: str = "png") -> float:
    """The coordinator's distance for a job in `fmt` (the verifier's decode re-encoded)."""
    from sogni_coordinator.image_verify import check_distance

    return check_distance(delivered, decoded, fmt, tt.SIZE, tt.SIZE).block


def reencode(pixels: np.ndarray, fmt: str) -> bytes:
    """The re-encode cheat: a lossy copy of the honest image that is not the node's encoding."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=CHEAT_QUALITY)
    else:
        Image.fromarray(pixels).save(buf, format="WEBP", quality=CHEAT_QUALITY)
    return buf.getvalue()


def cheat_pixels(
    cheat: str, job: Job, honest: Rendered, older: Rendered, ver: Any, pipe: Any, base: Any,
    rng: random.Random,
) -> np.ndarray | None:  # fmt: skip
    """The pixels a worker that committed `honest`'s trajectory delivers when cheating this
    way (None for the re-encode cheat, whose bytes depend on the job's format)."""
    pixels = honest[2]
    if cheat == "another seed's image":
        return render(pipe, [job], base, seeds=[(job.seed + 1) % 2**32])[0][0][2]
    if cheat == "another prompt's image":
        other = tt.make_jobs(1, rng)[0]
        while other.prompt == job.prompt:  # 168 captions: a draw may repeat the job's own
            other = tt.make_jobs(1, rng)[0]
        return render(pipe, [Job(other.prompt, job.seed, job.scheduler)], base)[0][0][2]
    if cheat == "replayed older image":
        return older[2]
    if cheat == "pure noise":
        return np.random.default_rng(job.seed).integers(0, 256, pixels.shape, dtype=np.uint8)
    if cheat.startswith("truncated"):
        return pixels_of(decode(ver, honest[0]))
    if cheat.startswith("lossy"):
        return None
    side = 8 if cheat.startswith("8x8") else 4
    edited = pixels.copy()
    y, x = rng.randrange(tt.SIZE - side + 1), rng.randrange(tt.SIZE - side + 1)
    edited[y : y + side, x : x + side] = rng.choice(((255, 255, 255), (0, 0, 0), (255, 0, 0)))
    return edited


def _ycbcr_jpeg(ycbcr: np.ndarray) -> bytes:
    from PIL import Image

    from sogni_protocol.image_encoding import SAVE_OPTIONS

    buf = io.BytesIO()
    Image.fromarray(ycbcr, "YCbCr").save(buf, **SAVE_OPTIONS["jpeg"])  # libjpeg: no conversion
    return buf.getvalue()


def other_builds(pixels: np.ndarray, fmt: str, seed: int) -> dict[str, bytes]:
    """What an honest node on another build of the codec may deliver for `pixels`, simulated
    with this build: `CODEC_BASIS` (JPEG: RGB -> YCbCr computed exactly in float and rounded
    by libjpeg's convention, handed to libjpeg as YCbCr: the same specified arithmetic at
    another precision; libjpeg's 16-bit fixed point rounds a few samples otherwise);
    and, not covered by the tolerance, encoders that differ more: Pillow's own colour
    conversion (it rounds otherwise throughout), libwebp methods 3, 5, 6 (other decisions at
    the same quality), and +-1 on 0.2% of the samples before encoding (a rounding difference
    that libwebp's prediction can carry across a macroblock)."""
    from PIL import Image

    from sogni_protocol.image_encoding import SAVE_OPTIONS

    rng = np.random.default_rng(seed)
    flip = rng.random(pixels.shape) < 0.002
    nudged = np.clip(pixels.astype(np.int16) + flip * rng.choice((-1, 1), pixels.shape), 0, 255)
    out = {"+-1 on 0.2% of samples": png(nudged.astype(np.uint8), fmt)}
    if fmt == "jpeg":
        x = pixels.astype(np.float64)
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        ycc = np.stack(
            (
                0.299 * r + 0.587 * g + 0.114 * b,
                128 - 0.168735892 * r - 0.331264108 * g + 0.5 * b,
                128 + 0.5 * r - 0.418687589 * g - 0.081312411 * b,
            ),
            axis=-1,
        )
        # libjpeg's convention: Y rounds halves up, Cb/Cr down (ONE_HALF - 1); exact arithmetic
        half = np.array([0.5, 0.5 - 2**-16, 0.5 - 2**-16])
        out[CODEC_BASIS] = _ycbcr_jpeg(np.clip(np.floor(ycc + half), 0, 255).astype(np.uint8))
        pil = np.asarray(Image.fromarray(pixels).convert("YCbCr"))
        out["Pillow's colour conversion"] = _ycbcr_jpeg(pil)
    else:
        for method in (3, 5, 6):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, **{**SAVE_OPTIONS["webp"], "method": method})
            out[f"libwebp method {method}"] = buf.getvalue()
    return out


def codec_distance(delivered: bytes, pixels: np.ndarray, fmt: str) -> float:
    """The codec rule's distance: the delivered file against the encode of `pixels` here."""
    from sogni_coordinator.image_verify import image_distance

    return image_distance(delivered, png(pixels, fmt), tt.SIZE, tt.SIZE).block


def escapes_pixels_rule(
    delivered: bytes, fmt: str, candidates: Sequence[np.ndarray], ref: bytes, png_tol: float
) -> bool:
    """A cheat's file passes the pixels rule if some pixels it could open are within the PNG
    tolerance of the decode and encode to the delivered bytes (on this build)."""
    return any(png(px, fmt) == delivered and distance(png(px), ref) <= png_tol for px in candidates)


def _tolerance(honest_max: float, safety: float, floor: float) -> float:
    """safety x the largest honest value rounded up to two significant digits, >= floor."""
    value = max(honest_max * safety, floor)
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(round(value / 10**exponent, 9)) * 10**exponent


def vae_dtype(mode: str) -> str:
    """The dtype the VAE decodes in: the quantized modes quantize only the UNet."""
    return mode if mode in ("bf16", "fp16") else "fp32"


def _lossy_calibration(h: dict[str, Any], fmt: str) -> list[float]:
    return _calibration_only(h, h["d"][fmt])


def _calibration_only(h: dict[str, Any], d: Sequence[float]) -> list[float]:
    """A provider's calibration renders' values (the held-out ones sit between them)."""
    n, nh = h["n_cal"], h["n_held"]
    return [*d[:n], *d[n + nh :]]


# --- the run ----------------------------------------------------------------------------------
def measure(settings: Settings) -> dict[str, Any]:
    from sogni_protocol.image_encoding import encoder_versions

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
    extra_rng = random.Random(20261201)  # its own draw: the PNG jobs and cheats stay as they were
    extra = {p.name: tt.make_jobs(settings.lossy_calibration_renders, extra_rng) for p in providers}

    honest: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="image-tolerance-") as tmp:
        for p in providers:
            started = time.perf_counter()
            jobs = calibration[p.name] + held[p.name] + extra[p.name]
            if p.env:
                rows = provide_in_subprocess(p, jobs, Path(tmp))
            else:
                rows = provide(p, jobs, pipe_for(p.mode), base)
            ver = pipe_for(p.mode)
            n_cal = len(calibration[p.name])
            ds: dict[str, list[float]] = {f: [] for f in JOB_FORMATS}
            same: dict[str, int] = {f: 0 for f in JOB_FORMATS}
            codec: dict[str, dict[str, list[float]]] = {f: {} for f in FORMATS}
            for k, (_prev, final, pixels) in enumerate(rows):
                ref = decode(ver, final)
                for f in JOB_FORMATS:
                    delivered = png(pixels, f)
                    ds[f].append(distance(delivered, ref, f))
                    same[f] += delivered == (ref if f == "png" else png(pixels_of(ref), f))
                for f in FORMATS:  # the same node on another codec build (the codec rule)
                    for name, data in other_builds(pixels, f, seed=k).items():
                        codec[f].setdefault(name, []).append(codec_distance(data, pixels, f))
            honest[p.name] = {
                "mode": p.mode.name, "n_cal": n_cal, "n_held": len(held[p.name]), "d": ds,
                "same": same, "codec": codec,
            }  # fmt: skip
            print(
                f"image: {p.name}: max "
                + ", ".join(f"{f} {max(ds[f]):.3g}" for f in JOB_FORMATS)
                + f" ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )

    modes = list(dict.fromkeys(p.mode.name for p in providers))
    worst = {  # PNG: the mode's own calibration renders
        "png": {
            m: max(max(h["d"]["png"][: h["n_cal"]]) for h in honest.values() if h["mode"] == m)
            for m in modes
        }
    }
    for f in FORMATS:  # lossy: every calibration render of the modes sharing the VAE's dtype
        worst[f] = {
            m: max(
                max(_lossy_calibration(h, f))
                for h in honest.values()
                if vae_dtype(h["mode"]) == vae_dtype(m)
            )
            for m in modes
        }
    tol = {"png": {m: _tolerance(worst["png"][m], SAFETY, FLOOR) for m in modes}}
    for f in FORMATS:
        tol[f] = {m: _tolerance(worst[f][m], LOSSY_SAFETY, FLOOR) for m in modes}
    # the codec rule: one tolerance for both formats, on the basis build's calibration renders
    codec_worst = max(
        max(_calibration_only(h, h["codec"]["jpeg"][CODEC_BASIS])) for h in honest.values()
    )
    codec_tol = _tolerance(codec_worst, CODEC_SAFETY, FLOOR)

    # cheats: the worker (fp32) commits an honest trajectory and delivers another image
    own = pipes[FP32]
    cheat_jobs = tt.make_jobs(settings.cheat_jobs + 1, rng)
    cheats: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CHEATS} for f in JOB_FORMATS}
    escaped: dict[str, dict[str, int]] = {f: dict.fromkeys(CHEATS, 0) for f in FORMATS}
    """Lossy format -> cheat -> jobs whose file passed the pixels rule."""
    codec_cheats: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CHEATS} for f in FORMATS}
    """Lossy format -> cheat -> the codec rule's distance per job (a cheat claiming an
    unmeasured build): the smallest over the pixels it could open that pass the PNG leg."""
    started = time.perf_counter()
    rendered = [render(own, [j], base)[0][0] for j in cheat_jobs]
    for i, job in enumerate(cheat_jobs[1:], start=1):
        honest_row = rendered[i]
        ref = decode(own, honest_row[1])
        for c in CHEATS:
            px = cheat_pixels(c, job, honest_row, rendered[i - 1], own, own, base, rng)
            for f in JOB_FORMATS:
                img = reencode(honest_row[2], f) if px is None else png(px, f)
                cheats[f][c].append(distance(img, ref, f))
                if f in FORMATS:
                    opened = [honest_row[2], pixels_of(img)] + ([px] if px is not None else [])
                    escaped[f][c] += escapes_pixels_rule(img, f, opened, ref, tol["png"]["fp32"])
                    near = [o for o in opened if distance(png(o), ref) <= tol["png"]["fp32"]]
                    codec_cheats[f][c].append(
                        min((codec_distance(img, o, f) for o in near), default=math.inf)
                    )
    print(f"image: cheats ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    mode_cheats = {
        mode.name: _mode_cheats(mode, pipe_for(mode), own, base, cheat_jobs, tol)
        for mode in CHEAT_MODES
        if mode.name in modes
    }

    # cost: one render vs one check (decode + PNG + compare), float32, 1 thread, interleaved
    from sogni_coordinator.image_verify import judge_image
    from sogni_protocol.image_encoding import encoder_build
    from sogni_protocol.messages import PixelsOpening

    cost: dict[str, list[float]] = {
        "render": [], "decode": [], "compare": [], "jpeg": [], "pixels": [], "codec": []
    }  # fmt: skip
    for i, job in enumerate(tt.make_jobs(settings.cost_runs + 1, rng)):
        (row,), seconds = render(own, [job], base)
        t0 = time.perf_counter()
        ref = decode(own, row[1])
        t1 = time.perf_counter()
        distance(png(row[2]), ref)
        t2 = time.perf_counter()
        distance(png(row[2][::-1].copy(), "jpeg"), ref, "jpeg")  # another image: no byte match
        t3 = time.perf_counter()
        opening = PixelsOpening(png=png(row[2]), encoder=encoder_build())
        judge_image(png(row[2], "webp"), ref, "webp", tt.SIZE, tt.SIZE, "float32", opening)
        t4 = time.perf_counter()
        other = other_builds(row[2], "webp", seed=i)["libwebp method 3"]
        claimed = PixelsOpening(png=png(row[2]), encoder=UNMEASURED)
        t5 = time.perf_counter()
        judge_image(other, ref, "webp", tt.SIZE, tt.SIZE, "float32", claimed)
        t6 = time.perf_counter()
        if i:
            cost["render"].append(seconds)
            cost["decode"].append(t1 - t0)
            cost["compare"].append(t2 - t1)
            cost["jpeg"].append(t3 - t2)
            cost["pixels"].append(t4 - t3)
            cost["codec"].append(t6 - t5)
    return {
        "settings": settings.__dict__,
        "providers": [p.name for p in providers],
        "skipped": skipped,
        "honest": honest,
        "worst": worst,
        "tolerance": tol,
        "encoders": encoder_versions(),
        "cheats": cheats,
        "mode_cheats": mode_cheats,
        "escaped_pixels_rule": escaped,
        "codec_worst": codec_worst,
        "codec_tolerance": codec_tol,
        "codec_cheats": codec_cheats,
        "cost": cost,
    }


def _mode_cheats(
    mode: Mode, pipe: Any, own: Any, base: Any, jobs: Sequence[Job], tol: dict[str, Any]
) -> dict[str, dict[str, list[float]]]:
    """Job format -> cheat -> distance per job, for a worker declaring `mode` (block rule):
    it commits an honest trajectory rendered in `mode`, the verifier decodes in `mode`; and
    "<lossy format> pixels rule escaped" -> cheat -> 1.0 per job whose file passed the pixels
    rule at `mode`'s PNG tolerance."""
    started = time.perf_counter()
    rng = random.Random(20261202)  # its own draw: the fp32 cheats stay as they were
    rendered = [render(pipe, [j], base)[0][0] for j in jobs]
    out: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CHEATS} for f in JOB_FORMATS}
    out.update({f"{f} pixels rule escaped": {} for f in FORMATS})
    for i, job in enumerate(jobs[1:], start=1):
        honest_row = rendered[i]
        ref = decode(pipe, honest_row[1])
        for c in CHEATS:
            px = cheat_pixels(c, job, honest_row, rendered[i - 1], pipe, own, base, rng)
            for f in JOB_FORMATS:
                img = reencode(honest_row[2], f) if px is None else png(px, f)
                out[f][c].append(distance(img, ref, f))
                if f in FORMATS:  # jobs whose file passed the pixels rule at this mode's PNG tol.
                    opened = [honest_row[2], pixels_of(img)] + ([px] if px is not None else [])
                    escaped = escapes_pixels_rule(img, f, opened, ref, tol["png"][mode.name])
                    out[f"{f} pixels rule escaped"].setdefault(c, []).append(float(escaped))
    print(f"image: {mode.name} cheats ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return out


# --- markdown ---------------------------------------------------------------------------------
def _v(x: float) -> str:
    return "inf" if math.isinf(x) else ("0" if x == 0 else f"{x:.3g}")


def _shipped(mode: str, fmt: str) -> float:
    """The tolerance a coordinator applies to a worker declaring bench mode `mode` (its
    measured path, for the path-bound float16) on a `fmt` job (`image_verify`)."""
    short = {"fp32": "float32", "bf16": "bfloat16", "fp16": FLOAT16_CPU}
    shipped = image_tolerance(short.get(mode, f"float32+{mode}"), fmt)
    return math.nan if shipped is None else shipped


def _caught(ds: Sequence[float], *tolerances: float) -> str:
    """The share of `ds` over each tolerance, "a% / b%"."""
    return " / ".join(f"{100 * sum(x > t for x in ds) / len(ds):.0f}%" for t in tolerances)


def render_markdown(m: dict[str, Any], command: str, seconds: float) -> str:
    from sogni_protocol.image_encoding import JPEG_QUALITY, WEBP_QUALITY

    s, tol = m["settings"], m["tolerance"]
    n_held = sum(h["n_held"] for h in m["honest"].values())
    enc = m["encoders"]
    lines = [
        "## Image check: delivered image vs the committed final latent's decode",
        "",
        f"Command: `{command}` ({seconds:.0f} s). Model `sogni-shapes-64` (64x64, "
        f"{tt.STEPS} steps, guidance {tt.GUIDANCE:g}), jobs cycling through the schedulers, "
        "random shape captions and seeds. The worker renders as the backend does and delivers "
        f"a PNG, a JPEG (quality {JPEG_QUALITY}, 4:2:0) or a WebP (quality {WEBP_QUALITY}) "
        "through the node's encoder; a verifier decodes the worker's final latent x_N in the "
        "declared mode, 1 thread, batch 1, this CPU's code paths "
        "(`sogni_node.verify.decode_check`) and answers a PNG; for a lossy job the "
        "coordinator puts those pixels through the same encoder "
        "(`sogni_protocol.image_encoding`); the distance is the largest mean absolute "
        "difference over any 8x8 block and channel, in 0..255 levels "
        "(`sogni_coordinator.image_verify.check_distance`). See docs/IMAGE_CHECK.md. "
        f"Encoders here: Pillow {enc['pillow']}, libjpeg-turbo {enc['libjpeg_turbo']}, "
        f"libwebp {enc['libwebp']}.",
        "",
        f"Sizes: {s['calibration_renders']} calibration renders per provider (PNG), "
        f"{s['calibration_renders'] + s['lossy_calibration_renders']} for the lossy formats, "
        f"{n_held} held-out honest checks per output format (other prompts and seeds, spread "
        f"over the providers), {s['cheat_jobs']} jobs per cheat and format. Tolerance per "
        f"declared mode: PNG, {SAFETY:g} x the largest calibration distance of that mode; "
        f"JPEG and WebP, {LOSSY_SAFETY:g} x the largest calibration distance of the modes "
        "whose VAE decodes in the same dtype (the quantized modes keep it float32), since "
        "their honest distance is whole quantiser steps flipping where pixels differ by a "
        f"level, not numeric noise; at least {FLOOR:g} level."
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
        "Max distance per job format; identical: the delivered bytes equal the reference's "
        "(the verifier's PNG, or its pixels through the node's encoder).",
        "",
    ]
    rows = []
    rejected = dict.fromkeys(JOB_FORMATS, 0)
    rejected_shipped = dict.fromkeys(JOB_FORMATS, 0)
    for name in m["providers"]:
        h = m["honest"][name]
        n, nh, total = h["n_cal"], h["n_held"], len(h["d"]["png"])
        row: list[Any] = [name, total]
        for f in JOB_FORMATS:
            d = h["d"][f]
            held = d[n : n + nh]
            bad = sum(x > tol[f][h["mode"]] for x in held)
            bad_shipped = sum(x > _shipped(h["mode"], f) for x in held)
            rejected[f] += bad
            rejected_shipped[f] += bad_shipped
            row += [_v(max(d)), f"{h['same'][f]}", f"{bad} / {bad_shipped}"]
        rows.append(tuple(row))
    head: list[str] = ["provider", "checks"]
    for f in JOB_FORMATS:
        head += [f"{f} max", f"{f} identical", f"{f} held-out rejected (run's / shipped tol.)"]
    lines.append(common.table(tuple(head), rows))
    if m["skipped"]:
        lines += ["", "Not run here: " + "; ".join(f"{k} ({v})" for k, v in m["skipped"].items())]
    modes = list(tol["png"])
    lines += [
        "",
        "### Tolerance",
        "",
        common.table(
            (
                "declared mode",
                *(f"{f}: max calibration / tolerance (shipped)" for f in JOB_FORMATS),
            ),
            [
                (
                    mode,
                    *(
                        f"{_v(m['worst'][f][mode])} / **{_v(tol[f][mode])}** "
                        f"({_v(_shipped(mode, f))})"
                        for f in JOB_FORMATS
                    ),
                )
                for mode in modes
            ],
        ),
        "",
    ]

    def verdict(bad: int) -> str:
        return "met" if n_held >= 1000 and bad == 0 else "not met"

    for f in JOB_FORMATS:
        lines.append(
            f"Held-out honest {f.upper()} checks over their mode's tolerance: "
            f"{rejected[f]} of {n_held} at this run's, {rejected_shipped[f]} at the shipped. "
            "Floor, 0 false rejections in 1,000 honest checks: "
            f"**{verdict(rejected_shipped[f])}** at the shipped tolerances, "
            f"{verdict(rejected[f])} at this run's"
            + (" (fewer than 1,000 checks in a quick run)." if n_held < 1000 else ".")
        )
        lines.append("")
    lines += [
        "### Detection per checked job",
        "",
        "The worker (fp32) commits an honest trajectory and delivers another image in the "
        "job's format. Caught: over the fp32 tolerance of that format, this run's / the "
        "shipped.",
        "",
    ]
    crow = []
    for cheat in CHEATS:
        row = [cheat]
        for f in JOB_FORMATS:
            ds = m["cheats"][f][cheat]
            caught = _caught(ds, tol[f]["fp32"], _shipped("fp32", f))
            row.append(f"{_v(min(ds))} / {_v(common.median(ds))}: **{caught}**")
        crow.append(tuple(row))
    lines += [
        common.table(
            (
                "cheat",
                *(
                    f"{f} job (tol. {_v(tol[f]['fp32'])} / {_v(_shipped('fp32', f))}): "
                    "min / median, caught"
                    for f in JOB_FORMATS
                ),
            ),
            crow,
        ),
        "",
    ]
    for mode, mc in m.get("mode_cheats", {}).items():
        lines += _mode_cheats_markdown(mode, mc, tol)
    escaped = m.get("escaped_pixels_rule")
    if escaped:
        n_jobs = len(m["cheats"]["png"][CHEATS[0]])
        png_tol = _v(tol["png"]["fp32"])
        prow = [
            (cheat, *(f"**{100 * (n_jobs - escaped[f][cheat]) / n_jobs:.0f}%**" for f in FORMATS))
            for cheat in CHEATS
        ]
        lines += [
            "Pixels rule (`image_verify.judge_image`; the worker names `+open-pixels` and opens "
            "the lossless pixels of its JPEG or WebP): caught unless some pixels it could open "
            f"(its honest pixels, the cheat's pixels, or the delivered file's decode) are within "
            f"the PNG tolerance ({png_tol}) of the decode and encode to the delivered bytes. "
            "Honest lossy checks under it: the opened pixels are the PNG job's image and the "
            "delivered file their encode, so its false rejections are the PNG column's.",
            "",
            common.table(("cheat", *(f"{f} job, pixels rule: caught" for f in FORMATS)), prow),
            "",
        ]
    if "codec_cheats" in m:
        lines += _codec_markdown(m)
    lines += [
        "### Cost of one check",
        "",
    ]
    c = m["cost"]
    r, dec, cmp_, jpg = (common.median(c[k]) for k in ("render", "decode", "compare", "jpeg"))
    pix = common.median(c["pixels"]) if c.get("pixels") else math.nan
    cod = common.median(c["codec"]) if c.get("codec") else math.nan
    lines += [
        common.table(
            (
                "render ms (baseline)",
                "verifier decode ms",
                "coordinator compare ms (PNG job)",
                "(JPEG job, re-encode + compare)",
                "(WebP job, pixels rule)",
                "(WebP job, codec rule)",
                "check / render",
            ),
            [
                (
                    f"{1000 * r:.0f}",
                    f"{1000 * dec:.1f}",
                    f"{1000 * cmp_:.2f}",
                    f"{1000 * jpg:.2f}",
                    f"{1000 * pix:.2f}",
                    f"{1000 * cod:.2f}",
                    f"{(dec + max(cmp_, jpg, pix, cod)) / r:.3f}",
                )
            ],
        ),
        "",
        f"Median of {s['cost_runs']} renders and checks after one warm-up, interleaved, "
        "float32, 1 thread. The render is the whole pipeline call; the check is one VAE "
        "decode and PNG encode on the verifier and, on the coordinator, two image decodes and "
        "the block compare (a lossy job adds one encode of the verifier's pixels; timed on an "
        "image that differs, so no byte-equality shortcut; the pixels rule: the opened pixels "
        "against the decode, one encode of them and a byte compare, on an honest WebP; the codec "
        "rule: the same, then both files decoded and compared, on an honest WebP of libwebp "
        "method 3 claiming an unmeasured build). The "
        "network round trip, and the opened PNG it carries, are not counted.",
    ]
    return "\n".join(lines)


def _mode_cheats_markdown(
    mode: str, mc: dict[str, dict[str, list[float]]], tol: dict[str, Any]
) -> list[str]:
    """The cheats against a worker declaring `mode` (block rule, that mode's tolerance)."""
    rows = []
    for cheat in CHEATS:
        row: list[Any] = [cheat]
        for f in JOB_FORMATS:
            ds = mc[f][cheat]
            caught = _caught(ds, tol[f][mode], _shipped(mode, f))
            row.append(f"{_v(min(ds))} / {_v(common.median(ds))}: **{caught}**")
        for f in FORMATS:
            esc = mc[f"{f} pixels rule escaped"][cheat]
            row.append(f"**{100 * (len(esc) - sum(esc)) / len(esc):.0f}%**")
        rows.append(tuple(row))
    head = [
        f"{f} job (tol. {_v(tol[f][mode])} / {_v(_shipped(mode, f))}): min / median, caught"
        for f in JOB_FORMATS
    ]
    head += [f"{f} job, pixels rule (PNG tol. {_v(tol['png'][mode])}): caught" for f in FORMATS]
    return [
        f"A {mode} worker (path-bound: `{FP16.dtype if mode == 'fp16' else mode}@<its code "
        "path>`) commits an honest trajectory rendered in that mode, the verifier decodes its "
        "x_N in that mode, and the worker delivers another image in the job's format (another "
        "seed's or prompt's image rendered in float32: a cheater may make it any way it "
        f"likes). Caught: over the {mode} tolerance of that format (this run's / the shipped); "
        "under the pixels rule, "
        f"as above but at the {mode} PNG tolerance (the codec rule was measured for fp32 "
        "workers only).",
        "",
        common.table(("cheat", *head), rows),
        "",
    ]


def _shipped_codec() -> str:
    return ", ".join(f"{f} {_v(t)}" for f, t in CODEC_TOLERANCES.items())


def _codec_markdown(m: dict[str, Any]) -> list[str]:
    """The codec rule's subsection: honest other builds, tolerance, detection."""
    ctol = m["codec_tolerance"]
    lines = [
        "### Codec rule: opened pixels, a claimed build not measured to encode alike",
        "",
        "The worker opens its pixels and names a codec build outside `BYTE_EXACT_CODECS` "
        f"(cheats claim `{UNMEASURED}`), so byte equality cannot be required. The pixels must "
        "still pass the PNG tolerance against the decode, and the delivered file must lie "
        "within the codec tolerance of the shared encoder's output of those pixels here "
        "(`image_verify.judge_image`, rule `codec`; 8x8 block distance). Honest other builds "
        "are simulated on every honest render (the worker's own pixels encoded otherwise, "
        "`bench.image_tolerance.other_builds`); the tolerance is "
        f"{CODEC_SAFETY:g} x the largest calibration distance of `{CODEC_BASIS}` (JPEG), for "
        "both formats.",
        "",
    ]
    rows = []
    for f in FORMATS:
        names = list(next(iter(m["honest"].values()))["codec"][f])
        for name in names:
            allv = [x for h in m["honest"].values() for x in h["codec"][f][name]]
            held = [
                x
                for h in m["honest"].values()
                for x in h["codec"][f][name][h["n_cal"] : h["n_cal"] + h["n_held"]]
            ]
            basis = name == CODEC_BASIS
            rows.append(
                (
                    f"{f}: {name}" + (" (basis)" if basis else " (not covered)"),
                    len(allv),
                    sum(x == 0 for x in allv),
                    f"{_v(common.median(allv))} / {_v(max(allv))}",
                    f"{sum(x > ctol for x in held)} of {len(held)}",
                    f"{100 * sum(x > ctol for x in allv) / len(allv):.1f}%",
                )
            )
    lines += [
        common.table(
            (
                "simulated build",
                "checks",
                "identical bytes",
                "median / max distance",
                "held-out over tolerance",
                "all over tolerance",
            ),
            rows,
        ),
        "",
        f"Codec tolerance: {_v(m['codec_worst'])} x {CODEC_SAFETY:g} -> **{_v(ctol)}** levels "
        f"(shipped `image_verify.CODEC_TOLERANCES`: {_shipped_codec()}). Each cheat claims an "
        "unmeasured build and opens whichever pixels it could (its honest pixels, the cheat's "
        "pixels, the delivered file's decode) that pass the PNG leg; caught when even the "
        "closest is over the tolerance, this run's / the shipped (inf: no pixels it could "
        "open pass the PNG leg).",
        "",
    ]
    crows = []
    for cheat in CHEATS:
        row: list[Any] = [cheat]
        for f in FORMATS:
            ds = m["codec_cheats"][f][cheat]
            caught = _caught(ds, ctol, CODEC_TOLERANCES[f])
            row.append(f"{_v(min(ds))} / {_v(common.median(ds))}: **{caught}**")
        crows.append(tuple(row))
    lines += [
        common.table(
            (
                "cheat",
                *(
                    f"{f} job, codec rule (tol. {_v(ctol)} / {_v(CODEC_TOLERANCES[f])}): "
                    "min / median, caught"
                    for f in FORMATS
                ),
            ),
            crows,
        ),
        "",
    ]
    return lines


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
    parser.add_argument(
        "--from-json",
        type=Path,
        help="re-render the BENCHMARKS.md section from this run's raw results (no measuring)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        _child(ns.child, Mode(ns.dtype, ns.quantize))
    elif ns.from_json:
        raw_results = json.loads(ns.from_json.read_text())
        written = common.rewrite_section(
            "image",
            lambda took: render_markdown(raw_results, "python -m bench image", float(took)),
        )
        print(f"wrote {written}")
    else:
        cmd = "python -m bench.image_tolerance" + (" --quick" if ns.quick else "")
        print(run(ns.quick, cmd))
