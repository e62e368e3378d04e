"""Re-run one denoising step of a Stable Diffusion render and measure how far a commitment is.

Why: with trajectory commitments (docs/TRAJECTORY.md) a provider commits every latent
x_0 .. x_n of a render. A verifier that holds the same model re-runs ONE step from a committed
x_k (same scheduler state, prompt embedding, guidance and seed-derived noise) and compares its
x'_{k+1} with the committed x_{k+1}. On the same engine an honest step reproduces exactly; a
substituted model, a skipped step or noise in place of a latent lands far away. The distance
is normalised by the step's own size (docs/VERIFICATION.md has the measured tolerance):

    d = |x_{k+1} - x'_{k+1}| / |x_{k+1} - x_k|     (L2 norms)

Numbering here: step k (0-based) takes x_k to x_{k+1}; x_0 is the pipeline's starting latent,
the pinned noise times the scheduler's `init_noise_sigma` (`start_latents`). In the
commitment's numbering that is step k + 1 producing leaf k + 1, and leaf 0 is the noise
unscaled: x_0 = leaf 0 x init_noise_sigma, x_k = leaf k for k >= 1.

`recompute_step` reproduces what diffusers' `StableDiffusionPipeline.__call__` does inside its
denoising loop for step k and nothing else (no other step, no VAE): `encode_prompt` with
classifier-free guidance when guidance > 1, `scheduler.set_timesteps`, `scale_model_input`,
the UNet on the doubled batch, the guidance mix, `scheduler.step` with eta = 0.

Randomness is the backend's pinned randomness (`sogni_node.render.noise`): the starting noise
is `initial_latents(seed, ...)`, and the noise a stochastic scheduler (euler_a, lcm) draws in
step k comes from `noise.step_generator(seed, k + 1)` (`step_noise` below: the backend counts
steps from 1). A render that did not pin its noise that way cannot be checked at those steps.

Multistep schedulers (DPM-Solver++ 2M, `dpmpp_2m_karras`) carry the data predictions of earlier
steps into step k. `recompute_step` takes them as `scheduler_state` (a `StepState`): either
the state the provider committed with x_k (no extra cost; a lie in it is caught when its own
step is checked, if the verifier compares the state too) or `multistep_state`, which
recomputes it from the committed x_{k-1} with one more UNet evaluation. Other schedulers with
hidden state between steps (UniPC, DEIS, Heun, ...) are refused with NotImplementedError.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sogni_node.render import noise as pinned


def step_noise(seed: int, k: int) -> torch.Generator:
    """The generator step k (0-based, x_k -> x_{k+1}) draws its noise from: the backend's
    `sogni_node.render.noise.step_generator(seed, k + 1)`."""
    return pinned.step_generator(seed, k + 1)


NoiseSource = Callable[[int, int], torch.Generator]
"""(seed, k) -> the generator step k draws its noise from; `step_noise` by default."""


@dataclass(frozen=True)
class StepState:
    """What a multistep scheduler carries into step k: the converted model outputs (data
    predictions for DPM-Solver++) of the steps before k, oldest first. DPM-Solver++ 2M needs
    one (step k - 1's); more are ignored."""

    model_outputs: tuple[torch.Tensor, ...]


# --- the pieces of the pipeline's call ----------------------------------------------------------
def fresh_scheduler(scheduler: Any, steps: int, device: torch.device | str) -> Any:
    """A copy of `scheduler` (any diffusers scheduler, configured as the render's) with its
    timesteps set for `steps` steps, as `retrieve_timesteps` does; the argument is untouched."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps, device=device)
    return copy


SUPPORTED_SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDIMScheduler",
    "LCMScheduler",
    "DPMSolverMultistepScheduler",
)
"""Scheduler classes whose step k `recompute_step` can rebuild: the backend's table. The first
four carry nothing between steps but their step index; DPM-Solver multistep carries its earlier
model outputs (`StepState`). Others (Heun, KDPM2, LMS, PNDM, UniPC, DEIS, ...) keep other state
or call `step` more than once per pipeline step, and are refused."""


def _multistep_order(scheduler: Any) -> int:
    """How many earlier model outputs step k reads (0 for single-step schedulers)."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise NotImplementedError(
            f"{name} carries state between steps that step_check cannot rebuild; supported: "
            f"{', '.join(SUPPORTED_SCHEDULERS)}"
        )
    if name != "DPMSolverMultistepScheduler":
        return 0
    return int(scheduler.config.solver_order) - 1


def _first_index(scheduler: Any, timesteps: torch.Tensor) -> int:
    """The step index the pipeline's first `step` call starts from (the scheduler looks it up
    from the first timestep, which is not always 0 when timesteps repeat)."""
    find = getattr(scheduler, "index_for_timestep", None)
    return 0 if find is None else int(find(timesteps[0]))


def _place_at(scheduler: Any, timesteps: torch.Tensor, k: int) -> None:
    """Put a fresh scheduler where the pipeline's is just before its step k."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(_first_index(scheduler, timesteps) + k)
        if hasattr(scheduler, "_init_step_index"):  # = the begin index; convert_model_output
            scheduler._init_step_index(timesteps[k])  # reads it before any step call


@dataclass
class _Context:
    pipe: Any
    scheduler: Any
    timesteps: torch.Tensor
    embeds: torch.Tensor
    guidance: float
    cfg: bool
    timestep_cond: torch.Tensor | None
    device: torch.device
    dtype: torch.dtype


def _prepare(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str | None,
    guidance: float,
    steps: int,
    scheduler: Any,
    batch: int = 1,
) -> _Context:
    device = pipe._execution_device
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    embeds, negative = pipe.encode_prompt(prompt, device, batch, cfg, negative_prompt or None)
    if cfg:
        embeds = torch.cat([negative, embeds])
    sched = fresh_scheduler(scheduler, steps, device)
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(guidance - 1).repeat(batch)
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim
        ).to(device=device, dtype=embeds.dtype)
    return _Context(
        pipe, sched, sched.timesteps, embeds, guidance, cfg, timestep_cond, device, embeds.dtype
    )


def _model_output(ctx: _Context, k: int, latents: torch.Tensor) -> torch.Tensor:
    """The guided model output at step k, as the pipeline's loop computes it (scheduler placed)."""
    t = ctx.timesteps[k]
    model_input = torch.cat([latents] * 2) if ctx.cfg else latents
    model_input = ctx.scheduler.scale_model_input(model_input, t)
    out = ctx.pipe.unet(
        model_input,
        t,
        encoder_hidden_states=ctx.embeds,
        timestep_cond=ctx.timestep_cond,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        return_dict=False,
    )[0]
    if ctx.cfg:
        uncond, text = out.chunk(2)
        out = uncond + ctx.guidance * (text - uncond)
    return out


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """`prepare_extra_step_kwargs` of the pipeline, with eta = 0 as the backend leaves it."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _as_latents(latents: torch.Tensor, ctx: _Context) -> torch.Tensor:
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"expected one image's latents (1, C, H, W), got {tuple(latents.shape)}")
    return latents.to(device=ctx.device, dtype=ctx.dtype)


def _check_k(k: int, steps: int) -> None:
    if not 0 <= k < steps:
        raise ValueError(f"step k must be in [0, {steps}), got {k}")


# --- the public checks ---------------------------------------------------------------------------
@torch.no_grad()
def recompute_step(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str | None,
    guidance: float,
    steps: int,
    width: int,
    height: int,
    seed: int,
    scheduler: Any,
    k: int,
    latents_k: torch.Tensor,
    scheduler_state: StepState | None = None,
    noise: NoiseSource = step_noise,
) -> torch.Tensor:
    """x'_{k+1}: step k (0-based; x_0 is the starting noise) re-run from the committed x_k.

    `pipe` is a diffusers StableDiffusionPipeline (with the LoRAs the job named merged, if any);
    `scheduler` a diffusers scheduler configured as the render's (e.g. built from
    `SCHEDULERS[name]` over the model's scheduler config; it is copied, never changed).
    `scheduler_state` must be given for k >= 1 of a multistep scheduler (`multistep_state`).
    The result has the shape of `latents_k` (1, C, H, W), in the pipeline's dtype and device.
    `width`/`height` are checked against the latents' size.
    """
    _check_k(k, steps)
    ctx = _prepare(
        pipe,
        prompt=prompt,
        negative_prompt=negative_prompt,
        guidance=guidance,
        steps=steps,
        scheduler=scheduler,
    )
    order = _multistep_order(ctx.scheduler)
    if len(ctx.timesteps) != steps:
        raise ValueError(f"scheduler gave {len(ctx.timesteps)} timesteps for {steps} steps")
    x_k = _as_latents(latents_k, ctx)
    expected = latent_shape(pipe, width=width, height=height)[2:]
    if tuple(x_k.shape[-2:]) != expected:
        raise ValueError(f"latents of {tuple(x_k.shape[-2:])} for a {width}x{height} image")
    sched = ctx.scheduler
    _place_at(sched, ctx.timesteps, k)
    if order and k >= 1:
        if scheduler_state is None or not scheduler_state.model_outputs:
            raise ValueError(
                f"{type(sched).__name__} step {k} needs the earlier model outputs: pass "
                f"scheduler_state=multistep_state(...)"
            )
        kept = [o.to(device=ctx.device, dtype=ctx.dtype) for o in scheduler_state.model_outputs]
        kept = kept[-min(order, k) :]
        slots = len(sched.model_outputs)
        sched.model_outputs = [None] * (slots - len(kept)) + kept
        sched.lower_order_nums = min(k, slots)
    noise_pred = _model_output(ctx, k, x_k)
    kwargs = _step_kwargs(sched, noise(seed, k))
    return sched.step(noise_pred, ctx.timesteps[k], x_k, **kwargs, return_dict=False)[0]


@torch.no_grad()
def multistep_state(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str | None,
    guidance: float,
    steps: int,
    scheduler: Any,
    k: int,
    previous: Sequence[torch.Tensor],
) -> StepState:
    """The `StepState` step k of a multistep scheduler starts from, rebuilt from the committed
    latents before it (`previous` = [..., x_{k-2}, x_{k-1}], oldest first; the last
    solver_order - 1 are used; x_0 is the scaled start, `start_latents`, not the unscaled
    leaf 0): one UNet evaluation per latent used. Empty for single-step schedulers and k = 0."""
    _check_k(k, steps)
    ctx = _prepare(
        pipe,
        prompt=prompt,
        negative_prompt=negative_prompt,
        guidance=guidance,
        steps=steps,
        scheduler=scheduler,
    )
    need = min(_multistep_order(ctx.scheduler), k)
    if need == 0:
        return StepState(())
    if len(previous) < need:
        raise ValueError(f"step {k} needs the {need} committed latent(s) before it")
    outputs = []
    for back, latents in zip(range(need, 0, -1), previous[-need:], strict=True):
        j = k - back
        x_j = _as_latents(latents, ctx)
        sched = fresh_scheduler(scheduler, steps, ctx.device)
        _place_at(sched, ctx.timesteps, j)
        ctx.scheduler = sched
        outputs.append(sched.convert_model_output(_model_output(ctx, j, x_j), sample=x_j))
    return StepState(tuple(outputs))


def latent_shape(pipe: Any, *, width: int, height: int) -> tuple[int, int, int, int]:
    """(1, C, H, W) of one image's latents in `pipe`."""
    f = pipe.vae_scale_factor
    return (1, int(pipe.unet.config.in_channels), height // f, width // f)


def start_latents(
    pipe: Any, *, seed: int, width: int, height: int, steps: int, scheduler: Any
) -> torch.Tensor:
    """x_0: the pinned starting noise (`noise.initial_latents`, in the pipeline's dtype and on
    its device) times the scheduler's `init_noise_sigma` after `set_timesteps`, as the
    pipeline's `prepare_latents` scales it."""
    device = pipe._execution_device
    shape = latent_shape(pipe, width=width, height=height)
    x = pinned.initial_latents(seed, shape, dtype=pipe.unet.dtype, device=device)
    return x * fresh_scheduler(scheduler, steps, device).init_noise_sigma


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().to("cpu", torch.float64)))


def normalised_distance(x_next: torch.Tensor, x_pred: torch.Tensor, x_k: torch.Tensor) -> float:
    """|x_next - x_pred| / |x_next - x_k| (L2, in float64): how far the committed x_{k+1} is
    from the recomputed one, in units of the committed step. 0.0 when both are zero; inf when
    only the step is (a committed latent that did not move)."""
    a = x_next.detach().to("cpu", torch.float64)
    num = _norm(a - x_pred.detach().to("cpu", torch.float64).reshape(a.shape))
    den = _norm(a - x_k.detach().to("cpu", torch.float64).reshape(a.shape))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def start_distance(x_0: torch.Tensor, expected: torch.Tensor) -> float:
    """|x_0 - expected| / |expected|: a committed starting latent against `start_latents`."""
    e = expected.detach().to("cpu", torch.float64)
    num = _norm(x_0.detach().to("cpu", torch.float64).reshape(e.shape) - e)
    den = _norm(e)
    return num / den if den else (0.0 if num == 0.0 else math.inf)


ROUNDINGS = (torch.float32, torch.float16, torch.bfloat16)
"""The compute dtypes a node may cast its float32 starting noise to (any device)."""


def seed_distance(
    pipe: Any,
    leaf: torch.Tensor,
    *,
    seed: int,
    width: int,
    height: int,
    dtypes: Sequence[torch.dtype] = ROUNDINGS,
) -> float:
    """The seed check: `start_distance` of a committed leaf 0 (the unscaled starting noise)
    against the noise `seed` draws, cast to the closest of `dtypes` (the worker's compute
    dtype when it is known, as for a step check; any of `ROUNDINGS` for a re-rendered
    receipt, whose declared mode may be one nobody measured). `inf` for a leaf of another
    shape or with non-finite values. Another seed's noise lands near sqrt(2) whatever the
    rounding, so trying several costs the check nothing."""
    shape = latent_shape(pipe, width=width, height=height)
    if tuple(leaf.shape) != shape:
        return math.inf
    best = math.inf
    for dtype in dtypes:
        d = start_distance(leaf, pinned.initial_latents(seed, shape, dtype=dtype).float())
        if math.isfinite(d):
            best = min(best, d)
    return best
