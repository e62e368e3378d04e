"""The shared job queue's interface: jobs taken with leases, finished by one receipt.

Why leases: with many coordinators on one database, a job is offered by whichever
coordinator took it, and that coordinator may die. A lease is a claim that lapses: the
taker renews it while the job runs; once it expires, the job returns to the queue (with its
attempt counted) and another coordinator may take it. A job that used up `max_attempts`
goes to the dead letter state instead, so a poisoned job cannot circulate forever.

A lease is named by (job, owner, attempt): each lease counts an attempt, so a coordinator
whose lease lapsed and was taken over can neither renew nor release the newer one.
Completion is by job, not by lease: a node holding a finished result for a dead
coordinator delivers it to another one, which records it. Exactly one receipt per job is
the database's rule (a primary key on the receipts table), not a check in code, so two
coordinators completing at once cannot both win.

Both engines (`sqlite.SqliteQueue`: one coordinator; `postgres.PostgresQueue`: many) keep
the same states and pass the same tests:

    queued --lease--> leased --complete--> done
    leased --release / lease expired--> queued (attempts < max) | dead (attempts == max)
    queued --complete (a late result)--> done
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sogni_coordinator.log_ids import short


class QueueState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"
    """Given up on: its attempts are used up (the dead letter state)."""


DEFAULT_MAX_ATTEMPTS = 3
MAX_LEASE_BATCH = 1000
MAX_TTL = 24 * 3600.0


class QueueError(Exception):
    """A refused queue operation; the message names the job (by its id's hex prefix)."""


class DuplicateJob(QueueError):
    """A job with this id is already queued (or was, once)."""


class UnknownJob(QueueError):
    """No job with this id was ever enqueued."""


class LeaseLost(QueueError):
    """The lease expired, was released, or the job was taken over or completed."""


class AlreadyCompleted(QueueError):
    """The job has its receipt already: the database refused a second one."""


class JobNotLive(QueueError):
    """The job was given up on (dead letter): it takes no receipt."""


@dataclass(frozen=True)
class NewJob:
    """What a coordinator enqueues: ids and the opaque job description (sealed params)."""

    job_id: bytes
    request_id: bytes
    payload: bytes
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    priority: int = 0
    """Higher leases first (the payer's stake tier); first in, first out within one."""


@dataclass(frozen=True)
class Lease:
    """One coordinator's claim on one job until `expires_at` (seconds since the epoch, by
    the database's clock for PostgreSQL)."""

    job_id: bytes
    request_id: bytes
    payload: bytes
    owner: str
    attempt: int
    """This lease's attempt number (1 for the first lease): names the lease."""
    expires_at: float
    priority: int = 0


@dataclass(frozen=True)
class JobStatus:
    """A job's row, for operators and tests."""

    job_id: bytes
    state: QueueState
    attempts: int
    max_attempts: int
    owner: str | None
    expires_at: float | None
    receipt_id: bytes | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JobStatus:
        """From the status query's columns (the same order on both engines)."""
        return cls(
            job_id=bytes(row[0]),
            state=QueueState(row[1]),
            attempts=row[2],
            max_attempts=row[3],
            owner=row[4],
            expires_at=row[5],
            receipt_id=None if row[6] is None else bytes(row[6]),
        )


@dataclass(frozen=True)
class Expired:
    """What an expiry sweep did: jobs back in the queue and jobs given up on."""

    requeued: tuple[bytes, ...]
    dead: tuple[bytes, ...]


def check_new(jobs: Sequence[NewJob]) -> None:
    """Refuse malformed jobs before touching the database (one clear message)."""
    for job in jobs:
        if not job.job_id or not job.request_id:
            raise QueueError("a job needs a non-empty job_id and request_id")
        if job.max_attempts < 1:
            raise QueueError(f"job {short(job.job_id)}: max_attempts must be >= 1")


def check_lease_args(owner: str, n: int, ttl: float) -> None:
    if not owner:
        raise QueueError("lease: the coordinator id is empty")
    if not 1 <= n <= MAX_LEASE_BATCH:
        raise QueueError(f"lease: n must be 1..{MAX_LEASE_BATCH}, got {n}")
    if not 0 <= ttl <= MAX_TTL:
        raise QueueError(f"lease: ttl must be 0..{MAX_TTL:.0f} s, got {ttl}")


class JobQueue(abc.ABC):
    """One coordinator's handle on the queue (PostgreSQL: shared with the others)."""

    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Queue `jobs` in order, all or none (`DuplicateJob` if an id exists), and wake
        the coordinators waiting for work."""

    @abc.abstractmethod
    async def lease(
        self, owner: str, n: int, ttl: float, payloads: Sequence[bytes] | None = None
    ) -> list[Lease]:
        """Take up to `n` queued jobs, oldest first, for `ttl` seconds; with `payloads`,
        only jobs whose payload is one of them (a coordinator takes only what its nodes
        serve). Expired leases are swept first, so a dead coordinator's jobs are taken
        again. Never blocks on another coordinator's lease in progress."""

    @abc.abstractmethod
    async def renew(self, lease: Lease, ttl: float) -> Lease:
        """Extend a live lease to now + `ttl`; `LeaseLost` if it expired or was lost."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> QueueState:
        """Hand the job back (node declined, node lost): QUEUED, or DEAD when its attempts
        are used up. `LeaseLost` if this lease no longer holds it."""

    @abc.abstractmethod
    async def complete(self, job_id: bytes, receipt_id: bytes, owner: str) -> None:
        """Record the job's one receipt and mark it done, whoever leases it now.
        `AlreadyCompleted` for a second receipt, `JobNotLive` for a dead job,
        `UnknownJob` for an id never enqueued."""

    @abc.abstractmethod
    async def expire(self) -> Expired:
        """Return every job whose lease has expired to the queue (or the dead letter)."""

    @abc.abstractmethod
    async def status(self, job_id: bytes) -> JobStatus:
        """The job's row (`UnknownJob` if none)."""

    @abc.abstractmethod
    async def counts(self) -> dict[QueueState, int]:
        """How many jobs are in each state."""

    @abc.abstractmethod
    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until jobs may have been queued (by any coordinator) or `timeout` passed;
        True when woken. Woken at once if work was queued since this handle's last
        `lease` began, so a wake-up between an empty lease and this call is not lost."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Let go of the connections (idempotent)."""
