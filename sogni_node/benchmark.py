"""`sogni-node bench`: how fast this machine renders each installed model, and its tier.

For each model, render at its defaults (one warm-up, then the median of `runs`) and compare
with the catalog's baseline render seconds for the same job (what the reference hardware
takes). speed = baseline / measured: 2.0 means twice as fast as the reference. The result is
saved to `<data_dir>/bench.json`; the node advertises the median speed.

Tier (whitepaper, "Dual-Tier Architecture"): the fast network is CUDA GPUs at reference
speed or better (the coordinator also requires a worker licence and the minimum stake, on
chain); everything else, Macs first, serves the relaxed network.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sogni_node.models import ModelRegistry
from sogni_node.render.backend import Backend, RenderJob
from sogni_protocol.atomic import atomic_write_text
from sogni_protocol.catalog import Catalog, default_catalog
from sogni_protocol.pricing import job_render_seconds

FAST_MIN_SPEED = 1.0


@dataclass(frozen=True)
class ModelBench:
    model_id: str
    model_class: str
    steps: int
    width: int
    height: int
    measured_seconds: float
    baseline_seconds: float
    speed: float


@dataclass(frozen=True)
class BenchReport:
    device: str
    models: list[ModelBench]
    speed: float
    tier: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _render_seconds(backend: Backend, job: RenderJob) -> float:
    started = time.perf_counter()
    backend.render(job, lambda _step: None, lambda: False)
    return time.perf_counter() - started


def run_bench(
    backend: Backend,
    registry: ModelRegistry,
    device: str,
    *,
    runs: int = 3,
    catalog: Catalog | None = None,
) -> BenchReport:
    catalog = catalog or default_catalog()
    results = []
    for model_id in registry.ids():
        spec = registry.get(model_id)
        job = spec.default_job("a red circle on a blue background")
        _render_seconds(backend, job)  # warm-up: load and first-run costs are not speed
        measured = statistics.median(_render_seconds(backend, job) for _ in range(runs))
        baseline = job_render_seconds(model_id, job.steps, job.width, job.height, catalog)
        results.append(
            ModelBench(
                model_id,
                spec.model_class,
                job.steps,
                job.width,
                job.height,
                round(measured, 4),
                round(baseline, 4),
                round(baseline / measured, 3),
            )
        )
    speed = statistics.median(r.speed for r in results) if results else 0.0
    tier = "fast" if device == "cuda" and speed >= FAST_MIN_SPEED else "relaxed"
    return BenchReport(device, results, round(speed, 3), tier)


def save_report(report: BenchReport, path: Path) -> None:
    """Atomic and durable: the node advertises this speed, and a half-written file after a
    crash would read as 0 (never measured) until the next bench."""
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2))


def saved_speed(path: Path) -> float:
    """The speed measured last by `sogni-node bench` (0 when never measured)."""
    try:
        return float(json.loads(path.read_text())["speed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
