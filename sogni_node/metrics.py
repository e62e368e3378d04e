"""The node's Prometheus metrics (`GET /metrics`) and readiness (`GET /readyz`).

Counts come from a `Worker` subclass that sees every slot claimed and every render's end
(the worker is shared by all coordinator sessions, so these are the node's totals); gauges
are read from memory at scrape time, the earnings gauges from totals that a task re-reads
from the journal off the event loop (`sogni_node.earnings`). Labels are model ids this node
serves ("other" otherwise) and outcomes: never a prompt, a job id or an error text.
Imported only when the HTTP listener is on (needs the `http` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sogni_node.earnings import EarningsTally
from sogni_node.journal import Journal
from sogni_node.render.backend import RenderCancelled
from sogni_node.worker import FAILURE_STAGES, Running, Worker
from sogni_protocol.logs import get_logger, tap_events
from sogni_protocol.metrics import (
    MAX_MODEL_LABELS,
    OTHER,
    RENDER_BUCKETS,
    LoopLag,
    ModelLabels,
    new_registry,
)
from sogni_protocol.pricing import MICRO

if TYPE_CHECKING:
    from sogni_node.http_api import NodeView
    from sogni_node.render.backend import RenderOutput
    from sogni_protocol.messages import JobParams

PREFIX = "sogni_node"
EARNINGS_INTERVAL = 15.0
"""How often the earnings gauges re-read the journal (a common scrape interval)."""

log = get_logger(__name__)

EVENT_COUNTS: dict[str, tuple[tuple[str, ...], str]] = {
    "step_reverified": (("step",), "done"),
    "verify_refused": (("step",), "refused"),
    "latent_decoded": (("decode",), "done"),
    "decode_refused": (("decode",), "refused"),
    "challenge_answered": ((), "answered"),
    "challenge_refused": ((), "refused"),
}
"""Log event -> (verification kind, or none for a challenge; outcome)."""


class LiveModelLabels(ModelLabels):
    """Model labels that grow with the models installed while the node runs (`add`), up to
    `MAX_MODEL_LABELS`: a model added by `sogni-node models add` is labelled at once."""

    def add(self, model_id: str) -> bool:
        """Allow `model_id` as a label; False if it already was or the set is full."""
        if model_id in self.allowed or len(self.allowed) >= MAX_MODEL_LABELS:
            return False
        self.allowed = self.allowed | {model_id}
        return True


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry, models: ModelLabels) -> None:
        self.registry = registry
        self.model = models
        self.received = Counter(
            f"{PREFIX}_jobs_received", "Offers taken into a render slot", registry=registry
        )

        def jobs(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_jobs_{name}", doc, ["model"], registry=registry)

        self.finished = jobs("finished", "Renders finished")
        self.failed = Counter(
            f"{PREFIX}_jobs_failed",
            "Jobs that failed (handed back), by where: render, journal, sign, trajectory, "
            "upload, other",
            ["model", "stage"],
            registry=registry,
        )
        self.handed_back = jobs(
            "handed_back", "Renders cancelled mid-way (handed back, or paid pro rata)"
        )
        for model in (*sorted(models.allowed), OTHER):  # every series exists from the start
            self._series(model)
        self.render_seconds = Histogram(
            f"{PREFIX}_render_seconds",
            "Wall time of finished renders",
            ["model"],
            buckets=RENDER_BUCKETS,
            registry=registry,
        )
        self.verifications = Counter(
            f"{PREFIX}_verifications",
            "Other nodes' work re-run for a coordinator (kind: step, decode)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.challenges = Counter(
            f"{PREFIX}_challenges",
            "Trajectory challenges about this node's own renders",
            ["outcome"],
            registry=registry,
        )
        for kind, outcome in EVENT_COUNTS.values():
            (self.verifications if kind else self.challenges).labels(*kind, outcome)
        self.lag = LoopLag(registry, PREFIX)

    def _series(self, model: str) -> None:
        for counter in (self.finished, self.handed_back):
            counter.labels(model=model)
        for stage in FAILURE_STAGES:
            self.failed.labels(model=model, stage=stage)

    def add_models(self, models: Iterable[str]) -> None:
        """Label models installed while the node runs (their series start at 0)."""
        if not isinstance(self.model, LiveModelLabels):
            return
        for model in models:
            if self.model.add(model):
                self._series(model)

    def job_failed(self, model_id: str, stage: str) -> None:
        stage = stage if stage in FAILURE_STAGES else OTHER
        self.failed.labels(model=self.model(model_id), stage=stage).inc()

    def on_event(self, event: str) -> None:
        """A structured log event's name (`sogni_protocol.logs.tap_events`): count the
        verification and challenge events `sogni_node.pull` logs."""
        counted = EVENT_COUNTS.get(event)
        if counted is not None:
            kind, outcome = counted
            (self.verifications if kind else self.challenges).labels(*kind, outcome).inc()


class MeteredWorker(Worker):
    """The worker, counting as it goes (`metrics`); behaviour unchanged."""

    def __init__(self, *args: Any, metrics: NodeMetrics, **kwargs: Any) -> None:
        self.metrics = metrics
        super().__init__(*args, **kwargs)

    def claim(self, job_id: bytes) -> Running:
        run = super().claim(job_id)
        self.metrics.received.inc()
        return run

    async def render(
        self,
        run: Running,
        params: JobParams,
        on_step: Callable[[int], None],
        *,
        report_every: float = 0.0,
        give_up_at: float | None = None,
    ) -> RenderOutput:
        m = self.metrics
        model = m.model(params.model_id)
        started = time.monotonic()
        try:
            out = await super().render(
                run, params, on_step, report_every=report_every, give_up_at=give_up_at
            )
        except (RenderCancelled, trio.Cancelled):
            m.handed_back.labels(model=model).inc()
            raise
        except Exception:
            m.failed.labels(model=model, stage="render").inc()
            raise
        m.finished.labels(model=model).inc()
        m.render_seconds.labels(model=model).observe(time.monotonic() - started)
        return out

    def job_failed(self, model_id: str, stage: str) -> None:
        self.metrics.job_failed(model_id, stage)

    def models_changed(self, models: list[str]) -> None:
        self.metrics.add_models(models)


class LiveState(Collector):
    """Gauges read from the daemon's memory at scrape time (on the trio thread)."""

    def __init__(
        self,
        worker: Worker,
        coordinators: Callable[[], int],
        configured: int,
        journal: Journal | None = None,
    ) -> None:
        self.worker = worker
        self.coordinators = coordinators
        self.configured = configured
        self.journal = journal

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connected, configured, slots, running, draining, writable = self._families()
        connected.add_metric([], self.coordinators())
        configured.add_metric([], self.configured)
        slots.add_metric([], self.worker.slots)
        running.add_metric([], len(self.worker.running))
        draining.add_metric([], 1 if self.worker.draining else 0)
        writable.add_metric([], 1 if self.journal is None or self.journal.writable else 0)
        yield from (connected, configured, slots, running, draining, writable)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_coordinators_connected", "Coordinators with a welcomed session"
            ),
            GaugeMetricFamily(f"{PREFIX}_coordinators_configured", "Coordinators configured"),
            GaugeMetricFamily(f"{PREFIX}_slots", "Render slots"),
            GaugeMetricFamily(f"{PREFIX}_running_jobs", "Renders running now"),
            GaugeMetricFamily(f"{PREFIX}_draining", "1 while shutting down"),
            GaugeMetricFamily(
                f"{PREFIX}_journal_writable",
                "0 while the journal cannot be written (no job is taken), else 1",
            ),
        )


class Earnings(Collector):
    """The accepted receipts' totals (`sogni_node.earnings`), as last refreshed."""

    def __init__(self, tally: EarningsTally) -> None:
        self.tally = tally

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        receipts, units, spark = self._families()
        receipts.add_metric([], self.tally.accepted)
        units.add_metric([], self.tally.work_units)
        spark.add_metric([], self.tally.spark_micro / MICRO)
        yield from (receipts, units, spark)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_receipts_accepted", "Receipts the coordinators accepted (journal)"
            ),
            GaugeMetricFamily(f"{PREFIX}_earned_work_units", "Work units of accepted receipts"),
            GaugeMetricFamily(
                f"{PREFIX}_earned_spark",
                "Value of accepted receipts in Spark, at each receipt's tier price",
            ),
        )


async def _refresh_earnings(tally: EarningsTally, interval: float) -> None:
    """Re-read the journal off the event loop every `interval` seconds (a scrape reads the
    last totals, never the database)."""
    while True:
        try:
            await trio.to_thread.run_sync(tally.refresh)
        except Exception as exc:  # a metric must never take the node down
            log.warning("earnings_not_read", error=type(exc).__name__)
        await trio.sleep(interval)


def metered(models: Iterable[str]) -> Callable[..., MeteredWorker]:
    """A `Worker` constructor that counts into a new registry of its own (several nodes in
    one process stay apart). Model labels: `models` (those this node serves), else "other"."""
    return partial(MeteredWorker, metrics=NodeMetrics(new_registry(), LiveModelLabels(models)))


def observe(
    view: NodeView,
    nursery: trio.Nursery,
    journal: Journal | None = None,
    *,
    earnings_interval: float = EARNINGS_INTERVAL,
) -> NodeView:
    """`view` with `/metrics` wired to this node; starts the event-loop lag probe in
    `nursery` (the daemon's, so it ends with the daemon), and with `journal` the earnings
    gauges and their refresh (every `earnings_interval` seconds, off the loop)."""
    worker = view.worker
    if not isinstance(worker, MeteredWorker):
        raise TypeError("the worker was not built by `metered`")
    metrics = worker.metrics
    metrics.registry.register(LiveState(worker, view.coordinators, view.configured, journal))
    if journal is not None:
        tally = EarningsTally(journal)
        metrics.registry.register(Earnings(tally))
        nursery.start_soon(_refresh_earnings, tally, earnings_interval)
    nursery.start_soon(metrics.lag.run)
    tap_events(metrics.on_event)  # the sessions this task starts from now on
    return replace(view, registry=metrics.registry)
