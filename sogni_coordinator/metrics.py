"""The coordinator's Prometheus metrics (`GET /metrics`) and readiness (`GET /readyz`).

Counts come from a `Dispatcher` subclass that sees every job state change (`_to`, the one
place a job's state changes), offers declined, results accepted or refused and check
verdicts, without touching the dispatcher's logic; gauges are read from memory at scrape
time (nodes per tier and model, live jobs), and the settlement gauges from the database off
the event loop before each scrape. Labels are model ids of the allowed set, tiers, verdicts
and fixed refusal categories and codes: never a prompt, a key, an address or a reason's
text. Imported only when the HTTP listener is on (needs the `http` extra).

Readiness (`/readyz`) tells whether the coordinator can take work now: its libp2p listener
is up, its writes are not failing (`db.WriteFailure`, published by the database writer),
the volumes of its database and result images are writable with room left, and the
database's write lock can be taken. `/readyz` is unauthenticated: the volume and lock checks
run at most once per `READY_CACHE` seconds (`ReadinessCache`, concurrent probes share one
check), while the listener and the writer's failures are read on every probe.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sogni_coordinator.billing import Refusal
from sogni_coordinator.db import DATABASE_ERRORS, WriteFailure, WriteStats, storage_fault
from sogni_coordinator.dispatch import (
    Dispatcher,
    JobGone,
    NotTaken,
    ResultRefused,
    StorageFault,
    Submission,
)
from sogni_coordinator.job_state import TERMINAL, JobEvent, JobState
from sogni_coordinator.results import FolderResults
from sogni_coordinator.storage import is_postgres, location
from sogni_protocol.metrics import (
    OTHER,
    RENDER_BUCKETS,
    LoopLag,
    ModelLabels,
    category,
    new_registry,
)
from sogni_protocol.payout_rules import SOGNI

if TYPE_CHECKING:
    from sogni_coordinator.checks import Held
    from sogni_coordinator.http_api import CoordinatorView
    from sogni_coordinator.jobs import Job, NodeLink
    from sogni_coordinator.store import Store
    from sogni_net import Host
    from sogni_protocol.messages import RenderRequest, Result

PREFIX = "sogni_coordinator"
TIERS = ("fast", "relaxed")
VERDICTS = ("pass", "fail", "skipped")

REFUSAL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # most specific first: "partial receipt ... since the offer" is partial, and "receipt
    # steps or work units differ from the offer" a work mismatch, not an offer mismatch
    ("storage", ("could not store", "could not check", "retry")),
    (
        "job_gone",
        ("unknown job", "already receipted", "already ended", "for another job", "taken back"),
    ),
    ("partial", ("partial",)),
    ("work_mismatch", ("steps or work units",)),
    ("bad_signature", ("signature", "wallet bound")),
    ("offer_mismatch", ("offer", "another coordinator", "another model", "price factor")),
    ("image_policy", ("content policy",)),
    ("bad_image", ("image", "resulthash", "decode")),
)
"""`ResultRefused` texts -> a fixed label set (`receipts_refused_total{reason}`); the first
category with a keyword in the text wins. `refusal_category` asks the exception's type
first."""
REFUSAL_LABELS = (*(name for name, _ in REFUSAL_CATEGORIES), "other")
_REFUSAL_TYPES: tuple[tuple[type[ResultRefused], str], ...] = (
    (StorageFault, "storage"),
    (JobGone, "job_gone"),
    (NotTaken, "partial"),
)

REQUEST_CODES = (
    "invalid_request",
    "unsupported_version",
    "unknown_model",
    "content_policy",
    "insufficient_funds",
    "unauthorized",
    "replayed",
    "payer_blocked",
    "unavailable",
)
"""`RequestRefused` codes a render request may get (`requests_refused_total{code}`); any
other code is counted as "other"."""
REQUEST_LABELS = (*REQUEST_CODES, OTHER)

PROTOCOLS = ("node", "client", "epochs", "relay")
"""The libp2p protocols the coordinator serves (`handler_failures_total{protocol}`): jobs
(`/sogni/jobs/1.0.0`, nodes), client, epochs and relay."""

IMAGE_CHECKS = (
    ("none", "deliver"),
    ("none", "timeout"),
    ("none", "error"),
    ("adult", "deliver"),
    ("adult", "blur"),
    ("adult", "withhold"),
    ("minors", "refuse"),
    ("minors", "withhold"),
)
"""(category, action) pairs the image check can report (`safety.screen`), pre-created."""
_IMAGE_CATEGORIES = frozenset(c for c, _ in IMAGE_CHECKS)
_IMAGE_ACTIONS = frozenset(a for _, a in IMAGE_CHECKS)


def refusal_category(exc: ResultRefused) -> str:
    """`exc`'s label in `REFUSAL_LABELS`: by its type when that says (storage, job gone, a
    newcomer's partial claim), else by its text."""
    for kind, label in _REFUSAL_TYPES:
        if isinstance(exc, kind):
            return label
    return category(str(exc), REFUSAL_CATEGORIES)


READY_TIMEOUT = 3.0
"""Seconds `/readyz` waits for the database write lock before answering not ready."""
READY_MIN_FREE = 16 * 2**20
"""Bytes that must be free on the database's and the result images' volumes for `/readyz`:
under this a request's commit (or a result's image) may fail for want of space."""
FAILURE_MEMORY = 60.0
"""Seconds a failed write keeps `/readyz` at 503 when no write has succeeded since (a
write that succeeds clears it at once; the volume checks still see a disk that stays
full)."""
READY_CACHE = 1.0
"""Seconds one verdict of the volume and write-lock checks answers `/readyz` (per
coordinator): anyone may ask, and each check takes the database's write lock, so a flood of
probes queued the writer behind them. The writer's failures are read on every probe, so a
failing disk is still seen at once."""


class CoordinatorMetrics:
    """The counters and histograms, and the per-job times the histograms need (live jobs
    only: dropped when a job ends)."""

    def __init__(self, registry: CollectorRegistry, models: ModelLabels) -> None:
        self.registry = registry
        self.model = models

        def jobs(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_jobs_{name}", doc, ["model"], registry=registry)

        self.offered = jobs("offered", "Offers sent to nodes (a straggler's copy counts)")
        self.declined = jobs("declined", "Offers a node declined")
        self.accepted = jobs("accepted", "Results accepted: receipt stored (held or final)")
        self.finished = jobs("finished", "Jobs done: image delivered to the client")
        self.failed = jobs("failed", "Jobs given up (attempts spent or no capable node)")
        self.requeued = jobs("requeued", "Jobs put back in the queue after a node let go")
        self.job_counters = (
            self.offered,
            self.declined,
            self.accepted,
            self.finished,
            self.failed,
            self.requeued,
        )
        self.receipts_stored = Counter(
            f"{PREFIX}_receipts_stored", "Receipts committed to the database", registry=registry
        )
        self.receipts_refused = Counter(
            f"{PREFIX}_receipts_refused",
            "Results refused, by category of the reason",
            ["reason"],
            registry=registry,
        )
        self.checks = Counter(
            f"{PREFIX}_checks",
            "Sampled receipts checked, by verdict (pass, fail, skipped)",
            ["verdict"],
            registry=registry,
        )
        self.image_checks = Counter(
            f"{PREFIX}_image_checks",
            "Images checked before delivery (docs/SAFETY.md), by category and action",
            ["category", "action"],
            registry=registry,
        )
        self.requests_accepted = Counter(
            f"{PREFIX}_requests_accepted",
            "Render requests accepted (stored and queued), by model",
            ["model"],
            registry=registry,
        )
        self.requests_refused = Counter(
            f"{PREFIX}_requests_refused",
            "Render requests refused, by the code the client was sent",
            ["code"],
            registry=registry,
        )
        self.requests_failed = Counter(
            f"{PREFIX}_requests_failed",
            "Render requests that failed with an unexpected error (logged with a traceback)",
            registry=registry,
        )
        self.handler_failures = Counter(
            f"{PREFIX}_handler_failures",
            "libp2p streams whose handler failed unexpectedly (logged handler_failed), by protocol",
            ["protocol"],
            registry=registry,
        )
        self.render_seconds = Histogram(
            f"{PREFIX}_render_seconds",
            "From the offer to the stored receipt of a finished job",
            ["model"],
            buckets=RENDER_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "From (re-)queueing a job to its offer",
            ["model"],
            buckets=RENDER_BUCKETS,
            registry=registry,
        )
        self.epoch = Gauge(
            f"{PREFIX}_epoch",
            "Number of the last epoch in each state (planned: root not on chain yet)",
            ["state"],
            registry=registry,
        )
        self.settled = Gauge(
            f"{PREFIX}_settled_sogni",
            "SOGNI paid to nodes by the last posted epoch (cumulative)",
            registry=registry,
        )
        self.lag = LoopLag(registry, PREFIX)
        for model in (*sorted(models.allowed), OTHER):  # every series exists from the start
            for counter in (*self.job_counters, self.requests_accepted):
                counter.labels(model=model)
        for name in REFUSAL_LABELS:
            self.receipts_refused.labels(reason=name)
        for verdict in VERDICTS:
            self.checks.labels(verdict=verdict)
        for code in REQUEST_LABELS:
            self.requests_refused.labels(code=code)
        for protocol in PROTOCOLS:
            self.handler_failures.labels(protocol=protocol)
        for cat, action in IMAGE_CHECKS:
            self.image_checks.labels(category=cat, action=action)
        self._queued_at: dict[bytes, float] = {}
        self._offered_at: dict[bytes, float] = {}
        self._children: dict[tuple[int, str], Any] = {}

    def request_refused(self, code: str) -> None:
        """A render request refused with `code` (bounded: unknown codes count as "other")."""
        self.requests_refused.labels(code=code if code in REQUEST_CODES else OTHER).inc()

    def handler_failed(self, protocol: str) -> None:
        """A libp2p stream of `protocol` whose handler raised (bounded: else "other")."""
        self.handler_failures.labels(protocol=protocol if protocol in PROTOCOLS else OTHER).inc()

    def image_checked(self, category: str, action: str) -> None:
        """An image check's decision (bounded: anything unexpected counts as "other")."""
        self.image_checks.labels(
            category=category if category in _IMAGE_CATEGORIES else OTHER,
            action=action if action in _IMAGE_ACTIONS else OTHER,
        ).inc()

    def of_model(self, metric: Counter | Histogram, model_id: str) -> Any:
        """`metric`'s series for `model_id`'s label, remembered: `labels()` takes a lock and
        builds its key on every call (~2 us), and a job passes here four to six times."""
        label = self.model(model_id)  # the allowed set or "other": the cache stays small
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model=label)
        return child

    def queued(self, job: Job, now: float, *, again: bool) -> None:
        self._queued_at[job.job_id] = now
        if again:
            self.of_model(self.requeued, job.params.model_id).inc()

    def transition(self, job: Job, old: JobState, event: JobEvent, now: float) -> None:
        model = job.params.model_id
        if event is JobEvent.OFFER:
            self.of_model(self.offered, model).inc()
            if old is JobState.QUEUED:
                since = self._queued_at.pop(job.job_id, None)
                if since is not None:
                    self.of_model(self.queue_wait, model).observe(max(0.0, now - since))
                self._offered_at[job.job_id] = now
        elif event is JobEvent.RELEASE or event is JobEvent.RESTORE:
            self._offered_at.pop(job.job_id, None)
        if job.state is JobState.DONE:
            self.of_model(self.finished, model).inc()
            since = self._offered_at.get(job.job_id)
            if since is not None:
                self.of_model(self.render_seconds, model).observe(max(0.0, now - since))
        elif job.state is JobState.FAILED:
            self.of_model(self.failed, model).inc()
        if job.state in TERMINAL:
            self._queued_at.pop(job.job_id, None)
            self._offered_at.pop(job.job_id, None)


class MeteredDispatcher(Dispatcher):
    """The dispatcher, counting as it goes (`metrics`); behaviour unchanged."""

    def __init__(self, *args: Any, metrics: CoordinatorMetrics, **kwargs: Any) -> None:
        self.metrics = metrics
        super().__init__(*args, **kwargs)
        if self.image_safety is not None:  # fixed labels: category and action, no content
            self.image_safety.on_decision = metrics.image_checked

    async def submit(
        self,
        req: RenderRequest,
        *,
        client_peer: str,
        allowed_models: set[str],
        token: bytes | None = None,
    ) -> Submission:
        """Counted by outcome: accepted (by model), refused (by code; a storage failure
        counts as "unavailable", what a client is told), or failed (a bug)."""
        try:
            submitted = await super().submit(
                req, client_peer=client_peer, allowed_models=allowed_models, token=token
            )
        except Refusal as exc:
            self.metrics.request_refused(exc.code)
            raise
        except Exception as exc:
            if isinstance(exc, (*DATABASE_ERRORS, OSError)) and storage_fault(exc) is not None:
                self.metrics.request_refused("unavailable")  # what `client_session` answers
            else:
                self.metrics.requests_failed.inc()
            raise
        self.metrics.of_model(self.metrics.requests_accepted, req.model_id).inc()
        return submitted

    def request_refused(self, code: str) -> None:
        """A render request the client session refused before `submit` (a frame it could
        not decode, another wire version): `client_session.RequestMeter`."""
        self.metrics.request_refused(code)

    def handler_failed(self, protocol: str) -> None:
        """A stream handler of `protocol` failed (`service.HandlerMeter`)."""
        self.metrics.handler_failed(protocol)

    def _to(self, job: Job, event: JobEvent, *, durable: bool = False) -> JobState:
        old = job.state
        new = super()._to(job, event, durable=durable)
        self.metrics.transition(job, old, event, self._clock())
        return new

    def _enqueue(self, job: Job, *, front: bool = False) -> None:
        super()._enqueue(job, front=front)
        self.metrics.queued(job, self._clock(), again=front)

    def offer_declined(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        job = link.inflight.get(job_id)
        if job is not None:
            self.metrics.of_model(self.metrics.declined, job.params.model_id).inc()
        super().offer_declined(link, job_id, reason)

    async def accept_result(self, link: NodeLink, result: Result) -> None:
        job = self.jobs.get(result.job_id)
        try:
            await super().accept_result(link, result)
        except ResultRefused as exc:
            self.metrics.receipts_refused.labels(reason=refusal_category(exc)).inc()
            raise
        self.metrics.receipts_stored.inc()
        if job is not None:
            self.metrics.of_model(self.metrics.accepted, job.params.model_id).inc()

    async def check_passed(self, held: Held, verdict: str) -> None:
        label = verdict if verdict in VERDICTS else "skipped"
        self.metrics.checks.labels(verdict=label).inc()
        await super().check_passed(held, verdict)

    async def check_failed(
        self, held: Held, reason: str, *, strike: bool, evidence: bytes | None = None
    ) -> None:
        self.metrics.checks.labels(verdict="fail").inc()
        await super().check_failed(held, reason, strike=strike, evidence=evidence)


class LiveState(Collector):
    """Gauges read from the dispatcher's memory at scrape time (on the trio thread)."""

    def __init__(self, dispatcher: Dispatcher, models: ModelLabels) -> None:
        self.dispatcher = dispatcher
        self.model = models

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return [*self._families(), *self._disk()]

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        d = self.dispatcher
        tiers = dict.fromkeys(TIERS, 0)
        models: dict[str, int] = {}
        usable = barred = 0
        for link in list(d.nodes.values()):
            if not d.usable(link):  # blacklisted or blocked: no offer goes to it
                barred += 1
                continue
            usable += 1
            for tier in d.router.classify(link.device, link.wallet)[0]:
                if tier in tiers:
                    tiers[tier] += 1
            for model in {self.model(m) for m in link.models}:
                models[model] = models.get(model, 0) + 1
        nodes, barred_family, by_model, jobs = self._families()
        nodes.add_metric(["all"], usable)
        for tier, n in tiers.items():
            nodes.add_metric([tier], n)
        barred_family.add_metric([], barred)
        for model, n in sorted(models.items()):
            by_model.add_metric([model], n)
        for state, n in d.job_counts().items():
            jobs.add_metric([state], n)
        yield from (nodes, barred_family, by_model, jobs)
        yield from self._disk(d.store.write_stats())

    @staticmethod
    def _disk(stats: WriteStats | None = None) -> tuple[CounterMetricFamily, ...]:
        """The database writer's work: a job's ack waits for its image group and its commit,
        so their mean durations (rate of seconds / rate of groups) are its disk latency."""
        s = stats or WriteStats()
        rows = (
            ("db_commits", "Write transactions the database writer committed", s.groups),
            ("db_writes", "Writes (receipts, settlements, ...) in those transactions", s.writes),
            ("db_commit_seconds", "Seconds in those transactions, fsync included", s.commit_s),
            ("result_groups", "Groups of result images stored durably at once", s.stages),
            ("results_stored", "Result images in those groups", s.staged),
            ("result_group_seconds", "Seconds storing those groups, sync included", s.stage_s),
            ("db_commit_failures", "Write transactions that failed (disk full, ...)", s.failed),
            ("result_failures", "Result images that could not be stored", s.stage_failed),
        )
        return tuple(
            CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value) for name, doc, value in rows
        )

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_nodes_connected",
                "Connected usable nodes per tier they may serve now (all: every usable node)",
                labels=["tier"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_nodes_barred",
                "Connected nodes given no work: blacklisted or blocked",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_nodes_with_model",
                "Connected usable nodes offering each model",
                labels=["model"],
            ),
            GaugeMetricFamily(f"{PREFIX}_live_jobs", "Live jobs per state", labels=["state"]),
        )


def settlement_facts(store: Store) -> tuple[int | None, int | None, int]:
    """Blocking: (last planned epoch, last posted epoch, SOGNI base units paid so far)."""
    planned = store.last_epoch_record(state="planned")
    posted = store.last_epoch_record(state="posted")
    return (
        None if planned is None else planned.epoch,
        None if posted is None else posted.epoch,
        0 if posted is None else posted.total,
    )


async def refresh_settlement(metrics: CoordinatorMetrics, store: Store) -> None:
    """Update the epoch gauges before a scrape; a slow database leaves the last values."""
    with trio.move_on_after(READY_TIMEOUT):
        planned, posted, total = await trio.to_thread.run_sync(
            settlement_facts,
            store,
            abandon_on_cancel=True,  # type: ignore[call-arg]
        )
        for state, epoch in (("planned", planned), ("posted", posted)):
            metrics.epoch.labels(state=state).set(-1 if epoch is None else epoch)
        metrics.settled.set(total / SOGNI)


def volume_fault(folder: Path, what: str) -> str | None:
    """Blocking: why `folder`'s volume cannot take `what`'s writes (read-only, under
    `READY_MIN_FREE` free), or None."""
    if not hasattr(os, "statvfs"):  # Windows: the writer's failures still say it
        return None
    while not folder.exists() and folder.parent != folder:  # made by its first write
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        return f"{what} folder unreadable ({type(exc).__name__})"
    if st.f_flag & os.ST_RDONLY:
        return f"{what} volume is read-only"
    free = st.f_bavail * st.f_frsize
    if free < READY_MIN_FREE:
        return (
            f"disk full: {free / 2**20:.1f} MiB free on the {what} volume (under "
            f"{READY_MIN_FREE / 2**20:g} MiB): free space there"
        )
    return None


def write_fault(failures: Iterable[WriteFailure], now: float) -> str | None:
    """Why writes are failing now (the writer's last transaction, or image, failed and
    none succeeded since, within `FAILURE_MEMORY`), or None."""
    for f in sorted(failures, key=lambda f: f.what):
        if now - f.last < FAILURE_MEMORY:
            what = "database writes" if f.what == "database" else "result image writes"
            return (
                f"{what} failing: {f.error}, the last {now - f.last:.0f} s ago "
                f"(failing since {now - f.since:.0f} s ago)"
            )
    return None


def database_writable(
    path: Path, timeout: float = READY_TIMEOUT, results: Path | None = None
) -> str | None:
    """Blocking: None if the database (and the `results` folder, when images are files)
    can take writes now, else a one-line reason. Checks the volumes (read-only, nearly
    full), then takes the database's write lock and rolls back at once, on a second
    connection, so a probe never joins the writer's transaction. A lock proves no free
    space: `write_fault` tells writes that fail."""
    postgres = is_postgres(path)  # a PostgreSQL URL (storage/): its volume is the server's
    if not postgres and not path.exists():
        return "database file missing"
    if not postgres and (fault := volume_fault(path.parent, "database")) is not None:
        return fault
    if results is not None and (fault := volume_fault(results, "result images")) is not None:
        return fault
    if postgres:
        from sogni_coordinator.storage.postgres import probe_writable

        return probe_writable(location(path), timeout)
    started = time.monotonic()
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        waited = time.monotonic() - started
        return f"database not writable after {waited:.1f} s ({type(exc).__name__})"
    return None


async def database_ready(path: Path, results: Path | None = None) -> str | None:
    with trio.move_on_after(READY_TIMEOUT + 1):
        return await trio.to_thread.run_sync(  # type: ignore[call-arg]
            database_writable, path, READY_TIMEOUT, results, abandon_on_cancel=True
        )
    return f"database write lock not taken within {READY_TIMEOUT + 1:g} s"


class ReadinessCache:
    """`check` (the volume and write-lock checks) run at most once per `ttl` seconds
    (default `READY_CACHE`): a probe within that time gets the last verdict, and probes that
    arrive while a check runs wait for it and share its verdict (one write lock taken, not
    one per probe). A check cut short (its prober gone) leaves nothing cached."""

    def __init__(
        self,
        check: Callable[[], Awaitable[str | None]],
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ttl = ttl
        self._clock = clock
        self._lock = trio.Lock()
        self._verdict: str | None = None
        self._at: float | None = None

    def _fresh(self) -> bool:
        ttl = READY_CACHE if self._ttl is None else self._ttl
        return self._at is not None and self._clock() - self._at < ttl

    async def __call__(self) -> str | None:
        if self._fresh():
            return self._verdict
        async with self._lock:
            if not self._fresh():  # else another probe checked while this one waited
                verdict = await self._check()
                self._verdict, self._at = verdict, self._clock()
            return self._verdict


def metered(allowed_models: Iterable[str]) -> Callable[..., MeteredDispatcher]:
    """A `Dispatcher` constructor that counts into a new registry of its own (several
    coordinators in one process stay apart). Model labels: `allowed_models`, else "other"."""
    models = ModelLabels(allowed_models)
    return partial(MeteredDispatcher, metrics=CoordinatorMetrics(new_registry(), models))


def observe(
    view: CoordinatorView, store: Store, database: Path, host: Host, nursery: trio.Nursery
) -> CoordinatorView:
    """`view` with `/metrics` and `/readyz` wired to this coordinator; starts the event-loop
    lag probe in `nursery` (the service's, so it ends with the service)."""
    dispatcher = view.dispatcher
    if not isinstance(dispatcher, MeteredDispatcher):
        raise TypeError("the dispatcher was not built by `metered`")
    metrics = dispatcher.metrics
    metrics.registry.register(LiveState(dispatcher, metrics.model))
    nursery.start_soon(metrics.lag.run)

    async def refresh() -> None:
        await refresh_settlement(metrics, store)

    folder = dispatcher.results
    results = folder.root if isinstance(folder, FolderResults) else None

    checked = ReadinessCache(partial(database_ready, database, results))

    async def not_ready() -> str | None:
        if not host.addrs:
            return "libp2p listener not up"
        failing = write_fault(store.write_failures(), time.monotonic())  # memory: every probe
        if failing is not None:
            return failing
        return await checked()

    return replace(view, registry=metrics.registry, refresh=refresh, not_ready=not_ready)
