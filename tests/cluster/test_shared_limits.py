"""The gateway's rate limits across coordinators of one network (issue #18): a key's REST
rate and an address's failed keys are counted in the shared PostgreSQL, so N coordinators
do not allow N times the rate.

`SharedLimits` through two handles (two coordinators' connections) with a test clock; many
threads racing one bucket; the fallback to memory when the database cannot answer; the
event-loop guard; and two in-process coordinators' gateways on 127.0.0.1, where calls and
failures at A count at B.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import structlog
import trio

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.gateway.config import GatewayConfig
from sogni_coordinator.gateway.limits import (
    LimitsUnavailable,
    SharedFailureWindow,
    SharedKeyBuckets,
    SharedLimits,
)

from .conftest import start_cluster


def test_a_bucket_and_a_failure_window_are_one_for_two_coordinators(pg_url: str) -> None:
    now = [1000.0]
    a, b = SharedLimits(pg_url, clock=lambda: now[0]), SharedLimits(pg_url, clock=lambda: now[0])
    try:
        # 60 a minute, bursts of 2: two takes anywhere, then none until a second passes
        assert a.take("requests", "k1", 60, 2)
        assert b.take("requests", "k1", 60, 2)
        assert not a.take("requests", "k1", 60, 2)
        assert not b.take("requests", "k1", 60, 2)
        assert b.take("requests", "k2", 60, 2)  # another key has its own bucket
        assert a.take("jobs", "k1", 60, 2)  # and another kind
        now[0] += 1.0
        assert b.take("requests", "k1", 60, 2)
        assert not a.take("requests", "k1", 60, 2)
        # two failed keys from one address, one at each coordinator: blocked at both
        a.failed("10.0.0.1", 60)
        assert not b.blocked("10.0.0.1", 2, 60)
        b.failed("10.0.0.1", 60)
        assert a.blocked("10.0.0.1", 2, 60) and b.blocked("10.0.0.1", 2, 60)
        assert not a.blocked("10.0.0.2", 2, 60)
        now[0] += 61.0
        assert not b.blocked("10.0.0.1", 2, 60)
    finally:
        a.close()
        b.close()


def test_racing_coordinators_spend_a_burst_exactly_once(pg_url: str) -> None:
    """Six coordinators (threads, own connections) take 5 times each from one bucket of 10
    that refills far slower than the race lasts: exactly 10 takes succeed."""
    handles = [SharedLimits(pg_url) for _ in range(6)]
    for h in handles:
        h.open()
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(len(handles))

    def race(h: SharedLimits) -> None:
        start.wait()
        got = [h.take("jobs", "hot", 1, 10) for _ in range(5)]
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=race, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.close()
    assert len(results) == 30 and results.count(True) == 10


async def test_a_database_that_cannot_answer_falls_back_to_memory(tmp_path: Path) -> None:
    gone = SharedLimits("postgresql://u:s3cret@127.0.0.1:1/none")  # nothing listens on port 1
    buckets = SharedKeyBuckets(gone, "requests", 60, 2)
    window = SharedFailureWindow(gone, 2)
    with structlog.testing.capture_logs() as logs:
        assert [await buckets.take_async("k") for _ in range(3)] == [True, True, False]
        await window.failed_async("10.0.0.9")
        await window.failed_async("10.0.0.9")
        assert await window.blocked_async("10.0.0.9")
    unshared = [e for e in logs if e["event"] == "gateway_limits_unshared"]
    assert len(unshared) == 6  # one line per check that fell back
    assert all("\n" not in e["error"] and "s3cret" not in e["error"] for e in unshared)
    with pytest.raises(RuntimeError, match="worker thread"):  # never psycopg on the loop
        gone.take("requests", "k", 60, 2)
    gone.close()
    with pytest.raises(LimitsUnavailable, match="closed"):
        await trio.to_thread.run_sync(gone.take, "requests", "k", 60, 2)


async def test_two_gateways_count_one_keys_calls_and_one_addresss_failures(
    tmp_path: Path, pg_url: str
) -> None:
    """requests_per_minute = 1 (a burst of 10) and failed_auth_per_minute = 2 at both A and
    B: ten calls at A leave B nothing, two bad keys at B block the address at A. Before,
    each coordinator counted alone (B would allow ten more, A two more failures)."""
    keys = ApiKeys(pg_url)
    try:
        key, _ = keys.create("app")
    finally:
        keys.close()
    gateway = GatewayConfig(requests_per_minute=1, failed_auth_per_minute=2)
    async with start_cluster(tmp_path, pg_url, ["a", "b"], gateways=True, gateway=gateway) as m:
        a, b = m["a"].http_url, m["b"].http_url
        async with httpx.AsyncClient(timeout=20) as http:
            me = "/v1/account/me"
            codes = [(await http.get(a + me, headers={"api-key": key})).status_code]
            codes += [(await http.get(a + me, headers={"api-key": key})).status_code]
            for _ in range(8):
                codes.append((await http.get(b + me, headers={"api-key": key})).status_code)
            assert codes == [200] * 10
            for url in (a, b):
                refused = await http.get(url + me, headers={"api-key": key})
                assert refused.status_code == 429 and "slow down" in refused.text
            bad = {"api-key": "not-a-key-of-this-network"}
            assert (await http.get(b + me, headers=bad)).status_code == 401
            assert (await http.get(b + me, headers=bad)).status_code == 401
            blocked = await http.get(a + "/v4/account/balance", headers={"api-key": key})
            assert blocked.status_code == 429 and "failed API keys" in blocked.text
