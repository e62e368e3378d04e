"""`/healthz`, `/readyz` and `/metrics` of both daemons, read the way Prometheus and a probe
read them, and the Grafana dashboard checked against a live scrape.

A real coordinator and node in-process (libp2p on 127.0.0.1, the tiny diffusers model),
HTTP listeners on free ports, metrics parsed by prometheus_client's own parser. A render
with a sentinel prompt must move the counters and leave no trace in any of the bodies.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sogni_app.api import render
from sogni_coordinator.metrics import READY_CACHE
from sogni_coordinator.network_signers import SIGNER_SET_FILE
from sogni_protocol.eip712 import Domain
from sogni_protocol.signer_set import NetworkSignerSet, encode_signer_set, sign_signer_set

from .conftest import MODEL, NodeHandle, start_net, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")

SENTINEL = "zq-sentinel-prompt-7f3a9c"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "sogni-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(url: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(fetch, url)


async def lag_sampled(base: str, prefix: str) -> Samples:
    """The daemon's metrics once its loop-lag histogram has a sample (the first lands one
    interval after the start, which a fast test can beat)."""
    with trio.fail_after(10):
        while True:
            _, samples = await scrape(base)
            if value(samples, f"{prefix}_event_loop_lag_seconds_count") > 0:
                return samples
            await trio.sleep(0.05)


async def scrape(base: str) -> tuple[str, Samples]:
    code, text = await get(base + "/metrics")
    assert code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def node_http(node: NodeHandle) -> str:
    with trio.fail_after(20):
        while node.http is None:
            await trio.sleep(0.05)
    return node.http


@contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another process's view: hold the database's write lock."""
    db = sqlite3.connect(database, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(isinstance(e, str) for e in exprs)
    return {name for e in exprs for name in re.findall(r"\bsogni_[a-z0-9_]+", e)}


async def test_health_ready_and_metrics_of_both_daemons(tmp_path: Path, backend: Any) -> None:
    async with start_net(tmp_path) as net:
        base = net.coordinator.http_url
        assert base is not None
        code, body = await get(base + "/readyz")
        assert (code, json.loads(body)) == (200, {"status": "ready"})

        # A node that trusts no coordinator is up but not ready.
        lonely = await net.add_node(backend, "lonely", trusted=["0x" + "11" * 20])
        lonely_url = await node_http(lonely)
        assert (await get(lonely_url + "/healthz"))[0] == 200
        code, body = await get(lonely_url + "/readyz")
        assert code == 503
        assert json.loads(body) == {
            "status": "not_ready",
            "reason": "no trusted coordinator connected (0 of 1)",
        }
        lonely.stop.set()

        node = await net.add_node(backend, "node0")
        url = await node_http(node)
        code, body = await get(url + "/readyz")
        assert (code, json.loads(body)) == (200, {"status": "ready"})
        _, before = await scrape(base)
        assert value(before, "sogni_coordinator_jobs_finished_total", model=MODEL) == 0

        with trio.fail_after(60):
            result = await render(net.addr, tiny_request(1, positive_prompt=SENTINEL))
        assert len(result.images) == 1

        text, c = await scrape(base)
        for name in ("offered", "accepted", "finished"):
            assert value(c, f"sogni_coordinator_jobs_{name}_total", model=MODEL) == 1, name
        assert value(c, "sogni_coordinator_jobs_failed_total", model=MODEL) == 0
        assert value(c, "sogni_coordinator_receipts_stored_total") == 1
        assert value(c, "sogni_coordinator_receipts_refused_total", reason="bad_image") == 0
        assert value(c, "sogni_coordinator_render_seconds_count", model=MODEL) == 1
        assert 0 < value(c, "sogni_coordinator_render_seconds_sum", model=MODEL) < 60
        assert value(c, "sogni_coordinator_queue_wait_seconds_count", model=MODEL) == 1
        assert value(c, "sogni_coordinator_nodes_connected", tier="all") == 1
        assert value(c, "sogni_coordinator_nodes_connected", tier="fast") == 1  # tiers open
        assert value(c, "sogni_coordinator_nodes_with_model", model=MODEL) == 1
        assert value(c, "sogni_coordinator_live_jobs", state="queued") == 0
        assert value(c, "sogni_coordinator_epoch", state="posted") == -1  # no chain here
        assert value(c, "sogni_coordinator_settled_sogni") == 0
        # the database writer: the image stored in a group, its receipt in a commit
        assert value(c, "sogni_coordinator_results_stored_total") == 1
        assert value(c, "sogni_coordinator_result_groups_total") == 1
        assert value(c, "sogni_coordinator_db_commits_total") >= 1
        assert value(c, "sogni_coordinator_db_writes_total") >= 1  # the receipt at least
        assert value(c, "sogni_coordinator_db_commit_seconds_total") > 0
        c = await lag_sampled(base, "sogni_coordinator")

        node_text, n = await scrape(url)
        assert value(n, "sogni_node_jobs_received_total") == 1
        assert value(n, "sogni_node_jobs_finished_total", model=MODEL) == 1
        assert value(n, "sogni_node_render_seconds_count", model=MODEL) == 1
        assert value(n, "sogni_node_coordinators_connected") == 1
        assert value(n, "sogni_node_running_jobs") == 0
        n = await lag_sampled(url, "sogni_node")

        # Nothing private in any body: no prompt, no key.
        bodies = [text, node_text]
        for path in ("/healthz", "/readyz"):
            bodies += [(await get(base + path))[1], (await get(url + path))[1]]
        secrets = [SENTINEL, net.signer.private_key.hex(), node.wallet.private_key.hex()]
        assert not [s for s in secrets for b in bodies if s.lower() in b.lower()]

        # Every metric the dashboard queries exists in a live scrape.
        live = {name for name, _ in c} | {name for name, _ in n}
        used = dashboard_metrics()
        assert used and not used - live, f"dashboard uses unknown metrics: {used - live}"

        # The network signer set the operator published in the data folder is served as is.
        signers = base + "/v1/network/signers"
        assert (await get(signers))[0] == 404
        unsigned = NetworkSignerSet(
            network_id="sogni-test", serial=1, signers=[net.signer.address], issued_at=1
        )
        signed = sign_signer_set(net.signer.private_key, Domain(31337, "0x" + "ab" * 20), unsigned)
        (net.config.data_dir / SIGNER_SET_FILE).write_bytes(encode_signer_set(signed))
        code, body = await get(signers)
        assert code == 200
        assert json.loads(body)["set"]["signers"] == [net.signer.address]

        # A database another process holds locked: not ready, saying why, in one line (once
        # the last verdict has aged: the lock is tried at most once per READY_CACHE seconds).
        await trio.sleep(READY_CACHE)
        with write_locked(net.config.database):
            code, body = await get(base + "/readyz")
        assert code == 503
        reason = json.loads(body)["reason"]
        assert reason.startswith("database not writable") and "\n" not in reason
        await trio.sleep(READY_CACHE)
        assert (await get(base + "/readyz"))[0] == 200

        node.stop.set()
        with trio.fail_after(20):
            await node.done.wait()
            await lonely.done.wait()
