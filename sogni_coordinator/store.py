"""Durable state of a coordinator: requests, jobs and receipts in SQLite (WAL).

A receipt is committed (synchronous=FULL) before the node hears that it was accepted, so an
acknowledged receipt survives a crash. A job is receipted at most once, and only while it is
live: the receipt and the job's new state are written in one transaction, and a job that
already has a receipt, or ended (failed, cancelled), refuses another.

Each job's state is a `JobState` (as `job_state.stored` maps it: an offer is not durable);
the dispatcher decides every change, the store only records it and never moves a job out
of a terminal state.

Job parameters (which include the prompt) are stored sealed with a key of their request
(`prompt_crypto`, AES-GCM), kept in `request_keys`; once a request has ended and its
retention window has passed, `shred_keys` deletes the key (`secure_delete` overwrites it in
the file, a WAL checkpoint removes it from the WAL), so the prompt is gone for good.
Nothing here logs parameters.

Delivery: a receipted job's image waits in the results folder until the client acknowledges
it (`jobs.delivered`); a request is re-attached with its resume token, of which only the
sha256 is stored (`requests.token_hash`).
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from sogni_coordinator.db import Database
from sogni_coordinator.job_state import STORED_LIVE, JobState
from sogni_coordinator.prompt_crypto import PromptKeyError, new_key, seal, unseal
from sogni_protocol.messages import JobOffer, JobParams, Receipt

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   BLOB PRIMARY KEY,
    model_id     TEXT NOT NULL,
    images       INTEGER NOT NULL,
    network      TEXT NOT NULL,
    token_type   TEXT NOT NULL,
    client_peer  TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id       BLOB PRIMARY KEY,
    request_id   BLOB NOT NULL REFERENCES requests(request_id),
    idx          INTEGER NOT NULL,
    params       BLOB NOT NULL,
    work_units   INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('queued', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_request ON jobs(request_id);
CREATE TABLE IF NOT EXISTS receipts (
    job_id       BLOB PRIMARY KEY REFERENCES jobs(job_id),
    request_id   BLOB NOT NULL,
    worker       TEXT NOT NULL,
    offer_hash   BLOB NOT NULL,
    result_hash  BLOB NOT NULL,
    steps_done   INTEGER NOT NULL,
    work_units   INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    receipt      BLOB NOT NULL,
    signature    BLOB NOT NULL,
    stored_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_worker ON receipts(worker);
CREATE TABLE IF NOT EXISTS epochs (
    epoch         INTEGER PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('planned', 'posted')),
    root          BLOB NOT NULL,
    total         TEXT NOT NULL,
    receipts_hash BLOB NOT NULL,
    plan          BLOB NOT NULL,
    planned_at    REAL NOT NULL,
    posted_at     REAL,
    tx_hash       TEXT
);
CREATE TABLE IF NOT EXISTS settled_receipts (
    job_id       BLOB PRIMARY KEY REFERENCES receipts(job_id),
    epoch        INTEGER REFERENCES epochs(epoch),
    status       TEXT NOT NULL CHECK (status IN ('paid', 'refused')),
    detail       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS settled_receipts_epoch ON settled_receipts(epoch);
"""
"""The release before versioned migrations (it marked itself `PRAGMA user_version=1`)."""

_V2_JOB_STATES = """
CREATE TABLE jobs_v2 (
    job_id       BLOB PRIMARY KEY,
    request_id   BLOB NOT NULL REFERENCES requests(request_id),
    idx          INTEGER NOT NULL,
    params       BLOB NOT NULL,
    work_units   INTEGER NOT NULL,
    state        TEXT NOT NULL
                 CHECK (state IN ('queued', 'cancelling', 'done', 'failed', 'cancelled')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL
);
INSERT INTO jobs_v2 (job_id, request_id, idx, params, work_units, state, attempts, updated_at)
    SELECT job_id, request_id, idx, params, work_units, state, attempts, updated_at
    FROM jobs ORDER BY rowid;
DROP TABLE jobs;
ALTER TABLE jobs_v2 RENAME TO jobs;
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_request ON jobs(request_id);
PRAGMA user_version=2
"""
"""The job lifecycle's states (`job_state.JobState`, as stored). `user_version` moves on so
the release before versioning refuses this file instead of misreading it."""

_V2_JOB_STATES_POSTGRES = """
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'cancelling', 'done', 'failed', 'cancelled'));
"""
"""PostgreSQL changes the check in place (a rebuild would drop the receipts' foreign key)."""

_V3_RESUME_AND_SEALED_PROMPTS = """
ALTER TABLE requests ADD COLUMN token_hash BLOB;
ALTER TABLE jobs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN delivered INTEGER NOT NULL DEFAULT 1;
CREATE TABLE request_keys (
    request_id   BLOB PRIMARY KEY REFERENCES requests(request_id),
    key          BLOB NOT NULL
);
PRAGMA user_version=3
"""
"""Resume tokens (their hash), per-job delivery (acked by the client), sealed parameters
with a key per request, and `steps` in the clear (billing needs it after the key is gone).
Rows of older releases count as delivered (their images were streamed or saved as files);
their plaintext parameters are sealed (live jobs) or dropped (ended ones) on open."""

_V4_PUBLISHED_OFFERS = """
ALTER TABLE receipts ADD COLUMN offer BLOB;
ALTER TABLE receipts ADD COLUMN offer_signature BLOB;
PRAGMA user_version=4
"""
"""Each receipt keeps the signed offer it answers: epochs publish it, so anyone can check
the price factor and work units the payer was charged for (NULL for older receipts)."""

_V5_CHECKS = """
CREATE TABLE checks (
    job_id       BLOB PRIMARY KEY,
    worker       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'passed', 'skipped')),
    updated_at   REAL NOT NULL
);
CREATE INDEX checks_state ON checks(state);
CREATE TABLE failed_receipts (
    job_id       BLOB NOT NULL,
    request_id   BLOB NOT NULL,
    worker       TEXT NOT NULL,
    receipt      BLOB NOT NULL,
    signature    BLOB NOT NULL,
    reason       TEXT NOT NULL,
    failed_at    REAL NOT NULL
);
CREATE INDEX failed_receipts_job ON failed_receipts(job_id);
PRAGMA user_version=5
"""
"""Checks of sampled receipts (`sogni_coordinator.checks`): a `pending` receipt is neither
billed, delivered nor paid in an epoch; a failed one moves to `failed_receipts` (evidence,
with the reason) and its job is queued again."""

_V6_EVIDENCE_VERIFIERS_SLASHES = """
ALTER TABLE failed_receipts ADD COLUMN evidence BLOB;
CREATE TABLE verifier_work (
    job_id       BLOB NOT NULL,
    verifier     TEXT NOT NULL,
    steps        INTEGER NOT NULL CHECK (steps > 0),
    recorded_at  REAL NOT NULL
);
CREATE INDEX verifier_work_job ON verifier_work(job_id);
CREATE TABLE slash_proposals (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    wallet       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    job_ids      BLOB NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('proposed', 'submitted', 'dismissed')),
    proposed_at  REAL NOT NULL,
    note         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX slash_proposals_state ON slash_proposals(state);
PRAGMA user_version=6
"""
"""Issue #12, consequences: a failed check keeps its evidence (the opened leaves, proofs and
the verifiers' answers, `checks.Evidence`, MessagePack); each step a verifier node computed
for a job is recorded, to be paid from the take when the job's receipt is settled
(`verifier_work`); a wallet blacklisted for failed checks gets a slash proposal, which the
operator signs offline with the settlement key (`slash_proposals`; `job_ids` is the
MessagePack list of its failed receipts' job ids)."""

_V7_RECHECK_AFTER_RESTART = """
ALTER TABLE checks ADD COLUMN peer_id TEXT NOT NULL DEFAULT '';
ALTER TABLE checks ADD COLUMN dtype TEXT NOT NULL DEFAULT '';
ALTER TABLE checks ADD COLUMN elapsed REAL NOT NULL DEFAULT 0;
PRAGMA user_version=7
"""
"""A pending check survives a restart (`Dispatcher.restore` re-runs it once the worker's node
reconnects): the node's peer id (it keeps the trajectory), the numeric mode it declared, and
the render's elapsed time (reputation credits it when the check passes). Checks pending in
an older file have none: their node is unknown, so they fail closed as before."""

_V8_EPOCH_EVIDENCE = """
ALTER TABLE epochs ADD COLUMN evidence BLOB;
PRAGMA user_version=8
"""
"""Each epoch's published evidence (its receipts batch, or a season's airdrop evidence), so
every coordinator of a network publishes every epoch (`Settler.publish_missing`), not only
the one that closed it. Epochs closed before have none: their closer's folder has them."""

_V9_HELD_CANCEL = """
ALTER TABLE checks ADD COLUMN cancelled INTEGER NOT NULL DEFAULT 0;
PRAGMA user_version=9
"""
"""A held receipt's client cancelled the request while its check ran: the job (stored DONE,
its receipt in) cannot keep that state, so the check row does, and a restart resumes the
check with the job CANCELLING: a failed check then ends it cancelled, never renders it
again against the cancelled request."""

_V10_CANCEL_OFFERS = """
CREATE TABLE cancel_offers (
    offer_hash BLOB PRIMARY KEY,
    job_id     BLOB NOT NULL,
    peer_id    TEXT NOT NULL,
    offer      BLOB NOT NULL,
    signature  BLOB NOT NULL
);
CREATE INDEX cancel_offers_job ON cancel_offers (job_id);
PRAGMA user_version=10
"""
"""The signed offers of a job cancelled while a node rendered it, written with the cancel:
after a restart the job waits, still cancelling, for the partial receipt the node kept and
sends when it reconnects (checked against the offer made to that node); without them it
ended cancelled and the steps the node did were never paid. Dropped once the job ended."""

MIGRATIONS = (
    _SCHEMA_V1,
    _V2_JOB_STATES,
    _V3_RESUME_AND_SEALED_PROMPTS,
    _V4_PUBLISHED_OFFERS,
    _V5_CHECKS,
    _V6_EVIDENCE_VERIFIERS_SLASHES,
    _V7_RECHECK_AFTER_RESTART,
    _V8_EPOCH_EVIDENCE,
    _V9_HELD_CANCEL,
    _V10_CANCEL_OFFERS,
)
_NOT_HELD = "NOT EXISTS (SELECT 1 FROM checks c WHERE c.job_id = r.job_id AND c.state='pending')"
"""SQL: receipt `r` is not held by a pending check."""
_LIVE_SQL = "(" + ", ".join(sorted(f"'{s.value}'" for s in STORED_LIVE)) + ")"
"""The stored states a job may still leave; the terminal ones are final."""

_receipt_decoder = msgspec.msgpack.Decoder(Receipt)
_offer_decoder = msgspec.msgpack.Decoder(JobOffer)
_params_decoder = msgspec.msgpack.Decoder(JobParams)
_job_ids_decoder = msgspec.msgpack.Decoder(list[bytes])


def _open_params(key: bytes | None, blob: bytes, job_id: bytes) -> JobParams:
    if key is None:
        raise PromptKeyError("the request's key is gone: its parameters were shredded")
    return _params_decoder.decode(unseal(bytes(key), bytes(blob), job_id))


@dataclass(frozen=True)
class StoredJob:
    job_id: bytes
    request_id: bytes
    index: int
    params: JobParams
    work_units: int
    state: JobState
    attempts: int
    network: str = "fast"


@dataclass(frozen=True)
class PendingCheck:
    """A receipt held by a pending check when the coordinator stopped (`pending_checks`)."""

    job: StoredJob
    worker: str
    peer_id: str
    """The node that rendered it and keeps its trajectory ("" in files older than v7)."""
    dtype: str
    elapsed: float
    receipt: Receipt
    cancelled: bool = False
    """Its client cancelled the request while the check ran (`_V9_HELD_CANCEL`)."""


def _stored_receipt(row: tuple[Any, ...]) -> StoredReceipt:
    receipt, signature, request_id, offer, offer_signature, index = row
    return StoredReceipt(
        _receipt_decoder.decode(receipt),
        signature,
        request_id,
        None if offer is None else _offer_decoder.decode(offer),
        offer_signature,
        index or 0,
    )


@dataclass(frozen=True)
class StoredReceipt:
    receipt: Receipt
    signature: bytes
    request_id: bytes
    offer: JobOffer | None = None
    """The signed offer the receipt answers (None: stored before offers were kept)."""
    offer_signature: bytes | None = None
    index: int = 0
    """The job's image index in its request."""


@dataclass(frozen=True)
class SlashProposal:
    """A wallet blacklisted for failed checks, proposed for a slash (`Store.propose_slash`)."""

    id: int
    wallet: str
    reason: str
    job_ids: list[bytes]
    """The failed receipts behind it (their evidence is in `failed_receipts`)."""
    state: str
    """`proposed` (open), `submitted` or `dismissed`."""
    proposed_at: float
    note: str


@dataclass(frozen=True)
class DeliveryRecord:
    """What a request owes its client, as stored: enough to resume it after a restart."""

    request_id: bytes
    job_ids: list[bytes]
    """Every job of the request, by image index."""
    pending: list[tuple[bytes, int, bytes]]
    """(job id, index, offer hash) of images receipted but not acknowledged by the client."""
    acked: list[bytes]
    failed: list[tuple[bytes, int]]
    """(job id, index) of jobs given up on."""
    delivered: int
    cancelled: int
    live: int
    """Jobs still queued or cancelling: the request is not over."""


@dataclass(frozen=True)
class JobOutcome:
    """One job of a request as stored (`Store.job_outcomes`)."""

    job_id: bytes
    index: int
    state: JobState
    delivered: bool
    """The client acknowledged its image."""
    steps: int
    offer_hash: bytes | None
    """With a receipt: the offer it answers (names the image's file)."""
    receipt: Receipt | None


@dataclass(frozen=True)
class RequestRecord:
    """A request as stored: what billing needs to settle it again after a restart."""

    request_id: bytes
    model_id: str
    images: int
    queued: int
    """Jobs still queued (not receipted, failed or cancelled): the request runs on."""
    receipts: list[tuple[Receipt, int]]
    """Each receipt with the steps its job asked for (a partial receipt pays pro rata)."""


class Store(Database):
    """One SQLite connection guarded by a lock; calls are short and run on the trio thread."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            path,
            component="store",
            migrations=MIGRATIONS,
            postgres_migrations={2: _V2_JOB_STATES_POSTGRES},
        )
        self._checkpoint_due = False
        try:
            # deleted rows (shredded keys, legacy plaintext) are overwritten, not just unlinked
            self._db.execute("PRAGMA secure_delete=ON")
            self._seal_legacy()
        except BaseException:
            self.close()
            raise

    def _seal_legacy(self) -> None:
        """Parameters written in plaintext by an older release: seal those of live jobs with a
        new key of their request, drop those of ended jobs (no one needs them again)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT job_id, request_id, params, state FROM jobs WHERE sealed=0"
            ).fetchall()
            keys: dict[bytes, bytes] = {}
            for job_id, request_id, blob, state in rows:
                params = _params_decoder.decode(blob)
                sealed = b""
                if JobState(state) in STORED_LIVE:
                    key = keys.get(request_id) or self._request_key(db, request_id)
                    keys[request_id] = key
                    sealed = seal(key, bytes(blob), job_id)
                db.execute(
                    "UPDATE jobs SET params=?, sealed=1, steps=? WHERE job_id=?",
                    (sealed, params.steps, job_id),
                )
        if rows:
            self._checkpoint()

    @staticmethod
    def _request_key(db: sqlite3.Connection, request_id: bytes) -> bytes:
        row = db.execute(
            "SELECT key FROM request_keys WHERE request_id=?", (request_id,)
        ).fetchone()
        if row is not None:
            return bytes(row[0])
        key = new_key()
        db.execute("INSERT INTO request_keys VALUES (?, ?)", (request_id, key))
        return key

    # --- writes ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: bytes,
        *,
        model_id: str,
        network: str,
        token_type: str,
        client_peer: str,
        jobs: list[tuple[bytes, JobParams, int]],
        token_hash: bytes | None = None,
        key: bytes | None = None,
    ) -> None:
        """Request and all its jobs in one transaction: accepted means every job is queued.

        Parameters are sealed with `key` (a fresh one when None), kept in `request_keys`;
        `token_hash` is the sha256 of the requester's resume token (None: not resumable).
        """
        now = time.time()
        key = key or new_key()
        with self._tx() as db:
            db.execute(
                "INSERT INTO requests (request_id, model_id, images, network, token_type,"
                " client_peer, created_at, token_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    model_id,
                    len(jobs),
                    network,
                    token_type,
                    client_peer,
                    now,
                    token_hash,
                ),
            )
            db.execute("INSERT INTO request_keys VALUES (?, ?)", (request_id, key))
            db.executemany(
                "INSERT INTO jobs (job_id, request_id, idx, params, work_units, state, updated_at,"
                " steps, sealed, delivered) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, 1, 0)",
                [
                    (
                        job_id,
                        request_id,
                        i,
                        seal(key, msgspec.msgpack.encode(params), job_id),
                        units,
                        now,
                        params.steps,
                    )
                    for i, (job_id, params, units) in enumerate(jobs)
                ],
            )

    def save_job_states(self, jobs: Iterable[tuple[bytes, JobState, int]]) -> None:
        """Record `(job id, state, attempts)` in one transaction. A job that already ended
        (receipted, failed, cancelled) keeps its state: the store never revives one."""
        now = time.time()
        rows = list(jobs)
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state=?, attempts=?, updated_at=?"
                f" WHERE job_id=? AND state IN {_LIVE_SQL}",
                [(state.value, attempts, now, job_id) for job_id, state, attempts in rows],
            )
            db.executemany(  # a held receipt's job is stored DONE: its check row keeps it
                "UPDATE checks SET cancelled=1 WHERE job_id=? AND state='pending'",
                [(job_id,) for job_id, state, _ in rows if state is JobState.CANCELLING],
            )

    def store_receipt(
        self,
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        state: JobState = JobState.DONE,
        offer: tuple[JobOffer, bytes] | None = None,
    ) -> bool:
        """Commit a verified receipt (with the signed `offer` it answers) and move its job to
        `state` (DONE, or CANCELLED for a partial receipt); False if the job already has a
        receipt or ended."""
        return self.store_receipts([(receipt, signature, request_id, state, offer)])[0]

    def store_receipts(
        self, batch: list[tuple[Receipt, bytes, bytes, JobState, tuple[JobOffer, bytes] | None]]
    ) -> list[bool]:
        """Commit several receipts in one transaction (one fsync); per receipt, False if its
        job already had one or ended."""
        with self._tx() as db:
            done = [self._insert_receipt(db, *item) for item in batch]
            if self.shared_queue is not None:  # cluster.py: one receipt per job, network-wide
                for ok, (receipt, signature, request_id, *_) in zip(done, batch, strict=True):
                    if ok:
                        self._complete_shared(db, receipt.job_id, signature, request_id)
            return done

    shared_queue: str | None = None
    """Set by `cluster.Cluster` (PostgreSQL, several coordinators): this coordinator's id.
    Each receipt's transaction then also completes its job in the shared queue (its one
    `queue_receipts` row) and NOTIFYs the request's owner, so whoever stored the receipt,
    the coordinator the client is attached to hears of it once it is committed."""
    notify_channel = "sogni_results"

    def _complete_shared(
        self, db: sqlite3.Connection, job_id: bytes, signature: bytes, request_id: bytes
    ) -> None:
        db.execute(
            "INSERT OR IGNORE INTO queue_receipts (job_id, receipt_id, coordinator_id,"
            " completed_at) SELECT ?, ?, ?, ? WHERE EXISTS"
            " (SELECT 1 FROM queue_jobs WHERE job_id = ?)",
            (job_id, hashlib.sha256(signature).digest(), self.shared_queue, time.time(), job_id),
        )
        db.execute(
            "UPDATE queue_jobs SET state = 'done', lease_owner = NULL, lease_expires = NULL,"
            " updated_at = ? WHERE job_id = ? AND state IN ('queued', 'leased')",
            (time.time(), job_id),
        )
        db.execute("SELECT pg_notify(?, ?)", (self.notify_channel, request_id.hex()))

    @staticmethod
    def _insert_receipt(
        db: sqlite3.Connection,
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        state: JobState,
        offer: tuple[JobOffer, bytes] | None,
    ) -> bool:
        now = time.time()
        live = db.execute(
            f"UPDATE jobs SET state=?, updated_at=? WHERE job_id=? AND state IN {_LIVE_SQL}",
            (state.value, now, receipt.job_id),
        )
        if live.rowcount == 0:  # unknown, receipted already, or ended
            return False
        db.execute(
            "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.job_id,
                request_id,
                receipt.worker.lower(),
                receipt.offer_hash,
                receipt.result_hash,
                receipt.steps_done,
                receipt.work_units,
                receipt.completed_at,
                msgspec.msgpack.encode(receipt),
                signature,
                now,
                None if offer is None else msgspec.msgpack.encode(offer[0]),
                None if offer is None else offer[1],
            ),
        )
        return True

    # --- checks of sampled receipts (sogni_coordinator.checks) ----------------------------
    def store_held_receipt(
        self,
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        offer: tuple[JobOffer, bytes] | None = None,
        *,
        peer_id: str = "",
        dtype: str = "",
        elapsed: float = 0.0,
        cancelled: bool = False,
    ) -> bool:
        """`store_receipt` (job DONE) plus a `pending` check, in one transaction: the receipt
        is durable but neither delivered nor paid until `mark_check` or `fail_held_receipt`.
        `peer_id`, `dtype`, `elapsed`: what re-running the check after a restart needs;
        `cancelled`: its client cancelled the request before the result came."""
        with self._tx() as db:
            if not self._insert_receipt(db, receipt, signature, request_id, JobState.DONE, offer):
                return False
            db.execute(
                "INSERT INTO checks (job_id, worker, state, updated_at, peer_id,"
                " dtype, elapsed, cancelled) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET worker = excluded.worker,"
                " state = excluded.state, updated_at = excluded.updated_at,"
                " peer_id = excluded.peer_id, dtype = excluded.dtype,"
                " elapsed = excluded.elapsed, cancelled = excluded.cancelled",
                (
                    receipt.job_id,
                    receipt.worker.lower(),
                    time.time(),
                    peer_id,
                    dtype,
                    elapsed,
                    int(cancelled),
                ),
            )
            return True

    def pending_checks(self, job_ids: Sequence[bytes] | None = None) -> list[PendingCheck]:
        """After a restart: every receipt still held by a pending check (or those of
        `job_ids`: a cluster's jobs whose checking coordinator stopped), with its job (the
        parameters unsealed) and what the check needs, in the order they were stored."""
        only, args = "", tuple(job_ids or ())
        if job_ids is not None:
            if not job_ids:
                return []
            only = f" AND c.job_id IN ({', '.join('?' * len(job_ids))})"
        with self._lock:
            rows = self._db.execute(
                "SELECT c.job_id, c.worker, c.peer_id, c.dtype, c.elapsed, r.receipt,"
                " c.cancelled"
                f" FROM checks c JOIN receipts r USING (job_id) WHERE c.state='pending'{only}"
                " ORDER BY r.rowid",
                args,
            ).fetchall()
        pending = "j.job_id IN (SELECT c.job_id FROM checks c WHERE c.state='pending'"
        jobs = {j.job_id: j for j in self._jobs(f"{pending}{only})", args)}
        return [
            PendingCheck(
                jobs[bytes(r[0])],
                str(r[1]),
                str(r[2]),
                str(r[3]),
                float(r[4]),
                _receipt_decoder.decode(r[5]),
                bool(r[6]),
            )
            for r in rows
            if bytes(r[0]) in jobs
        ]

    def mark_check(self, job_id: bytes, state: str) -> bool:
        """A pending check ended well: `passed` or `skipped` (the receipt is released). With
        a shared queue (cluster.py) the job's queue row completes in the same transaction,
        as an unchecked receipt's does in `store_receipts` (`_complete_shared`). False if
        the check was no longer pending (another coordinator's check of it decided first)."""
        with self._tx() as db:
            changed = db.execute(
                "UPDATE checks SET state=?, updated_at=? WHERE job_id=? AND state='pending'",
                (state, time.time(), job_id),
            )
            if changed.rowcount == 0:
                return False
            if self.shared_queue is None:
                return True
            row = db.execute(
                "SELECT signature, request_id FROM receipts WHERE job_id=?", (job_id,)
            ).fetchone()
            if row is not None:
                self._complete_shared(db, job_id, bytes(row[0]), bytes(row[1]))
            return True

    def check_state(self, job_id: bytes) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM checks WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else str(row[0])

    def fail_held_receipt(self, job_id: bytes, reason: str, evidence: bytes | None = None) -> bool:
        """A pending check failed: move the receipt to `failed_receipts` (with `reason` and
        the check's `evidence`) and put its job back to `queued`, so it can be rendered and
        receipted again. False if the receipt was not held."""
        with self._tx() as db:
            return self._fail_held(db, job_id, reason, evidence)

    @staticmethod
    def _fail_held(
        db: sqlite3.Connection, job_id: bytes, reason: str, evidence: bytes | None = None
    ) -> bool:
        gone = db.execute("DELETE FROM checks WHERE job_id=? AND state='pending'", (job_id,))
        if gone.rowcount == 0:
            return False
        now = time.time()
        db.execute(
            "INSERT INTO failed_receipts SELECT job_id, request_id, worker, receipt, signature,"
            " ?, ?, ? FROM receipts WHERE job_id=?",
            (reason, now, evidence, job_id),
        )
        db.execute("DELETE FROM receipts WHERE job_id=?", (job_id,))
        db.execute(
            "UPDATE jobs SET state='queued', updated_at=? WHERE job_id=? AND state='done'",
            (now, job_id),
        )
        return True

    def failed_receipts(self, job_id: bytes | None = None) -> list[tuple[bytes, str, Receipt, str]]:
        """`(job id, worker, receipt, reason)` of receipts whose check failed, oldest first."""
        where, args = ("WHERE job_id=?", (job_id,)) if job_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, worker, receipt, reason FROM failed_receipts "
                + where
                + " ORDER BY rowid",
                args,
            ).fetchall()
        return [(bytes(j), str(w), _receipt_decoder.decode(r), str(t)) for j, w, r, t in rows]

    def failed_evidence(self, job_id: bytes) -> list[bytes]:
        """The evidence kept with each failed receipt of `job_id` (oldest first; failures
        stored before evidence was kept, or without any, are left out)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT evidence FROM failed_receipts WHERE job_id=? AND evidence IS NOT NULL"
                " ORDER BY rowid",
                (job_id,),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def failed_job_ids(self, worker: str, since: float) -> list[bytes]:
        """Job ids of `worker`'s receipts that failed a check at or after `since`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM failed_receipts WHERE worker=? AND failed_at>=? ORDER BY rowid",
                (worker.lower(), since),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    # --- verifier work (paid from the take when the job's receipt is settled) -------------
    def record_verifier_work(self, job_id: bytes, verifier: str, steps: int) -> None:
        """A verifier computed `steps` steps (or decodes) checking `job_id`; `verifier` is the
        account it is paid at (its payout address at the time of the check, else its wallet:
        `checks._record_work`; rows before payout addresses hold wallets, the same thing)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO verifier_work VALUES (?, ?, ?, ?)",
                (job_id, verifier.lower(), steps, time.time()),
            )

    def verifier_work(self, job_ids: Iterable[bytes]) -> dict[bytes, list[tuple[str, int]]]:
        """Job id -> `(verifier account, steps)` per account paid, summed, sorted by account,
        for each of `job_ids` that has any."""
        out: dict[bytes, list[tuple[str, int]]] = {}
        with self._lock:
            for job_id in job_ids:
                rows = self._db.execute(
                    "SELECT verifier, SUM(steps) FROM verifier_work WHERE job_id=?"
                    " GROUP BY verifier ORDER BY verifier",
                    (job_id,),
                ).fetchall()
                if rows:
                    out[job_id] = [(str(v), int(n)) for v, n in rows]
        return out

    # --- slash proposals (signed offline with the settlement key) ------------------------
    def propose_slash(self, wallet: str, reason: str, job_ids: list[bytes]) -> int | None:
        """Record a slash proposal for `wallet` (None, nothing recorded, if one is already
        open for it)."""
        w = wallet.lower()
        with self._tx() as db:
            open_ = db.execute(
                "SELECT 1 FROM slash_proposals WHERE wallet=? AND state='proposed'", (w,)
            ).fetchone()
            if open_ is not None:
                return None
            row = db.execute(
                "INSERT INTO slash_proposals (wallet, reason, job_ids, state, proposed_at)"
                " VALUES (?, ?, ?, 'proposed', ?) RETURNING id",
                (w, reason, msgspec.msgpack.encode(job_ids), time.time()),
            ).fetchone()
            return int(row[0])

    def slash_proposals(self, state: str | None = None) -> list[SlashProposal]:
        """Slash proposals, oldest first (only those in `state` when given)."""
        where, args = ("WHERE state=?", (state,)) if state is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT id, wallet, reason, job_ids, state, proposed_at, note"
                " FROM slash_proposals " + where + " ORDER BY id",
                args,
            ).fetchall()
        return [
            SlashProposal(
                int(i), str(w), str(r), _job_ids_decoder.decode(j), str(st), float(t), str(n)
            )
            for i, w, r, j, st, t, n in rows
        ]

    def mark_slash(self, proposal_id: int, state: str, note: str = "") -> bool:
        """Close an open proposal: `submitted` (note: the tx hash) or `dismissed` (why)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE slash_proposals SET state=?, note=? WHERE id=? AND state='proposed'",
                (state, note, proposal_id),
            )
            return cur.rowcount == 1

    def receipt_count(self, worker: str) -> int:
        """Receipts this coordinator stored for `worker` (failed ones included)."""
        w = worker.lower()
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM receipts WHERE worker=?", (w,)).fetchone()
            f = self._db.execute(
                "SELECT COUNT(*) FROM failed_receipts WHERE worker=?", (w,)
            ).fetchone()
        return int(n[0]) + int(f[0])

    # --- reads -------------------------------------------------------------------------
    def save_cancel_offers(self, rows: Iterable[tuple[bytes, bytes, str, JobOffer, bytes]]) -> None:
        """`(offer hash, job id, peer id, offer, signature)` of the offers running when their
        job was cancelled (`_V10_CANCEL_OFFERS`)."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO cancel_offers (offer_hash, job_id, peer_id, offer, signature)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (offer_hash) DO NOTHING",
                [(h, j, p, msgspec.msgpack.encode(o), sig) for h, j, p, o, sig in rows],
            )

    def cancel_offers(self) -> dict[bytes, list[tuple[bytes, str, JobOffer, bytes]]]:
        """Job id -> `(offer hash, peer id, offer, signature)` of its cancelled offers, for the
        jobs still cancelling; the rows of jobs that ended are dropped here."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM cancel_offers WHERE job_id NOT IN"
                " (SELECT job_id FROM jobs WHERE state='cancelling')"
            )
            rows = db.execute(
                "SELECT job_id, offer_hash, peer_id, offer, signature FROM cancel_offers"
            ).fetchall()
        found: dict[bytes, list[tuple[bytes, str, JobOffer, bytes]]] = {}
        for job_id, offer_hash, peer_id, offer, signature in rows:
            found.setdefault(bytes(job_id), []).append(
                (
                    bytes(offer_hash),
                    str(peer_id),
                    _offer_decoder.decode(bytes(offer)),
                    bytes(signature),
                )
            )
        return found

    def live_jobs(self) -> list[StoredJob]:
        """Jobs that had not ended when the coordinator stopped (queued or cancelling),
        in the order they were accepted: what a restart restores."""
        return self._jobs(f"j.state IN {_LIVE_SQL}")

    def _jobs(self, where: str, args: Sequence[object] = ()) -> list[StoredJob]:
        """Jobs with their parameters unsealed (raises `PromptKeyError` if a live job's key
        is gone, which `shred_keys` never allows)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.job_id, j.request_id, j.idx, j.params, j.work_units, j.state,"
                " j.attempts, r.network, k.key FROM jobs j JOIN requests r USING (request_id)"
                " LEFT JOIN request_keys k ON k.request_id = j.request_id"
                f" WHERE {where} ORDER BY j.rowid",
                args,
            ).fetchall()
        return [
            StoredJob(
                r[0],
                r[1],
                r[2],
                _open_params(r[8], r[3], r[0]),
                r[4],
                JobState(r[5]),
                r[6],
                r[7],
            )
            for r in rows
        ]

    def jobs_by_id(self, job_ids: Iterable[bytes]) -> list[StoredJob]:
        """These jobs if they are still live (a coordinator of the network leased them from
        the shared queue), parameters unsealed; ended or unknown ones are left out. One
        statement per lease batch."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return self._jobs(f"j.job_id IN ({marks}) AND j.state IN {_LIVE_SQL}", ids)

    def job_outcomes(self, request_id: bytes) -> list[JobOutcome]:
        """Each job of the request as its owner needs it when another coordinator of the
        network may have ended it: state (a held receipt counts as live), and for a
        receipt the offer hash, payee and steps (to deliver the image and bill it)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.job_id, j.idx,"
                f" CASE WHEN r.job_id IS NOT NULL AND NOT {_NOT_HELD} THEN 'queued'"
                " ELSE j.state END, j.delivered, j.steps, r.offer_hash, r.receipt FROM jobs j"
                " LEFT JOIN receipts r ON r.job_id = j.job_id WHERE j.request_id=?"
                " ORDER BY j.idx",
                (request_id,),
            ).fetchall()
        return [
            JobOutcome(
                bytes(r[0]),
                int(r[1]),
                JobState(r[2]),
                bool(r[3]),
                int(r[4]),
                None if r[5] is None else bytes(r[5]),
                None if r[6] is None else _receipt_decoder.decode(r[6]),
            )
            for r in rows
        ]

    def request_record(self, request_id: bytes) -> RequestRecord | None:
        """The request, how many of its jobs are still queued, and its receipts."""
        with self._lock:
            row = self._db.execute(
                "SELECT model_id, images FROM requests WHERE request_id=?", (request_id,)
            ).fetchone()
            if row is None:
                return None
            # a held receipt's job is not settled yet: still live; so is a cancelling one
            # (its node's last receipt may still come: a coordinator adopting the request
            # refunded everything, and that receipt went unpaid)
            queued = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE request_id=? AND (state IN ('queued',"
                " 'cancelling') OR job_id IN (SELECT job_id FROM checks WHERE state='pending'))",
                (request_id,),
            ).fetchone()[0]
            receipts = self._db.execute(
                "SELECT r.receipt, j.steps FROM receipts r JOIN jobs j USING (job_id)"
                f" WHERE r.request_id=? AND {_NOT_HELD} ORDER BY r.rowid",
                (request_id,),
            ).fetchall()
        return RequestRecord(
            request_id,
            str(row[0]),
            int(row[1]),
            int(queued),
            [(_receipt_decoder.decode(r), int(steps)) for r, steps in receipts],
        )

    # --- delivery to the client and resume ------------------------------------------------
    def token_matches(self, request_id: bytes, token: bytes) -> bool:
        """Is `token` the resume token of `request_id`? Compared in constant time; an
        unknown request costs the same as a wrong token."""
        with self._lock:
            row = self._db.execute(
                "SELECT token_hash FROM requests WHERE request_id=?", (request_id,)
            ).fetchone()
        stored = bytes(row[0]) if row is not None and row[0] is not None else b"\0" * 32
        given = hashlib.sha256(token).digest()
        return hmac.compare_digest(given, stored) and row is not None and row[0] is not None

    def delivery(self, request_id: bytes) -> DeliveryRecord | None:
        """The request's jobs as its client sees them (None: unknown request)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.job_id, j.idx,"
                f" CASE WHEN r.job_id IS NOT NULL AND NOT {_NOT_HELD} THEN 'queued'"
                " ELSE j.state END, j.delivered, r.offer_hash FROM jobs j"
                " LEFT JOIN receipts r ON r.job_id = j.job_id WHERE j.request_id=?"
                " ORDER BY j.idx",
                (request_id,),
            ).fetchall()
        if not rows:
            return None
        states = [JobState(r[2]) for r in rows]
        by_state = list(zip(rows, states, strict=True))
        done = [(r, s) for r, s in by_state if s is JobState.DONE]
        return DeliveryRecord(
            request_id,
            job_ids=[r[0] for r in rows],
            pending=[(r[0], r[1], bytes(r[4])) for r, _ in done if not r[3]],
            acked=[r[0] for r, _ in done if r[3]],
            failed=[
                (r[0], r[1]) for r, s in zip(rows, states, strict=True) if s is JobState.FAILED
            ],
            delivered=len(done),
            cancelled=states.count(JobState.CANCELLED),
            live=sum(s in STORED_LIVE for s in states),
        )

    def pending_deliveries(self) -> list[tuple[bytes, int, bytes]]:
        """(request id, index, offer hash) of every image receipted but not acknowledged:
        the files the results folder must keep."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.request_id, j.idx, r.offer_hash FROM jobs j"
                " JOIN receipts r ON r.job_id = j.job_id WHERE j.state='done' AND j.delivered=0"
                f" AND {_NOT_HELD}"  # a held image is kept by its check, not the client
            ).fetchall()
        return [(bytes(r[0]), int(r[1]), bytes(r[2])) for r in rows]

    def mark_delivered(self, request_id: bytes, job_ids: Iterable[bytes]) -> list[bytes]:
        """Record that the client has these images (jobs of `request_id` that are DONE and
        not yet acknowledged); returns the ones newly marked."""
        marked = []
        with self._tx() as db:
            for job_id in dict.fromkeys(job_ids):
                cur = db.execute(
                    "UPDATE jobs SET delivered=1 WHERE job_id=? AND request_id=?"
                    " AND state='done' AND delivered=0",
                    (job_id, request_id),
                )
                if cur.rowcount:
                    marked.append(job_id)
        return marked

    # --- prompts: crypto-shredding ------------------------------------------------------------
    def shred_keys(self, retention: float, now: float | None = None) -> int:
        """Delete the keys of requests that ended (no live job, no receipt held by a pending
        check: its check re-runs the job's steps) at least `retention` seconds ago (by their
        jobs' last change), then checkpoint the WAL so the deleted key is gone from it too.
        Returns how many keys were deleted."""
        cutoff = (time.time() if now is None else now) - retention
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM request_keys WHERE NOT EXISTS (SELECT 1 FROM jobs j"
                f" WHERE j.request_id = request_keys.request_id AND j.state IN {_LIVE_SQL})"
                " AND NOT EXISTS (SELECT 1 FROM checks c JOIN jobs j USING (job_id)"
                "   WHERE j.request_id = request_keys.request_id AND c.state = 'pending')"
                " AND (SELECT MAX(j.updated_at) FROM jobs j"
                "      WHERE j.request_id = request_keys.request_id) <= ?",
                (cutoff,),
            )
            deleted = max(cur.rowcount, 0)
        if deleted or self._checkpoint_due:
            self._checkpoint()
        return deleted

    def has_key(self, request_id: bytes) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM request_keys WHERE request_id=?", (request_id,)
            ).fetchone()
        return row is not None

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and truncate it; retried later if a reader holds it."""
        with self._lock:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        self._checkpoint_due = bool(busy)

    def job_state(self, job_id: bytes) -> JobState | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    _RECEIPT_READ = (
        "r.receipt, r.signature, r.request_id, r.offer, r.offer_signature,"
        " (SELECT j.idx FROM jobs j WHERE j.job_id = r.job_id)"
    )

    def receipt(self, job_id: bytes) -> StoredReceipt | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._RECEIPT_READ} FROM receipts r WHERE job_id=?", (job_id,)
            ).fetchone()
        return None if row is None else _stored_receipt(row)

    def receipts(self) -> list[StoredReceipt]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._RECEIPT_READ} FROM receipts r ORDER BY rowid"
            ).fetchall()
        return [_stored_receipt(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            receipts = self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
        out = {state: int(n) for state, n in rows}
        out["receipts"] = int(receipts)
        return out

    # --- settlement epochs (sogni_coordinator.settlement) -----------------------------------
    # A receipt is paid at most once because `settled_receipts.job_id` is a primary key and a
    # plan is committed (epoch row + its receipts) in one transaction before any chain call.
    _EPOCH_COLUMNS = (
        "epoch, state, root, total, receipts_hash, plan, planned_at, posted_at, tx_hash"
    )

    def unsettled_receipts(
        self, stored_before: float | None = None, limit: int | None = None
    ) -> list[StoredReceipt]:
        """Receipts in no epoch yet (neither paid nor refused), not held by a pending check
        (`sogni_coordinator.checks`) and, with `stored_before`, stored before that time (the
        dispute window: younger receipts wait for a later epoch), oldest first; at most
        `limit` of them."""
        window = "" if stored_before is None else " AND r.stored_at < ?"
        args: tuple[float | int, ...] = () if stored_before is None else (stored_before,)
        if limit is not None:
            args += (limit,)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._RECEIPT_READ} FROM receipts r"
                " WHERE NOT EXISTS (SELECT 1 FROM settled_receipts s WHERE s.job_id = r.job_id)"
                f" AND {_NOT_HELD}"  # a receipt whose check is pending is not paid yet
                + window
                + " ORDER BY r.rowid"
                + ("" if limit is None else " LIMIT ?"),
                args,
            ).fetchall()
        return [_stored_receipt(r) for r in rows]

    def save_epoch_plan(
        self,
        epoch: int,
        *,
        root: bytes,
        total: int,
        receipts_hash: bytes,
        plan: bytes,
        paid: list[bytes],
        refused: list[tuple[bytes, str]],
        evidence: bytes | None = None,
    ) -> None:
        """Commit an epoch plan and mark its receipts, atomically; `evidence`: the bytes of
        the file it names as `receiptsFile` (batch or airdrop evidence), kept for every
        coordinator of the network to publish.

        Raises `sqlite3.IntegrityError` if the epoch exists or a receipt is already settled
        (another closer won the race); nothing is written then.
        """
        with self._tx() as db:
            db.execute(
                f"INSERT INTO epochs ({self._EPOCH_COLUMNS}) VALUES"
                " (?, 'planned', ?, ?, ?, ?, ?, NULL, NULL)",
                (epoch, root, str(total), receipts_hash, plan, time.time()),
            )
            if evidence is not None:
                db.execute("UPDATE epochs SET evidence=? WHERE epoch=?", (evidence, epoch))
            db.executemany(
                "INSERT INTO settled_receipts (job_id, epoch, status) VALUES (?, ?, 'paid')",
                [(job_id, epoch) for job_id in paid],
            )
            db.executemany(
                "INSERT INTO settled_receipts (job_id, epoch, status, detail)"
                " VALUES (?, ?, 'refused', ?)",
                [(job_id, epoch, why) for job_id, why in refused],
            )

    def save_refused(self, refused: list[tuple[bytes, str]]) -> None:
        """Mark receipts that will never be paid when no epoch is planned (nothing payable)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO settled_receipts (job_id, epoch, status, detail)"
                " VALUES (?, NULL, 'refused', ?)",
                refused,
            )

    def mark_epoch_posted(self, epoch: int, tx_hash: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE epochs SET state='posted', posted_at=?, tx_hash=coalesce(?, tx_hash)"
                " WHERE epoch=?",
                (time.time(), tx_hash, epoch),
            )

    def mark_epoch_dropped(self, epoch: int) -> bool:
        """A posted epoch's root is gone from the chain (a reorganisation): planned again, to
        be posted from its stored plan. False if `epoch` is not a posted epoch here."""
        with self._tx() as db:
            changed = db.execute(
                "UPDATE epochs SET state='planned', posted_at=NULL, tx_hash=NULL"
                " WHERE epoch=? AND state='posted'",
                (epoch,),
            ).rowcount
        return bool(changed)

    def epoch_record(self, epoch: int) -> EpochRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._EPOCH_COLUMNS} FROM epochs WHERE epoch=?", (epoch,)
            ).fetchone()
        return None if row is None else EpochRecord.from_row(row)

    def posted_epochs(self) -> list[EpochRecord]:
        """Every epoch whose root is on chain, in order (what a network publishes)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._EPOCH_COLUMNS} FROM epochs WHERE state='posted' ORDER BY epoch"
            ).fetchall()
        return [EpochRecord.from_row(r) for r in rows]

    def epoch_evidence(self, epoch: int) -> bytes | None:
        """The bytes of epoch `epoch`'s receipts batch or airdrop evidence, if kept."""
        with self._lock:
            row = self._db.execute("SELECT evidence FROM epochs WHERE epoch=?", (epoch,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def last_epoch_record(self, *, state: str | None = None) -> EpochRecord | None:
        """The highest epoch (optionally only one in `state`)."""
        sql = f"SELECT {self._EPOCH_COLUMNS} FROM epochs"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state=?"
            args = (state,)
        with self._lock:
            row = self._db.execute(sql + " ORDER BY epoch DESC LIMIT 1", args).fetchone()
        return None if row is None else EpochRecord.from_row(row)

    def receipt_times(self, since: float) -> list[float]:
        """When each receipt stored at or after `since` was stored (the status page's
        throughput chart), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT stored_at FROM receipts WHERE stored_at>=? ORDER BY stored_at", (since,)
            ).fetchall()
        return [float(r[0]) for r in rows]

    def epoch_summaries(self) -> list[tuple[int, str, int, int, int]]:
        """``(epoch, state, total, paid receipts, refused receipts)`` for every epoch."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.epoch, e.state, e.total,"
                " (SELECT count(*) FROM settled_receipts s"
                "  WHERE s.epoch = e.epoch AND s.status = 'paid'),"
                " (SELECT count(*) FROM settled_receipts s"
                "  WHERE s.epoch = e.epoch AND s.status = 'refused')"
                " FROM epochs e ORDER BY e.epoch"
            ).fetchall()
        return [(int(e), str(st), int(t), int(p), int(r)) for e, st, t, p, r in rows]

    def receipt_settlement(self, job_id: bytes) -> tuple[int | None, str, str] | None:
        """``(epoch, 'paid' | 'refused', detail)`` for a settled receipt, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT epoch, status, detail FROM settled_receipts WHERE job_id=?", (job_id,)
            ).fetchone()
        return None if row is None else (row[0], str(row[1]), str(row[2]))


@dataclass(frozen=True)
class EpochRecord:
    """One row of `epochs`: a settlement plan, and whether its root is on chain yet."""

    epoch: int
    state: str
    root: bytes
    total: int
    receipts_hash: bytes
    plan: bytes
    planned_at: float
    posted_at: float | None
    tx_hash: str | None

    @classmethod
    def from_row(cls, r: tuple) -> EpochRecord:
        epoch, state, root, total, receipts_hash, plan, planned_at, posted_at, tx_hash = r
        return cls(
            epoch=int(epoch),
            state=str(state),
            root=bytes(root),
            total=int(str(total)),
            receipts_hash=bytes(receipts_hash),
            plan=bytes(plan),
            planned_at=float(planned_at),
            posted_at=None if posted_at is None else float(posted_at),
            tx_hash=None if tx_hash is None else str(tx_hash),
        )
