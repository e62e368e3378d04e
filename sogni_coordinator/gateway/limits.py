"""Rate limits: a token bucket per API key, a failure window per client address.

One coordinator (SQLite) keeps them in memory. Several coordinators on one PostgreSQL keep
them in that database (`SharedLimits`), so a key's `jobs_per_minute` and an address's failed
keys are counted across the network: with memory only, N coordinators behind one address
would allow N times the rate. Every limiter has async methods (`take_async`,
`blocked_async`, `failed_async`), which the gateway awaits: the shared ones run psycopg in
a worker thread, never on the event loop; when the database cannot be asked they fall back
to this coordinator's memory (one log line), so a database hiccup never refuses or lets
through everything.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from sogni_protocol.logs import get_logger

__all__ = [
    "FailureWindow",
    "KeyBuckets",
    "SharedFailureWindow",
    "SharedKeyBuckets",
    "SharedLimits",
    "limiters",
]

log = get_logger(__name__)

MAX_TRACKED = 10_000
"""Keys or addresses remembered at once (the least recently seen is forgotten first)."""

T = TypeVar("T")


class KeyBuckets:
    """`per_minute` events per key, with bursts of `burst`."""

    def __init__(
        self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> bool:
        """Spend one token of `key`'s bucket; False when it is empty."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return ok

    async def take_async(self, key: str) -> bool:
        return self.take(key)


def client_block(address: str) -> str:
    """What failures are counted under: an IPv4 address, or an IPv6 address's /64 (one
    host is given a whole /64: rotating through it went around the limit, and the memory
    bound forgot the oldest first); anything else (a proxy's name) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureWindow:
    """At most `limit` failures per client (`client_block`) in any `window` seconds."""

    def __init__(
        self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str) -> deque[float]:
        now = self._clock()
        times = self._seen.pop(address, deque())
        while times and now - times[0] > self.window:
            times.popleft()
        self._seen[address] = times
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)
        return times

    def blocked(self, address: str) -> bool:
        return len(self._recent(client_block(address))) >= self.limit

    def failed(self, address: str) -> None:
        self._recent(client_block(address)).append(self._clock())

    async def blocked_async(self, address: str) -> bool:
        return self.blocked(address)

    async def failed_async(self, address: str) -> None:
        self.failed(address)


# --- shared through the network's PostgreSQL ------------------------------------------------
COMPONENT = "gateway_limits"
_SCHEMA_V1 = """
CREATE TABLE gateway_rate_buckets (
    kind   TEXT NOT NULL,
    key    TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    at     DOUBLE PRECISION NOT NULL,
    took   BOOLEAN NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX gateway_rate_buckets_at ON gateway_rate_buckets (at);
CREATE TABLE gateway_auth_failures (
    address TEXT NOT NULL,
    at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX gateway_auth_failures_address ON gateway_auth_failures (address, at);
CREATE INDEX gateway_auth_failures_at ON gateway_auth_failures (at);
"""
MIGRATIONS = (_SCHEMA_V1,)
_DB_NOW = "extract(epoch from clock_timestamp())"
PRUNE_EVERY = 600.0
"""Seconds between deletions of rows that no longer limit anything."""
KEEP_BUCKETS = 3600.0
"""A bucket idle this long is full again (burst / rate is at most 600 s here), so its row
can go: the next take starts a full bucket, as it would have found it."""

# One statement per take: the row lock of the upsert orders concurrent takes of one key,
# whichever coordinator makes them; `took` says whether this take got a token.
_TAKE = f"""
INSERT INTO gateway_rate_buckets AS b (kind, key, tokens, at, took)
VALUES (%(kind)s, %(key)s, %(burst)s - 1, COALESCE(%(now)s, {_DB_NOW}), true)
ON CONFLICT (kind, key) DO UPDATE SET
    tokens = LEAST(%(burst)s, b.tokens + GREATEST(0, EXCLUDED.at - b.at) * %(rate)s)
        - CASE WHEN LEAST(%(burst)s, b.tokens + GREATEST(0, EXCLUDED.at - b.at) * %(rate)s)
            >= 1 THEN 1 ELSE 0 END,
    at = GREATEST(b.at, EXCLUDED.at),
    took = LEAST(%(burst)s, b.tokens + GREATEST(0, EXCLUDED.at - b.at) * %(rate)s) >= 1
RETURNING took
"""
_BLOCKED = f"""
SELECT count(*) FROM gateway_auth_failures
WHERE address = %(address)s AND at >= COALESCE(%(now)s, {_DB_NOW}) - %(window)s
"""
_FAILED = f"""
WITH gone AS (
    DELETE FROM gateway_auth_failures
    WHERE address = %(address)s AND at < COALESCE(%(now)s, {_DB_NOW}) - %(window)s
)
INSERT INTO gateway_auth_failures VALUES (%(address)s, COALESCE(%(now)s, {_DB_NOW}))
"""


class LimitsUnavailable(RuntimeError):
    """The database could not answer (the caller falls back to its memory)."""


class SharedLimits:
    """Rate buckets and failure windows in the network's PostgreSQL, on a connection of
    their own (not the store's write lock: a limit check never waits for a ledger write).
    Worker threads only. `clock` (tests) replaces the database's clock."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        from sogni_coordinator.storage.lazy import LazyConnection

        self.url = url
        self._clock = clock
        self._pg = LazyConnection(
            url,
            COMPONENT,
            MIGRATIONS,
            blocks="shared rate limits block: call them from a worker thread",
        )
        self._pruned_at = 0.0

    def _call(self, fn: Callable[[Any], T]) -> T:
        """`fn` on the connection; any database error as `LimitsUnavailable` (one line)."""
        import psycopg

        from sogni_coordinator.queue.postgres import error_line
        from sogni_coordinator.storage.lazy import Closed, Unreachable

        try:
            return self._pg.call(fn)
        except Closed:
            raise LimitsUnavailable("shared rate limits are closed") from None
        except Unreachable as exc:
            raise LimitsUnavailable(str(exc)) from None
        except psycopg.Error as exc:
            raise LimitsUnavailable(error_line(exc, self.url)) from None

    def open(self) -> None:
        """Connect and migrate now (blocking), so a bad URL fails at start."""
        self._call(lambda conn: None)

    def close(self) -> None:
        """Close the connection for good: later calls fall back to memory."""
        self._pg.close(final=True)

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()

    def take(self, kind: str, key: str, per_minute: int, burst: float) -> bool:
        """Spend one token of `key`'s `kind` bucket, network-wide; False when it is empty."""
        params = {
            "kind": kind,
            "key": key,
            "burst": float(burst),
            "rate": per_minute / 60.0,
            "now": self._now(),
        }
        took = self._call(lambda conn: conn.execute(_TAKE, params).fetchone()[0])
        self._maybe_prune()
        return bool(took)

    def blocked(self, address: str, limit: int, window: float) -> bool:
        params = {"address": address, "window": window, "now": self._now()}
        count = self._call(lambda conn: conn.execute(_BLOCKED, params).fetchone()[0])
        return int(count) >= limit

    def failed(self, address: str, window: float) -> None:
        params = {"address": address, "window": window, "now": self._now()}
        self._call(lambda conn: conn.execute(_FAILED, params))

    def _maybe_prune(self) -> None:
        """Delete full buckets and old failures now and then (whoever comes first)."""
        mono = time.monotonic()
        if mono - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = mono
        now = self._now()

        def prune(conn: Any) -> None:
            at = f"COALESCE(%(now)s, {_DB_NOW})"
            conn.execute(
                f"DELETE FROM gateway_rate_buckets WHERE at < {at} - %(keep)s",
                {"now": now, "keep": KEEP_BUCKETS},
            )
            conn.execute(
                f"DELETE FROM gateway_auth_failures WHERE at < {at} - %(keep)s",
                {"now": now, "keep": KEEP_BUCKETS},
            )

        self._call(prune)


async def _shared(fn: Callable[[], T], fallback: Callable[[], T], what: str) -> T:
    try:
        return await trio.to_thread.run_sync(fn)
    except LimitsUnavailable as exc:
        log.warning("gateway_limits_unshared", limit=what, error=str(exc))
        return fallback()


class SharedKeyBuckets(KeyBuckets):
    """`KeyBuckets` counted in the network's database (this coordinator's memory when the
    database cannot answer)."""

    def __init__(self, shared: SharedLimits, kind: str, per_minute: int, burst: int) -> None:
        super().__init__(per_minute, burst)
        self.shared = shared
        self.kind = kind

    async def take_async(self, key: str) -> bool:
        return await _shared(
            lambda: self.shared.take(self.kind, key, self.per_minute, self.burst),
            lambda: self.take(key),
            self.kind,
        )


class SharedFailureWindow(FailureWindow):
    """`FailureWindow` counted in the network's database (memory as the fallback)."""

    def __init__(self, shared: SharedLimits, limit: int, window: float = 60.0) -> None:
        super().__init__(limit, window)
        self.shared = shared

    async def blocked_async(self, address: str) -> bool:
        block = client_block(address)
        return await _shared(
            lambda: self.shared.blocked(block, self.limit, self.window),
            lambda: self.blocked(address),
            "failed_auth",
        )

    async def failed_async(self, address: str) -> None:
        self.failed(address)  # also in memory: the fallback starts from what was seen here
        block = client_block(address)
        await _shared(lambda: self.shared.failed(block, self.window), lambda: None, "failed_auth")


def limiters(
    jobs_per_minute: int,
    requests_per_minute: int,
    failed_auth_per_minute: int,
    shared: SharedLimits | None = None,
) -> tuple[FailureWindow, KeyBuckets, KeyBuckets]:
    """The gateway's three limiters (failed keys per address, projects per key, REST calls
    per key), in memory or, given `shared`, across the network."""
    job_burst = max(5, jobs_per_minute // 4)
    rest_burst = max(10, requests_per_minute // 4)
    if shared is None:
        return (
            FailureWindow(failed_auth_per_minute),
            KeyBuckets(jobs_per_minute, job_burst),
            KeyBuckets(requests_per_minute, rest_burst),
        )
    return (
        SharedFailureWindow(shared, failed_auth_per_minute),
        SharedKeyBuckets(shared, "jobs", jobs_per_minute, job_burst),
        SharedKeyBuckets(shared, "requests", requests_per_minute, rest_burst),
    )
