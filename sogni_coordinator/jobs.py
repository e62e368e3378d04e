"""The dispatcher's live records: a connected node, a job, a request waiting for its images.

Plain data; only the dispatcher changes them (a job's `state` only through
`job_state.transition`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sogni_coordinator.delivery import Mailbox
from sogni_coordinator.job_state import JobState
from sogni_protocol.messages import JobOffer, JobParams, Message

if TYPE_CHECKING:
    from sogni_coordinator.store import StoredJob


@dataclass(eq=False)
class NodeLink:
    """The coordinator's view of one connected node (one pull stream)."""

    peer_id: str
    wallet: str
    models: frozenset[str]
    slots: int
    outbox: trio.MemorySendChannel[Message]
    device: str = "cpu"
    max_pixels: int = 0
    connected_at: float = field(default_factory=time.time)
    warm: frozenset[str] = frozenset()
    loras: frozenset[str] = frozenset()
    credit: int = 0
    capacity: int = 0
    """Offers it can hold, in flight included (its last `Ready`, at most slots + MAX_LOOKAHEAD)."""
    inflight: dict[bytes, Job] = field(default_factory=dict)
    removed_reason: str = ""
    """Set when the coordinator drops the node itself (a block): the session's Goodbye."""
    payout: str | None = None
    """Its advertised payout account (`Capabilities.payout`, signed in the binding; None:
    its wallet): work it verifies is paid there, and it never verifies that account's work."""
    mode: str = ""
    """Its advertised numeric mode (`Capabilities.mode`; "": not said): a path-bound mode's
    render is re-checked only by a node of the same mode (`verifiers.can_verify`)."""
    features: frozenset[str] = frozenset()
    """The words of its `Capabilities.version` (e.g. `OPEN_PIXELS_FEATURE`): optional fields
    it understands, which an older node would refuse."""
    pool: dict[NodeLink, None] | None = field(default=None, repr=False)
    """The dispatcher's nodes with credit (`Dispatcher.free`): kept by `credit`'s setter."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name == "credit":
            pool = self.__dict__.get("pool")
            if pool is not None:
                if value > 0:  # type: ignore[operator]
                    pool[self] = None
                else:
                    pool.pop(self, None)

    @property
    def payee(self) -> str:
        """The account its verifier work is paid to: its payout address, else its wallet."""
        return self.payout if self.payout is not None else self.wallet

    @property
    def accounts(self) -> frozenset[str]:
        """Its wallet and payout account, lowercase (who it may not verify for)."""
        return frozenset({self.wallet.lower(), self.payee.lower()})


@dataclass(eq=False)
class Job:
    job_id: bytes
    request_id: bytes
    index: int
    params: JobParams
    work_units: int
    network: str = "fast"
    attempts: int = 0
    state: JobState = JobState.QUEUED
    holders: dict[NodeLink, float] = field(default_factory=dict)
    """Nodes rendering it now -> when they were offered it (two: a straggler's copy)."""
    deadlines: dict[NodeLink, float] = field(default_factory=dict)
    offers: dict[bytes, str] = field(default_factory=dict)
    """Every offer hash issued for this job -> the peer id it was issued to."""
    signed_offers: dict[bytes, tuple[JobOffer, bytes]] = field(default_factory=dict)
    """Every offer hash -> the offer and its signature (the epoch publishes the one paid)."""
    partial_wait: float | None = None
    """Until when a cancelled job with no holder left waits for its node's partial receipt
    (`Dispatcher._await_partial`); None: it has not waited."""
    unservable_since: float | None = None
    """When a sweep first found no connected node able to serve it (None: one can). The
    no-node grace runs from here, not from when it was queued: a job that waited its turn
    behind others must not fail the moment the last capable node blinks."""

    @classmethod
    def restored(cls, s: StoredJob, state: JobState = JobState.QUEUED) -> Job:
        """A stored job live in memory again: after a restart, a lease or a takeover."""
        return cls(
            s.job_id,
            s.request_id,
            s.index,
            s.params,
            s.work_units,
            network=s.network,
            attempts=s.attempts,
            state=state,
        )


@dataclass(eq=False)
class RequestState:
    """A request with jobs still live; what it owes its client is in `mailbox`."""

    request_id: bytes
    remaining: int
    mailbox: Mailbox
    delivered: int = 0
    failed: int = 0
    cancelled: int = 0
    durations: list[float] = field(default_factory=list)
    nodes: dict[NodeLink, int] = field(default_factory=dict)
    """Nodes holding this request's jobs -> how many (at most 16 nodes per request)."""
    finished: trio.Event = field(default_factory=trio.Event)
