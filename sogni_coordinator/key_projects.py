"""The SDK projects each API key started, kept so that a coordinator restart loses none.

Why: the SDKs re-send a `jobRequest` after a reconnect, and a coordinator restart is a
reconnect. Were (key, jobID) -> request only in memory, the re-sent project would be submitted
and charged a second time. A row is written before the project is submitted (`begin`), so a
restart at any moment finds it: with its request id and resume token once accepted, each
image's outcome as it is stored for download, and whether it was cancelled or has ended.

The resume token is sealed with the API key (`seal_token`): the database alone cannot resume
(or read the images of) anyone's request; the key's holder, reconnecting, can. Rows are
deleted `retention` after their project ended (or started, if it never ended).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sogni_coordinator.db import Database

__all__ = ["ImageOutcome", "KeyProjects", "ProjectRecord", "seal_token"]

_SEAL_DOMAIN = b"sogni-gateway-resume-token/v1:"

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS api_key_projects (
    key_id       TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    app_id       TEXT NOT NULL,
    img_ids      TEXT NOT NULL,
    request_id   BLOB,
    token_sealed BLOB,
    cancelled    INTEGER NOT NULL DEFAULT 0 CHECK (cancelled IN (0, 1)),
    created_at   REAL NOT NULL,
    ended_at     REAL,
    PRIMARY KEY (key_id, job_id)
);
CREATE TABLE IF NOT EXISTS api_key_project_images (
    key_id  TEXT NOT NULL,
    job_id  TEXT NOT NULL,
    idx     INTEGER NOT NULL CHECK (idx >= 0),
    ok      INTEGER NOT NULL CHECK (ok IN (0, 1)),
    seed    INTEGER NOT NULL,
    steps   INTEGER NOT NULL,
    error   TEXT NOT NULL,
    PRIMARY KEY (key_id, job_id, idx)
);
CREATE INDEX IF NOT EXISTS api_key_projects_age ON api_key_projects (created_at);
"""

MIGRATIONS = (_SCHEMA_V1,)


def seal_token(token: bytes, api_key: str, request_id: bytes) -> bytes:
    """`token` XOR a pad derived from the API key and the request: sealing and unsealing are
    the same call. The pad is 32 bytes, as is every resume token."""
    pad = hashlib.sha256(_SEAL_DOMAIN + api_key.encode("utf-8") + b"\x00" + request_id).digest()
    if len(token) != len(pad):
        raise ValueError("a resume token is 32 bytes")
    return bytes(a ^ b for a, b in zip(token, pad, strict=True))


@dataclass(frozen=True)
class ImageOutcome:
    """What one image became, as the gateway told (or will tell) the app."""

    ok: bool
    seed: int = 0
    steps: int = 0
    error: str = ""


@dataclass(frozen=True)
class ProjectRecord:
    key_id: str
    job_id: str
    app_id: str
    img_ids: list[str]
    request_id: bytes | None
    """None: the coordinator stopped while the project was being submitted."""
    token_sealed: bytes | None
    cancelled: bool
    created_at: float
    ended_at: float | None
    outcomes: dict[int, ImageOutcome] = field(default_factory=dict)


IN_FLIGHT_KEEP = 7 * 86400.0
"""Seconds a project still in flight is kept at least (`KeyProjects.prune`)."""


class KeyProjects(Database):
    """The project rows of one coordinator database (blocking: call off the event loop)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, component="api_key_projects", migrations=MIGRATIONS)

    def begin(
        self,
        key_id: str,
        job_id: str,
        img_ids: list[str],
        app_id: str = "",
        now: float | None = None,
    ) -> bool:
        """Record a project about to be submitted (from the app `app_id`); False when (key,
        jobID) is already known (then nothing is written and the caller must not submit)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO api_key_projects "
                "(key_id, job_id, app_id, img_ids, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, job_id, app_id, json.dumps(img_ids), time.time() if now is None else now),
            )
        return cur.rowcount == 1

    def accepted(self, key_id: str, job_id: str, request_id: bytes, token_sealed: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE api_key_projects SET request_id = ?, token_sealed = ? "
                "WHERE key_id = ? AND job_id = ?",
                (request_id, token_sealed, key_id, job_id),
            )

    def forget(self, key_id: str, job_id: str) -> None:
        """The project was refused before it was accepted: the jobID may be tried again."""
        with self._tx() as db:
            for table in ("api_key_project_images", "api_key_projects"):
                db.execute(f"DELETE FROM {table} WHERE key_id = ? AND job_id = ?", (key_id, job_id))

    def record_outcome(self, key_id: str, job_id: str, index: int, outcome: ImageOutcome) -> None:
        """The first outcome of an image wins (a re-delivered copy changes nothing)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO api_key_project_images "
                "(key_id, job_id, idx, ok, seed, steps, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    job_id,
                    index,
                    int(outcome.ok),
                    outcome.seed,
                    outcome.steps,
                    outcome.error,
                ),
            )

    def ended(self, key_id: str, job_id: str, at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE api_key_projects SET ended_at = COALESCE(ended_at, ?) "
                "WHERE key_id = ? AND job_id = ?",
                (at, key_id, job_id),
            )

    def cancel(self, key_id: str, job_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE api_key_projects SET cancelled = 1 WHERE key_id = ? AND job_id = ?",
                (key_id, job_id),
            )

    def get(self, key_id: str, job_id: str) -> ProjectRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT img_ids, request_id, token_sealed, cancelled, created_at, ended_at, "
                "app_id FROM api_key_projects WHERE key_id = ? AND job_id = ?",
                (key_id, job_id),
            ).fetchone()
            images = self._db.execute(
                "SELECT idx, ok, seed, steps, error FROM api_key_project_images "
                "WHERE key_id = ? AND job_id = ?",
                (key_id, job_id),
            ).fetchall()
        if row is None:
            return None
        img_ids, request_id, sealed, cancelled, created, ended, app_id = row
        return ProjectRecord(
            key_id=key_id,
            job_id=job_id,
            app_id=str(app_id),
            img_ids=[str(i) for i in json.loads(img_ids)],
            request_id=None if request_id is None else bytes(request_id),
            token_sealed=None if sealed is None else bytes(sealed),
            cancelled=bool(cancelled),
            created_at=float(created),
            ended_at=None if ended is None else float(ended),
            outcomes={
                int(i): ImageOutcome(bool(ok), int(seed), int(steps), str(error))
                for i, ok, seed, steps, error in images
            },
        )

    def in_flight(self, key_id: str, app_id: str | None = None) -> list[str]:
        """jobIDs of the key's accepted projects that have not ended and were not cancelled
        (only those started from `app_id` unless it is None)."""
        sql = (
            "SELECT job_id FROM api_key_projects WHERE key_id = ? AND request_id IS NOT NULL "
            "AND ended_at IS NULL AND cancelled = 0"
        )
        args: tuple[str, ...] = (key_id,)
        if app_id is not None:
            sql, args = sql + " AND app_id = ?", (key_id, app_id)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        return [str(r[0]) for r in rows]

    def prune(self, retention: float, now: float | None = None) -> int:
        """Delete projects that ended over `retention` s ago, and those that never will
        (cancelled, or never accepted) started that long ago. One still in flight (accepted,
        its request running) is kept `IN_FLIGHT_KEEP` (at least 7 `retention`s): deleted
        while it ran, an SDK re-sending its jobRequest after a reconnect was charged again."""
        at = time.time() if now is None else now
        cutoff, long_cutoff = at - retention, at - max(IN_FLIGHT_KEEP, 7 * retention)
        where = (
            "(ended_at IS NOT NULL AND ended_at < ?)"
            " OR (ended_at IS NULL AND (cancelled = 1 OR request_id IS NULL) AND created_at < ?)"
            " OR (ended_at IS NULL AND created_at < ?)"
        )
        args = (cutoff, cutoff, long_cutoff)
        with self._tx() as db:
            db.execute(
                "DELETE FROM api_key_project_images WHERE (key_id, job_id) IN ("
                f"SELECT key_id, job_id FROM api_key_projects WHERE {where})",
                args,
            )
            cur = db.execute(f"DELETE FROM api_key_projects WHERE {where}", args)
        return cur.rowcount
