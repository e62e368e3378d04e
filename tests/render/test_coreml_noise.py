"""The Core ML backend's denoising loop pins its randomness and records its trajectory.

Core ML predictions need macOS, so the loop (`run_coreml_pipeline`, the code that runs on
Macs) is driven here with a FAKE predict function standing in for the three Core ML models:
a deterministic function of the UNet's input, enough to exercise the scheduler. The
tokenizer and scheduler configuration are the real tiny model's. Asserted: leaf 0 is
`initial_latents(seed, shape)`; every step of a stochastic scheduler (Euler ancestral) uses
`step_generator(seed, k)`'s noise (an independent loop with those generators gives the same
bytes, one with a single shared generator does not); and the committed root is the one a
verifier recomputes from the opened leaves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sogni_node.models.tiny import TINY_MODEL_ID
from sogni_node.render.backend import RenderJob
from sogni_node.render.coreml_backend import CoreMLParts, run_coreml_pipeline
from sogni_node.render.diffusers_backend import SCHEDULERS
from sogni_node.render.noise import initial_latents, step_generator
from sogni_node.render.trajectory import Trajectory, TrajectoryRecorder
from sogni_protocol.trajectory import root_of, step_digest, verify_step

SHAPE = (4, 8, 8)
GUIDANCE = 5.0


def _fake_parts() -> CoreMLParts:
    """Stand-ins for the Core ML models (a fake: Core ML needs macOS). The UNet's noise
    prediction depends on its input and differs between the halves, so guidance matters."""

    def text(d: Any) -> dict[str, Any]:
        ids = np.asarray(d["input_ids"], dtype=np.float32)
        return {"last_hidden_state": np.full((1, ids.shape[1], 32), ids.mean() / 1000, np.float32)}

    def unet(d: Any) -> dict[str, Any]:
        sample = np.asarray(d["sample"], dtype=np.float32)
        scale = np.asarray([0.1, 0.2], dtype=np.float32).reshape(2, 1, 1, 1)
        return {"noise_pred": (sample * scale).astype(np.float32)}

    def vae(d: Any) -> dict[str, Any]:
        z = np.asarray(d["z"], dtype=np.float32)
        return {"image": np.zeros((1, 3, z.shape[2] * 8, z.shape[3] * 8), np.float32)}

    return CoreMLParts(text, unet, vae, SHAPE, 77, 0.18215)


def _job(scheduler: str | None, steps: int = 4, seed: int = 11) -> RenderJob:
    return RenderJob(
        model_id=TINY_MODEL_ID,
        prompt="red circle",
        negative_prompt="",
        steps=steps,
        guidance=GUIDANCE,
        scheduler=scheduler,
        width=64,
        height=64,
        seed=seed,
    )


def _render(tiny_path: Path, job: RenderJob) -> Trajectory:
    recorder = TrajectoryRecorder()
    steps: list[int] = []
    run_coreml_pipeline(
        _fake_parts(), tiny_path, job, steps.append, lambda: False, recorder=recorder
    )
    assert steps == list(range(1, job.steps + 1))
    return recorder.finish()


def _replay(tiny_path: Path, job: RenderJob, generator_for: Any) -> list[torch.Tensor]:
    """The loop again, written out independently: the fake UNet, guidance, and the
    scheduler's step given `generator_for(k)` as its generator. Returns leaves 1..n."""
    cls, overrides = SCHEDULERS[job.scheduler or "euler_a"]
    config = json.loads((tiny_path / "scheduler" / "scheduler_config.json").read_text())
    scheduler = cls.from_config(config, **overrides)
    scheduler.set_timesteps(job.steps, device="cpu")
    x = initial_latents(job.seed, (1, *SHAPE)) * scheduler.init_noise_sigma
    leaves = []
    for k, t in enumerate(scheduler.timesteps, start=1):
        model_in = scheduler.scale_model_input(torch.cat([x] * 2), t)
        uncond, cond = (model_in * torch.tensor([0.1, 0.2]).reshape(2, 1, 1, 1)).chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        x = scheduler.step(guided, t, x, generator=generator_for(k)).prev_sample
        leaves.append(x)
    return leaves


def test_leaf_0_is_the_seeds_pinned_noise(tiny_path: Path) -> None:
    job = _job("euler")
    trajectory = _render(tiny_path, job)
    expected = initial_latents(job.seed, (1, *SHAPE)).numpy()
    assert np.array_equal(trajectory.record(0).latents, expected)
    other = _render(tiny_path, _job("euler", seed=12))
    assert not np.array_equal(other.record(0).latents, expected)


def test_each_stochastic_step_draws_the_pinned_generators_noise(tiny_path: Path) -> None:
    job = _job("euler_a")
    trajectory = _render(tiny_path, job)
    pinned = _replay(tiny_path, job, lambda k: step_generator(job.seed, k))
    for k, leaf in enumerate(pinned, start=1):
        assert np.array_equal(trajectory.record(k).latents, leaf.numpy()), k
    shared = torch.Generator("cpu").manual_seed(job.seed)  # what the loop used to do
    unpinned = _replay(tiny_path, job, lambda k: shared)
    assert not np.array_equal(trajectory.record(job.steps).latents, unpinned[-1].numpy())


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m_karras"])
def test_the_committed_root_is_what_a_verifier_recomputes_from_the_leaves(
    tiny_path: Path, scheduler: str
) -> None:
    job = _job(scheduler)
    trajectory = _render(tiny_path, job)
    assert trajectory.n_leaves == job.steps + 1
    digests = []
    for k in range(trajectory.n_leaves):
        opening = trajectory.open(k)
        digest = step_digest(opening.record.entries())  # recomputed from the revealed entries
        assert verify_step(trajectory.root, k, digest, opening.proof, opening.n_leaves)
        digests.append(digest)
    assert root_of(digests) == trajectory.root
    assert _render(tiny_path, job).root == trajectory.root  # the same job commits the same
    if scheduler == "dpmpp_2m_karras":  # multistep: the earlier model output is committed
        assert any(n.startswith("model_outputs.") for n in trajectory.record(2).tensors)
