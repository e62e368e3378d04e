"""The shared job queue with leases (issue #18): one interface, SQLite or PostgreSQL.

`open_queue(database)` picks the engine from the setting's form: a `postgresql://` URL is
the queue shared by many coordinators (psycopg, imported only then), anything else is a
SQLite file for the single embedded coordinator. See `base` for the semantics.
"""

from __future__ import annotations

from pathlib import Path

from sogni_coordinator.queue.base import (
    AlreadyCompleted,
    DuplicateJob,
    Expired,
    JobNotLive,
    JobQueue,
    JobStatus,
    Lease,
    LeaseLost,
    NewJob,
    QueueError,
    QueueState,
    UnknownJob,
)

__all__ = [
    "AlreadyCompleted",
    "DuplicateJob",
    "Expired",
    "JobNotLive",
    "JobQueue",
    "JobStatus",
    "Lease",
    "LeaseLost",
    "NewJob",
    "QueueError",
    "QueueState",
    "UnknownJob",
    "is_postgres_url",
    "open_queue",
]


def is_postgres_url(database: str | Path) -> bool:
    return str(database).startswith(("postgresql://", "postgres://"))


async def open_queue(database: str | Path, *, channel: str | None = None) -> JobQueue:
    """The queue in `database`: a PostgreSQL URL or a SQLite file path."""
    if is_postgres_url(database):
        from sogni_coordinator.queue.postgres import DEFAULT_CHANNEL, PostgresQueue

        return await PostgresQueue.open(str(database), channel=channel or DEFAULT_CHANNEL)
    from sogni_coordinator.queue.sqlite import SqliteQueue

    return SqliteQueue(database)
