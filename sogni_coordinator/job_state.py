"""The life of one job: every state, every event, and the one table of allowed transitions.

Pure (no I/O, no clock), so the whole lifecycle can be read in one screen and tested pair
by pair; the dispatcher calls `transition` for every change and persists what `stored`
says. A job may be held by two nodes at once (a straggler's copy): that is still one
RUNNING job, and only the last holder letting go (RELEASE) moves it on.

    QUEUED --OFFER--> RUNNING --OFFER (straggler copy)--> RUNNING
    RUNNING --RELEASE (last holder lost, deadline, hand-back, decline, bad result)--> QUEUED
    QUEUED --GIVE_UP (attempts exhausted, or no node can serve it)--> FAILED
    QUEUED --CANCEL--> CANCELLED            RUNNING --CANCEL--> CANCELLING
    CANCELLING --PARTIAL_RECEIPT (steps done, paid pro rata)--> CANCELLED
    CANCELLING --RELEASE (handed back unpaid)--> CANCELLED
    QUEUED | RUNNING | CANCELLING --RECEIPT--> DONE   (QUEUED: a late receipt from a node
                                                      whose deadline had passed)
    QUEUED | RUNNING --RESTORE--> QUEUED    CANCELLING --RESTORE--> CANCELLED
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    """Waiting for a node."""
    RUNNING = "running"
    """Offered to one node, or two (a straggler's copy); none has a receipt yet."""
    CANCELLING = "cancelling"
    """The client cancelled; its nodes were told to stop and send a partial receipt."""
    DONE = "done"
    """Receipted with its image."""
    FAILED = "failed"
    """Given up on: too many attempts, or no connected node can serve it."""
    CANCELLED = "cancelled"
    """Cancelled by the client: unpaid, or paid pro rata by a partial receipt."""


class JobEvent(StrEnum):
    OFFER = "offer"
    """A node was sent an offer for it."""
    RELEASE = "release"
    """The last node holding it let go (node lost, deadline, hand-back, decline, bad result)."""
    GIVE_UP = "give_up"
    """The attempts limit was reached, or no connected node can serve it."""
    CANCEL = "cancel"
    """The client cancelled its request."""
    RECEIPT = "receipt"
    """A full receipt (with its image) was committed."""
    PARTIAL_RECEIPT = "partial_receipt"
    """A receipt for the steps a cancelled job had done, without an image."""
    RESTORE = "restore"
    """The coordinator restarted: every offer is void."""


Q, R, C = JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING
E = JobEvent
TRANSITIONS: Mapping[tuple[JobState, JobEvent], JobState] = {
    (Q, E.OFFER): R,
    (R, E.OFFER): R,
    (R, E.RELEASE): Q,
    (C, E.RELEASE): JobState.CANCELLED,
    (Q, E.GIVE_UP): JobState.FAILED,
    (Q, E.CANCEL): JobState.CANCELLED,
    (R, E.CANCEL): C,
    (Q, E.RECEIPT): JobState.DONE,
    (R, E.RECEIPT): JobState.DONE,
    (C, E.RECEIPT): JobState.DONE,
    (C, E.PARTIAL_RECEIPT): JobState.CANCELLED,
    (Q, E.RESTORE): Q,
    (R, E.RESTORE): Q,
    (C, E.RESTORE): JobState.CANCELLED,
}
"""Every allowed (state, event) pair; any other pair is refused."""
del Q, R, C, E

TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
LIVE = frozenset(JobState) - TERMINAL
STORED_LIVE = frozenset({JobState.QUEUED, JobState.CANCELLING})
"""Live states as the store records them (RUNNING is stored as QUEUED)."""


class Forbidden(Exception):
    """An event that the job's state does not allow."""

    def __init__(self, state: JobState, event: JobEvent) -> None:
        super().__init__(f"a {state.value} job cannot take {event.value}")
        self.state = state
        self.event = event


def transition(state: JobState, event: JobEvent) -> JobState:
    """The state after `event`, or `Forbidden`."""
    new = TRANSITIONS.get((state, event))
    if new is None:
        raise Forbidden(state, event)
    return new


def stored(state: JobState) -> JobState:
    """What the store records: an offer is void after a restart (and an fsync per offer would
    halve throughput), so a RUNNING job is stored as QUEUED."""
    return JobState.QUEUED if state is JobState.RUNNING else state
