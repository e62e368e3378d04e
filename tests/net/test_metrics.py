"""The metrics parts without a network: bounded labels, one registry per daemon, event-loop
lag that sees a blocked loop, readiness reasons. The live scrape after a real render is in
tests/e2e/test_health_metrics.py."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import trio
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sogni_coordinator.dispatch as dispatch_module
from sogni_coordinator.metrics import (
    REFUSAL_CATEGORIES,
    REFUSAL_LABELS,
    CoordinatorMetrics,
    database_writable,
)
from sogni_node.http_api import NodeView, not_ready
from sogni_node.metrics import MeteredWorker, NodeMetrics
from sogni_node.metrics import metered as metered_worker
from sogni_protocol.logs import configure_logging, get_logger, tap_events
from sogni_protocol.metrics import OTHER, LoopLag, ModelLabels, category, new_registry


def node_metrics() -> NodeMetrics:
    return NodeMetrics(new_registry(), ModelLabels(["m"]))


def test_every_refusal_text_of_the_dispatcher_has_its_own_category() -> None:
    """The reasons `accept_result` raises map onto the fixed label set, not "other"."""
    source = Path(dispatch_module.__file__).read_text()
    texts = re.findall(r'ResultRefused\(\s*f?"([^"]+)"', source)
    texts += ["job already receipted", "unknown job", "job already ended (failed)"]
    assert len(texts) > 10
    unmapped = [t for t in texts if category(t, REFUSAL_CATEGORIES) == OTHER]
    assert not unmapped
    assert {category(t, REFUSAL_CATEGORIES) for t in texts} <= set(REFUSAL_LABELS)


def test_free_text_never_becomes_a_label() -> None:
    """A node that stuffs a prompt-like text into a reason or a model id gets "other"."""
    metrics = CoordinatorMetrics(new_registry(), ModelLabels(["sogni-tiny-sd"]))
    sneaky = "a portrait of my neighbour, seed 42"
    metrics.receipts_refused.labels(reason=category(sneaky, REFUSAL_CATEGORIES)).inc()
    metrics.offered.labels(model=metrics.model(sneaky)).inc()
    text = generate_latest(metrics.registry).decode()
    assert sneaky not in text
    labels = {
        s.labels.get("reason") or s.labels.get("model")
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert labels - {None} <= {*REFUSAL_LABELS, "pass", "fail", "skipped", "sogni-tiny-sd"}


def test_each_daemon_has_its_own_registry() -> None:
    """Two daemons in one process count apart, and never in the global registry."""
    a, b = metered_worker(["m"])(None, 1), metered_worker(["m"])(None, 1)  # no render here
    a.claim(b"\x01" * 32)
    assert a.metrics.registry is not b.metrics.registry
    assert a.metrics.registry.get_sample_value("sogni_node_jobs_received_total") == 1
    assert b.metrics.registry.get_sample_value("sogni_node_jobs_received_total") == 0
    assert REGISTRY.get_sample_value("sogni_node_jobs_received_total") is None


async def test_loop_lag_sees_a_blocked_event_loop() -> None:
    registry = new_registry()
    lag = LoopLag(registry, "t", interval=0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        await trio.sleep(0.12)
        time.sleep(0.3)  # the trio thread is blocked: the probe wakes ~0.3 s late
        with trio.fail_after(5):
            while (registry.get_sample_value("t_event_loop_lag_last_seconds") or 0) < 0.2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert (registry.get_sample_value("t_event_loop_lag_seconds_count") or 0) >= 2


def test_database_writable_says_why_not(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    assert database_writable(path) == "database file missing"
    sqlite3.connect(path).close()
    assert database_writable(path, timeout=0.1) is None
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reason = database_writable(path, timeout=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert reason is not None and reason.startswith("database not writable after")


def test_node_readiness_reasons() -> None:
    worker = MeteredWorker(None, 1, metrics=node_metrics())  # no render here
    connected = [0]
    view = NodeView("peer", "0xwallet", worker, lambda: connected[0], 2, models=("m",))
    assert not_ready(view) == "no trusted coordinator connected (0 of 2)"
    connected[0] = 1
    assert not_ready(view) is None
    assert not_ready(NodeView("p", "0x", worker, lambda: 1, 1)) == "no model to serve"
    worker.draining = True
    assert not_ready(view) == "draining: the node is shutting down"


async def test_each_node_counts_its_own_logged_verifications_at_any_log_level() -> None:
    """Verification events `sogni_node.pull` logs are counted by the daemon whose task logged
    them, even when the log level drops them from the output."""
    configure_logging("error", json=True)
    log = get_logger("sogni_node.pull")
    a = node_metrics()
    b = node_metrics()

    async def daemon(metrics: NodeMetrics, events: list[str]) -> None:
        tap_events(metrics.on_event)

        async def session() -> None:  # a task the daemon starts, as pull sessions are
            for event in events:
                log.info(event, check="00ff")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(session)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon, a, ["step_reverified", "step_reverified", "challenge_refused"])
        nursery.start_soon(daemon, b, ["latent_decoded", "job_started"])
    get_logger("elsewhere").info("step_reverified")  # no daemon's task: nobody counts it

    def count(m: NodeMetrics, name: str, **labels: str) -> float:
        return m.registry.get_sample_value(f"sogni_node_{name}_total", labels) or 0.0

    assert count(a, "verifications", kind="step", outcome="done") == 2
    assert count(a, "challenges", outcome="refused") == 1
    assert count(a, "verifications", kind="decode", outcome="done") == 0
    assert count(b, "verifications", kind="decode", outcome="done") == 1
    assert count(b, "verifications", kind="step", outcome="done") == 0
