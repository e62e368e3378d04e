"""What the chain says about a worker's wallet (licence, stake), as routing and billing see it.

Its own module because both read it and neither should import the other. Both read it from
synchronous dispatcher code on the event loop, so they must never wait for the chain:
`StandingCache` answers from memory at once, and does the chain calls (blocking web3) in
worker threads, each with a timeout. A node's wallet is read when it connects (`warm`,
awaited by the session before the node joins) and again in the background when its entry
is older than `ttl`, or when the chain says it changed (`Staked`, `UnstakeRequested`,
`Withdrawn`, `Slashed`, licence `Transfer` / `Blacklisted`, polled by `run`). A chain that
does not answer leaves the last value read, or no standing (tier 0, relaxed), and is
logged once per outage.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import trio

from sogni_protocol.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Standing:
    """What the chain says about a wallet: licence, and stake in whole SOGNI."""

    licensed: bool = False
    stake: int = 0


StandingLookup = Callable[[str], Standing]
ChangeFeed = Callable[[], "set[str] | None"]
"""Blocking: wallets whose standing changed since the last call (None: any may have)."""


def no_chain(_wallet: str) -> Standing:
    return Standing()


class StandingCache:
    """A `StandingLookup` that never blocks: chain reads happen off the loop, with a TTL.

    `lookup` and `changes` are blocking calls (web3); at most `threads` of them run at once,
    so a chain that hangs holds a few threads, never the loop.
    """

    def __init__(
        self,
        lookup: StandingLookup,
        *,
        changes: ChangeFeed | None = None,
        ttl: float = 300.0,
        timeout: float = 3.0,
        poll_interval: float = 15.0,
        threads: int = 4,
        max_wallets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.changes = changes
        self.ttl = ttl
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_wallets = max_wallets
        self.clock = clock
        self.lookups = 0
        """Chain reads started (tests and metrics)."""
        self._entries: OrderedDict[str, tuple[float, Standing]] = OrderedDict()
        """Least recently read first: the oldest goes when `max_wallets` is reached, in O(1)
        (a scan of every entry per new wallet was ~10 ms at 100,000, on the loop, and any
        throwaway wallet's hello makes a new one)."""
        self._inflight: dict[str, trio.Event] = {}
        self._wanted: set[str] = set()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(threads)
        self._feed_limiter = trio.CapacityLimiter(1)
        self._down: str | None = None

    # --- what routing and billing call (sync, never blocks) -------------------------------
    def __call__(self, wallet: str) -> Standing:
        """The last standing read for `wallet`, or no standing; a missing or old entry is
        read again in the background."""
        key = wallet.lower()
        entry = self._entries.get(key)
        if entry is None or self.clock() - entry[0] >= self.ttl:
            self._want(key)
        if entry is None:
            return Standing()
        self._entries.move_to_end(key)  # read: the last to be forgotten
        return entry[1]

    def invalidate(self, wallets: Iterable[str] | None = None) -> None:
        """The chain says these wallets (None: every wallet) changed: read them again soon;
        until then the last value stays in use."""
        keys = list(self._entries) if wallets is None else [w.lower() for w in wallets]
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = (-math.inf, entry[1])
                self._want(key)

    # --- async side ------------------------------------------------------------------------
    async def warm(self, wallet: str) -> Standing:
        """Read `wallet` unless a fresh entry exists; waits at most `timeout` (then the
        last value, or no standing)."""
        key = wallet.lower()
        entry = self._entries.get(key)
        if entry is None or self.clock() - entry[0] >= self.ttl:
            await self._refresh(key)
        return self(key)

    async def run(self) -> None:
        """Refresh wanted wallets and poll the chain's change feed, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.changes is not None:
                nursery.start_soon(self._poll_changes)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                wanted, self._wanted = self._wanted, set()
                for key in wanted:
                    if key not in self._inflight:
                        nursery.start_soon(self._refresh, key)

    def _want(self, key: str) -> None:
        self._wanted.add(key)
        self._wake.set()

    async def _refresh(self, key: str) -> None:
        """One chain read per wallet at a time; later callers wait for the same read."""
        running = self._inflight.get(key)
        if running is not None:
            with trio.move_on_after(self.timeout):
                await running.wait()
            return
        done = self._inflight[key] = trio.Event()
        try:
            self.lookups += 1
            ok, standing = await self._blocking(lambda: self.lookup(key), self._limiter)
            if ok and standing is not None:
                self._store(key, standing)
        finally:
            del self._inflight[key]
            done.set()

    def _store(self, key: str, standing: Standing) -> None:
        self._entries[key] = (self.clock(), standing)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_wallets:
            self._entries.popitem(last=False)

    async def _poll_changes(self) -> None:
        assert self.changes is not None
        feed = self.changes
        while True:
            await trio.sleep(self.poll_interval)
            ok, changed = await self._blocking(feed, self._feed_limiter)
            if ok:
                self.invalidate(changed)

    async def _blocking(
        self, fn: Callable[[], T], limiter: trio.CapacityLimiter
    ) -> tuple[bool, T | None]:
        """`(True, fn())` from a worker thread, or `(False, None)` after an error or
        `timeout` (the thread is abandoned and keeps its limiter slot until the call
        returns); a failure is logged once per outage."""
        with trio.move_on_after(self.timeout):
            try:
                result = await trio.to_thread.run_sync(  # type: ignore[call-arg]  # old stubs
                    fn, abandon_on_cancel=True, limiter=limiter
                )
            except Exception as exc:  # web3 raises many kinds; routing must go on
                self._failed(f"{type(exc).__name__}: {exc}")
                return False, None
            if self._down is not None:
                log.info("chain_standing_restored", after=self._down[:200])
                self._down = None
            return True, result
        self._failed(f"no answer within {self.timeout:g} s")
        return False, None

    def _failed(self, reason: str) -> None:
        if self._down is None:
            log.warning("chain_standing_unavailable", error=reason[:200])
        self._down = reason
