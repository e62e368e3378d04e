"""One committed denoising step, re-run by a verifier (`sogni_node.verify.step_check`).

An honest render's latents are captured at every step (the test's own `callback_on_step_end`,
with the noise pinned as the backend must pin it); re-running step k from the captured x_k
must land on the captured x_{k+1}, and every way of faking a step must land far away.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sogni_node.render.diffusers_backend import SCHEDULERS
from sogni_node.render.noise import initial_latents, pin_step_noise
from sogni_node.verify import step_check as sc
from tests.render._steps import rerun_distances

STEPS = 6
GUIDANCE = 5.0
SIZE = 64
PROMPT = "a red circle on a blue background"
NEGATIVE = "green"
SEED = 1234

HONEST_MAX = 5e-5
"""Largest distance an honest step may show: the float32 tolerance `python -m bench tolerance`
proposes (10x the worst honest float32 difference it measured across 1 vs 2 threads, a batch
of 2 and the x86-64 code paths of other CPUs, about 5e-6). The same engine reproduces a step
exactly (0.0), as asserted below."""

CHEAT_MIN = 100 * HONEST_MAX
"""Every cheat below lands at least this far (measured on this model: 1e-2 and more, most
near 1; the smallest is the other prompt's last steps, since the random text encoder barely
tells prompts apart)."""


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> Iterator[Any]:
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(tiny_path), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    yield p


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def scheduler(pipe: Any, name: str) -> Any:
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(pipe.scheduler.config, **overrides)


def render(
    pipe: Any,
    sched: Any,
    *,
    seed: int = SEED,
    noise_seed: int | None = None,
    prompt: str = PROMPT,
    unet_steps: set[int] | None = None,
) -> list[torch.Tensor]:
    """x_0 .. x_STEPS of a render pinned as the backend pins it (`sogni_node.render.noise`).
    `noise_seed`: the steps' noise from another seed; `unet_steps`: run the UNet only at these
    steps, reusing its last output at the others."""
    pipe.scheduler = type(sched).from_config(sched.config)
    pin_step_noise(pipe.scheduler, seed if noise_seed is None else noise_seed)
    noise = initial_latents(seed, sc.latent_shape(pipe, width=SIZE, height=SIZE))
    latents: list[torch.Tensor] = []

    def step_end(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents.append(kwargs["latents"].clone())
        return kwargs

    unet = pipe.unet
    if unet_steps is not None:
        original, calls, last = unet.forward, [0], [None]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if calls[0] in unet_steps or last[0] is None:
                last[0] = original(*args, **kwargs)
            calls[0] += 1
            return last[0]

        unet.forward = forward
    try:
        pipe(
            prompt=prompt,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=SIZE,
            height=SIZE,
            latents=noise,
            output_type="latent",
            callback_on_step_end=step_end,
        )
    finally:
        if unet_steps is not None:
            del unet.forward
    return [noise * pipe.scheduler.init_noise_sigma, *latents]


def distance(pipe: Any, sched: Any, traj: list[torch.Tensor], k: int, seed: int = SEED) -> float:
    args: dict[str, Any] = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "guidance": GUIDANCE,
        "steps": STEPS,
        "scheduler": sched,
        "k": k,
    }
    state = sc.multistep_state(pipe, **args, previous=traj[:k])
    x_pred = sc.recompute_step(
        pipe,
        **args,
        width=SIZE,
        height=SIZE,
        seed=seed,
        latents_k=traj[k],
        scheduler_state=state,
    )
    assert x_pred.shape == traj[k + 1].shape
    return sc.normalised_distance(traj[k + 1], x_pred, traj[k])


def start(pipe: Any, sched: Any, traj: list[torch.Tensor], seed: int = SEED) -> float:
    x0 = sc.start_latents(pipe, seed=seed, width=SIZE, height=SIZE, steps=STEPS, scheduler=sched)
    return sc.start_distance(traj[0], x0)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm"])
def test_honest_steps_reproduce_exactly(pipe: Any, name: str) -> None:
    sched = scheduler(pipe, name)
    traj = render(pipe, sched)
    assert len(traj) == STEPS + 1
    assert start(pipe, sched, traj) == 0.0
    assert [distance(pipe, sched, traj, k) for k in range(STEPS)] == [0.0] * STEPS


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras"])
def test_honest_steps_on_other_threads_stay_within_bound(pipe: Any, name: str) -> None:
    """Rendered with 2 threads, checked with 1: rounding differs, the bound holds."""
    sched = scheduler(pipe, name)
    torch.set_num_threads(2)
    traj = render(pipe, sched)
    torch.set_num_threads(1)
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert max(ds) <= HONEST_MAX, ds


@pytest.fixture(scope="module")
def other_model(pipe: Any) -> Any:
    """The tiny model's architecture with another seed's random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    other: Any = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    return other


def _all_far(ds: list[float]) -> bool:
    return all(d > CHEAT_MIN for d in ds)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras"])
def test_another_models_steps_are_far(pipe: Any, other_model: Any, name: str) -> None:
    sched = scheduler(pipe, name)
    traj = render(other_model, sched)
    assert start(pipe, sched, traj) == 0.0  # x_0 is free to get right
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert _all_far(ds), ds


def test_a_skipped_step_is_far_and_the_others_honest(pipe: Any) -> None:
    sched = scheduler(pipe, "euler")
    skipped = 3
    traj = render(pipe, sched, unet_steps=set(range(STEPS)) - {skipped})
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert ds[skipped] > CHEAT_MIN, ds
    assert all(d == 0.0 for k, d in enumerate(ds) if k != skipped), ds


def test_all_steps_but_one_skipped_are_far(pipe: Any) -> None:
    sched = scheduler(pipe, "ddim")
    traj = render(pipe, sched, unet_steps={0})
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert ds[0] == 0.0
    assert _all_far(ds[1:]), ds


def test_another_seeds_noise_is_far(pipe: Any) -> None:
    """euler_a draws noise in every step: another seed's is caught at every step; a
    deterministic scheduler's other-seed render is caught by its x_0."""
    sched = scheduler(pipe, "euler_a")
    traj = render(pipe, sched, noise_seed=SEED + 1)
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert _all_far(ds[:-1]), ds  # the last step adds no noise (sigma_to = 0)
    euler = scheduler(pipe, "euler")
    assert start(pipe, euler, render(pipe, euler, seed=SEED + 1)) > 0.5


def test_seed_distance_takes_any_rounding_of_this_seeds_noise_only(pipe: Any) -> None:
    """The re-render's seed check (`seed_distance`): the seed's noise as float32, float16 or
    bfloat16 rounds it is 0; another seed's is near sqrt(2) at every rounding; a leaf of
    another shape or with a NaN is inf, never a pass."""
    shape = sc.latent_shape(pipe, width=SIZE, height=SIZE)
    noise = initial_latents(SEED, shape)

    def d(leaf: torch.Tensor, **kw: Any) -> float:
        return sc.seed_distance(pipe, leaf, seed=SEED, width=SIZE, height=SIZE, **kw)

    for dtype in sc.ROUNDINGS:
        assert d(noise.to(dtype).float()) == 0.0
    assert d(noise.half().float(), dtypes=(torch.float32,)) > 0.0  # the rounding is named
    assert 1.3 < d(initial_latents(SEED + 1, shape)) < 1.5
    assert d(noise[..., :-1]) == math.inf
    poisoned = noise.clone()
    poisoned[0, 0, 0, 0] = math.nan
    assert d(poisoned) == math.inf


def test_noise_instead_of_a_latent_is_far(pipe: Any) -> None:
    sched = scheduler(pipe, "euler")
    traj = render(pipe, sched)
    g = torch.Generator().manual_seed(5)
    for k in range(1, STEPS + 1):
        r = torch.randn(traj[k].shape, generator=g)
        traj[k] = r * torch.linalg.vector_norm(traj[k]) / torch.linalg.vector_norm(r)
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert _all_far(ds), ds


def test_another_prompts_trajectory_is_far(pipe: Any) -> None:
    sched = scheduler(pipe, "euler")
    traj = render(pipe, sched, prompt="a white star on a black background")
    ds = [distance(pipe, sched, traj, k) for k in range(STEPS)]
    assert _all_far(ds), ds


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras"])
def test_a_backend_renders_committed_steps_reproduce(pipe: Any, backend: Any, name: str) -> None:
    """The diffusers backend's own trajectory (leaf 0 = unscaled noise, leaf k = x_k with the
    scheduler state after it), checked with the verifier's own copy of the model: every step
    re-runs exactly from the committed leaves, DPM++ 2M from the committed model outputs (no
    second UNet call)."""
    from sogni_node.models import TINY_MODEL_ID
    from sogni_node.render import RenderJob

    job = RenderJob(
        model_id=TINY_MODEL_ID,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance=GUIDANCE,
        scheduler=name,
        width=SIZE,
        height=SIZE,
        seed=SEED,
    )
    out = backend.render(job, lambda _s: None, lambda: False)
    trajectory = getattr(out, "trajectory", None)
    if trajectory is None:
        pytest.skip("this backend records no trajectory")
    sched = scheduler(pipe, name)
    x0 = sc.start_latents(pipe, seed=SEED, width=SIZE, height=SIZE, steps=STEPS, scheduler=sched)
    leaf0 = trajectory.record(0).tensor("latents")
    assert torch.equal(leaf0 * fresh_sigma(sched), x0)
    assert rerun_distances(pipe, job, trajectory, sched) == [0.0] * STEPS


def fresh_sigma(sched: Any) -> Any:
    return sc.fresh_scheduler(sched, STEPS, "cpu").init_noise_sigma


def test_multistep_needs_the_earlier_outputs(pipe: Any) -> None:
    sched = scheduler(pipe, "dpmpp_2m_karras")
    traj = render(pipe, sched)
    with pytest.raises(ValueError, match="scheduler_state"):
        sc.recompute_step(
            pipe,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            guidance=GUIDANCE,
            steps=STEPS,
            width=SIZE,
            height=SIZE,
            seed=SEED,
            scheduler=sched,
            k=2,
            latents_k=traj[2],
        )


def test_schedulers_with_other_hidden_state_are_refused(pipe: Any) -> None:
    from diffusers import HeunDiscreteScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler

    for cls in (HeunDiscreteScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler):
        sched = cls.from_config(pipe.scheduler.config)
        with pytest.raises(NotImplementedError):
            sc.recompute_step(
                pipe,
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                guidance=GUIDANCE,
                steps=STEPS,
                width=SIZE,
                height=SIZE,
                seed=SEED,
                scheduler=sched,
                k=1,
                latents_k=torch.zeros(1, 4, 16, 16),
            )


def test_step_k_draws_the_backends_noise_for_its_step() -> None:
    """Step k here (x_k -> x_{k+1}) is the backend's step k + 1 (it counts from 1)."""
    from sogni_node.render.noise import step_generator

    for k in (0, 3):
        a = torch.randn(8, generator=sc.step_noise(SEED, k))
        b = torch.randn(8, generator=step_generator(SEED, k + 1))
        assert torch.equal(a, b)


def test_normalised_distance() -> None:
    x_k = torch.zeros(1, 4, 2, 2)
    x_next = torch.ones(1, 4, 2, 2)  # step of norm 4
    assert sc.normalised_distance(x_next, x_next, x_k) == 0.0
    assert sc.normalised_distance(x_next, x_next + 0.5, x_k) == pytest.approx(0.5)
    assert sc.normalised_distance(x_k, x_next, x_k) == math.inf  # a latent that did not move
    assert sc.normalised_distance(x_k, x_k, x_k) == 0.0
