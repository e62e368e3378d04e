"""Re-run a backend's committed trajectory step by step, as a verifier does."""

from __future__ import annotations

from typing import Any

from sogni_node.render import RenderJob
from sogni_node.verify import step_check as sc


def rerun_distances(pipe: Any, job: RenderJob, trajectory: Any, sched: Any) -> list[float]:
    """Each step k re-run from the committed leaf k (the seed's noise for k = 0; a multistep
    scheduler's state from the leaf's model outputs): its normalised distance to leaf k+1."""
    x0 = sc.start_latents(
        pipe, seed=job.seed, width=job.width, height=job.height, steps=job.steps, scheduler=sched
    )
    distances: list[float] = []
    for k in range(job.steps):
        record = trajectory.record(k)
        x_k = x0 if k == 0 else record.tensor("latents")
        outputs = sorted(n for n in record.tensors if n.startswith("model_outputs."))
        x_pred = sc.recompute_step(
            pipe,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            guidance=job.guidance,
            steps=job.steps,
            width=job.width,
            height=job.height,
            seed=job.seed,
            scheduler=sched,
            k=k,
            latents_k=x_k,
            scheduler_state=sc.StepState(tuple(record.tensor(n) for n in outputs))
            if outputs
            else None,
        )
        distances.append(
            sc.normalised_distance(trajectory.record(k + 1).tensor("latents"), x_pred, x_k)
        )
    return distances
