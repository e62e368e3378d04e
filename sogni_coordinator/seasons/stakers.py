"""Stakers board: Staking Power = active stake x time staked within the season.

The input is the Staking contract's history as a list of `StakeChange`s (an account's active
stake after each change, and when). `stake_changes` reads it from the chain: `Staked` carries
the active stake after it, `UnstakeRequested` and `Slashed` lower it by the amount they name
(a pending unstake no longer counts), `Withdrawn` does not touch it. Points are micro
SOGNI-days: 1,000 SOGNI staked for the whole of a 42-day season is 42,000 points.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sogni_coordinator.seasons.boards import Inputs, Row, rank
from sogni_protocol.airdrop import points_of
from sogni_protocol.catalog import Season

if TYPE_CHECKING:
    from sogni_chain import Deployment

DAY = 86_400
WEI_PER_MICRO = 10**12
"""Wei in one micro-SOGNI."""


@dataclass(frozen=True, order=True)
class StakeChange:
    """`account`'s active stake became `active_wei` at unix time `at`."""

    at: float
    account: str
    active_wei: int


@dataclass(frozen=True)
class Power:
    """One account's Staking Power within a range of time."""

    micro_sogni_days: int
    wei_seconds: int
    """Active stake (wei) x seconds: the input `micro_sogni_days` is computed from."""
    seconds_staked: int
    """Seconds with a non-zero active stake."""
    changes: int
    """Changes of its stake within the range."""


def staking_power(changes: Sequence[StakeChange], start: float, end: float) -> dict[str, Power]:
    """account -> its Staking Power within [start, end) (accounts with none left out)."""
    by_account: dict[str, list[StakeChange]] = defaultdict(list)
    for c in sorted(changes):
        by_account[c.account.lower()].append(c)
    out: dict[str, Power] = {}
    for account, history in by_account.items():
        wei_seconds = staked = inside = 0
        active, since = 0, start
        for c in [*history, StakeChange(end, account, 0)]:
            if c.at >= end or c.at > start:
                span = int(min(c.at, end) - since)
                wei_seconds += active * span
                staked += span if active > 0 else 0
                since = min(c.at, end)
                if c.at >= end:
                    break
                inside += 1
            active = c.active_wei
        if wei_seconds > 0:
            points = points_of("stakers", {"stakeWeiSeconds": wei_seconds})
            out[account] = Power(points, wei_seconds, staked, inside)
    return out


def inputs(changes: Sequence[StakeChange], season: Season, *, now: float | None = None) -> Inputs:
    """Account -> its stake wei-seconds within the season (to `now` while it is open),
    changes of stake, days staked."""
    start, end = season.start.timestamp(), season.end.timestamp()
    if now is not None:
        end = max(start, min(end, now))
    power = staking_power(changes, start, end)
    return Inputs(
        {a: {"stakeWeiSeconds": p.wei_seconds} for a, p in power.items()},
        {a: p.changes for a, p in power.items()},
        {a: -(-p.seconds_staked // DAY) for a, p in power.items()},
    )


def board(
    changes: Sequence[StakeChange],
    season: Season,
    limit: int | None = None,
    *,
    now: float | None = None,
) -> list[Row]:
    """The Stakers board; an open season (`now` before its end) counts up to `now`."""
    start, end = season.start.timestamp(), season.end.timestamp()
    if now is not None:
        end = max(start, min(end, now))
    power = staking_power(changes, start, end)
    return rank(
        "stakers",
        season,
        {a: p.micro_sogni_days for a, p in power.items()},
        {a: p.changes for a, p in power.items()},
        {a: -(-p.seconds_staked // DAY) for a, p in power.items()},
        limit,
    )


class StakeHistory:
    """The Staking contract's changes of active stake, read incrementally: each `changes()`
    asks only for the blocks since the previous one (a status page refreshing every few
    seconds must not read the whole history each time). Blocking; safe across threads."""

    def __init__(self, deployment: Deployment, from_block: int = 0) -> None:
        self._deployment = deployment
        self._next = from_block
        self._active: dict[str, int] = defaultdict(int)
        self._changes: list[StakeChange] = []
        self._lock = threading.Lock()

    def changes(self) -> list[StakeChange]:
        """Every change so far, oldest first."""
        with self._lock:
            w3 = self._deployment.chain.w3
            latest = int(w3.eth.block_number)
            if latest >= self._next:
                self._read(self._next, latest)
                self._next = latest + 1
            return list(self._changes)

    def _read(self, first: int, last: int) -> None:
        w3 = self._deployment.chain.w3
        events = self._deployment.staking.contract.events
        logs = []
        for kind in ("Staked", "UnstakeRequested", "Slashed"):
            found = getattr(events, kind)().get_logs(from_block=first, to_block=last)
            logs += [(kind, log) for log in found]
        logs.sort(key=lambda kl: (kl[1]["blockNumber"], kl[1]["logIndex"]))
        times: dict[int, int] = {}
        for kind, log in logs:
            args = log["args"]
            account = str(args["account"]).lower()
            if kind == "Staked":
                self._active[account] = int(args["activeAfter"])
            elif kind == "UnstakeRequested":
                self._active[account] = max(0, self._active[account] - int(args["amount"]))
            else:
                self._active[account] = max(0, self._active[account] - int(args["fromActive"]))
            block = int(log["blockNumber"])
            if block not in times:
                times[block] = int(w3.eth.get_block(block)["timestamp"])
            self._changes.append(StakeChange(float(times[block]), account, self._active[account]))


def stake_changes(deployment: Deployment, from_block: int = 0) -> list[StakeChange]:
    """Every change of active stake the Staking contract logged since `from_block`, oldest
    first, timed by its block (blocking: one log query per event kind, one block per change)."""
    return StakeHistory(deployment, from_block).changes()
