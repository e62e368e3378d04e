"""The node's own record of its work: offers taken, receipts signed, acks, hand-backs.

Why: a node must be able to audit a coordinator's epoch file and recompute its payout (and
build claims) from its own evidence, not the coordinator's. So every signed offer and every
receipt the node signs is committed here with `synchronous=FULL` (WAL mode) before the result
is sent: a crash after sending never loses the receipt. Prompts never touch the disk: an offer
carries only the params hash, and `record_offer` only accepts a `JobOffer` record's JSON
(which has no prompt field), never free-form JSON.

Sync API on one connection guarded by a lock: writes are a few hundred bytes, so trio code
may call it directly or through `trio.to_thread.run_sync`.

The schema evolves by ordered forward migrations (`_MIGRATIONS`, applied on open by
`sogni_protocol.migrations`); a journal written by a newer node is refused, never rewritten.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from sogni_protocol import eip712
from sogni_protocol.messages import JobOffer, Receipt, RenderMeta
from sogni_protocol.migrations import Migration, SchemaTooNew, migrate

__all__ = ["SCHEMA_VERSION", "Journal", "JournalError", "JournalReceipt"]

_SCHEMA_V1 = """
CREATE TABLE offers (
    job_id BLOB PRIMARY KEY,
    coordinator TEXT NOT NULL,
    model_id TEXT NOT NULL,
    offer_hash BLOB NOT NULL,
    params_hash BLOB NOT NULL,
    work_units INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    offer_json TEXT NOT NULL,
    offer_signature BLOB NOT NULL,
    offered_at REAL NOT NULL,
    handed_back_at REAL,
    steps_done INTEGER,
    hand_back_reason TEXT
);
CREATE TABLE receipts (
    job_id BLOB PRIMARY KEY,
    offer_hash BLOB NOT NULL,
    worker TEXT NOT NULL,
    coordinator TEXT NOT NULL,
    model_id TEXT NOT NULL,
    result_hash BLOB NOT NULL,
    steps_done INTEGER NOT NULL,
    work_units INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    signature BLOB NOT NULL,
    image_sha256 BLOB NOT NULL,
    chain_id INTEGER,
    verifying_contract TEXT,
    meta_json TEXT,
    recorded_at REAL NOT NULL,
    accepted INTEGER,
    ack_reason TEXT,
    acked_at REAL
);
CREATE INDEX receipts_unacked ON receipts (recorded_at) WHERE accepted IS NULL;
CREATE INDEX receipts_coordinator ON receipts (coordinator, completed_at);
"""

_MIGRATIONS = (
    Migration(1, "offers and receipts", _SCHEMA_V1),
    Migration(
        2,
        "receipts record the EIP-712 domain version they were signed under, so they stay "
        "verifiable after a version change; every earlier receipt was signed under '1'",
        "ALTER TABLE receipts ADD COLUMN domain_version TEXT NOT NULL DEFAULT '1'",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_RECEIPT_COLUMNS = (
    "job_id, offer_hash, worker, coordinator, model_id, result_hash, steps_done, work_units,"
    " completed_at, signature, image_sha256, chain_id, verifying_contract, meta_json,"
    " recorded_at, accepted, ack_reason, acked_at, domain_version"
)


class JournalError(Exception):
    """The journal cannot be opened or refuses a write that would contradict it."""


@dataclass(frozen=True)
class JournalReceipt:
    """A receipt as journalled, with its signature and the coordinator's answer (if any)."""

    receipt: Receipt
    signature: bytes
    image_sha256: bytes
    chain_id: int | None
    verifying_contract: str | None
    meta: RenderMeta | None
    recorded_at: float
    accepted: bool | None
    """None: no ack received yet; False: the coordinator rejected it."""
    ack_reason: str | None
    domain_version: str = "1"
    """The EIP-712 domain version the receipt was signed under (`eip712.Domain.version`)."""


class Journal:
    """One node's SQLite journal. Use as a context manager, or call `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None

    def _migrate(self) -> None:
        """Apply the migrations this journal lacks (one transaction), or refuse a newer one."""
        try:
            migrate(self._db, _MIGRATIONS, what=f"journal {self.path}")
        except SchemaTooNew as exc:
            raise JournalError(
                f"journal {self.path} has schema version {exc.found}, newer than this node's "
                f"{exc.known}; upgrade sogni-node"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writes ---------------------------------------------------------------------------
    def record_offer(
        self,
        job_id: bytes,
        coordinator: str,
        model_id: str,
        offer_hash: bytes,
        work_units: int,
        deadline: int,
        offer_json: str | bytes | None = None,
        *,
        params_hash: bytes | None = None,
        signature: bytes = b"",
    ) -> None:
        """Journal an offer the node took (again on a re-offer of the same job).

        `offer_json` must be a JSON-encoded `JobOffer` (`msgspec.json.encode(offer)`), which
        has no prompt field; anything else (e.g. the whole `Offer` message with its params)
        is refused, so a prompt cannot reach the disk by accident.
        """
        stored = ""
        if offer_json is not None:
            try:
                offer = msgspec.json.decode(offer_json, type=JobOffer)
            except msgspec.ValidationError as exc:
                raise JournalError(f"offer_json is not a JobOffer: {exc}") from None
            except msgspec.DecodeError:
                raise JournalError("offer_json is not JSON") from None
            if params_hash is None:
                params_hash = offer.params_hash
            stored = msgspec.json.encode(offer).decode()
        with self._lock:
            self._db.execute(
                "INSERT INTO offers (job_id, coordinator, model_id, offer_hash, params_hash,"
                " work_units, deadline, offer_json, offer_signature, offered_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET coordinator = excluded.coordinator,"
                " model_id = excluded.model_id, offer_hash = excluded.offer_hash,"
                " params_hash = excluded.params_hash, work_units = excluded.work_units,"
                " deadline = excluded.deadline, offer_json = excluded.offer_json,"
                " offer_signature = excluded.offer_signature, offered_at = excluded.offered_at,"
                " handed_back_at = NULL, steps_done = NULL, hand_back_reason = NULL",
                (
                    bytes(job_id),
                    coordinator,
                    model_id,
                    bytes(offer_hash),
                    bytes(params_hash or b""),
                    work_units,
                    deadline,
                    stored,
                    bytes(signature),
                    time.time(),
                ),
            )

    def record_signed_offer(self, offer: JobOffer, offer_hash: bytes, signature: bytes) -> None:
        """`record_offer` from the `JobOffer` record itself, keeping the coordinator's signature
        (the node's evidence that the work was offered)."""
        self.record_offer(
            offer.job_id,
            offer.coordinator,
            offer.model_id,
            offer_hash,
            offer.work_units,
            offer.deadline,
            msgspec.json.encode(offer),
            signature=signature,
        )

    def record_receipt(
        self,
        receipt: Receipt,
        signature: bytes,
        image_sha256: bytes | None = None,
        *,
        chain_id: int | None = None,
        verifying_contract: str | None = None,
        meta: RenderMeta | None = None,
        domain_version: str | None = None,
    ) -> None:
        """Durably journal a signed receipt; call before sending the result.

        `image_sha256` defaults to `receipt.result_hash` (the result hash *is* the image's
        sha256); `domain_version` to the current EIP-712 version (what `sign_receipt` uses).
        Recording the same receipt twice is a no-op; a different receipt for a job
        that already has one is a `JournalError` (a node never signs two results for one job).
        """
        row = (
            receipt.job_id,
            receipt.offer_hash,
            receipt.worker,
            receipt.coordinator,
            receipt.model_id,
            receipt.result_hash,
            receipt.steps_done,
            receipt.work_units,
            receipt.completed_at,
            bytes(signature),
            bytes(image_sha256 if image_sha256 is not None else receipt.result_hash),
            chain_id,
            verifying_contract,
            msgspec.json.encode(meta).decode() if meta is not None else None,
            time.time(),
            domain_version or eip712.DOMAIN_VERSION,
        )
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO receipts (job_id, offer_hash, worker, coordinator, model_id,"
                    " result_hash, steps_done, work_units, completed_at, signature,"
                    " image_sha256, chain_id, verifying_contract, meta_json, recorded_at,"
                    " domain_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.IntegrityError:
                existing = self._db.execute(
                    "SELECT signature FROM receipts WHERE job_id = ?", (receipt.job_id,)
                ).fetchone()
                if existing is not None and bytes(existing[0]) == bytes(signature):
                    return
                raise JournalError(
                    f"job 0x{receipt.job_id.hex()} already has a different receipt"
                ) from None

    def mark_acked(self, job_id: bytes, accepted: bool, reason: str = "") -> bool:
        """Record the coordinator's `ResultAck`; False if no receipt exists for `job_id`."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE receipts SET accepted = ?, ack_reason = ?, acked_at = ? WHERE job_id = ?",
                (int(accepted), reason, time.time(), job_id),
            )
            return cur.rowcount > 0

    def mark_handed_back(self, job_id: bytes, steps_done: int, reason: str) -> bool:
        """Record that the job went back unfinished; False if its offer was never recorded."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE offers SET handed_back_at = ?, steps_done = ?, hand_back_reason = ?"
                " WHERE job_id = ?",
                (time.time(), steps_done, reason, job_id),
            )
            return cur.rowcount > 0

    # --- reads ----------------------------------------------------------------------------
    def receipts(
        self, *, coordinator: str | None = None, since: int | None = None
    ) -> list[JournalReceipt]:
        """Receipts by completion time; optionally one coordinator's, completed at/after `since`."""
        sql = f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE 1 = 1"
        args: list[object] = []
        if coordinator is not None:
            sql += " AND lower(coordinator) = lower(?)"
            args.append(coordinator)
        if since is not None:
            sql += " AND completed_at >= ?"
            args.append(since)
        sql += " ORDER BY completed_at, recorded_at"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_receipt_from_row(r) for r in rows]

    def unacked(self) -> list[JournalReceipt]:
        """Receipts with no `ResultAck` yet (the result may not have reached the coordinator)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE accepted IS NULL"
                " ORDER BY recorded_at"
            ).fetchall()
        return [_receipt_from_row(r) for r in rows]

    def offer(self, job_id: bytes) -> JobOffer | None:
        """The journalled `JobOffer` for `job_id`, if one was recorded with its JSON."""
        with self._lock:
            row = self._db.execute(
                "SELECT offer_json FROM offers WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None or not row[0]:
            return None
        return msgspec.json.decode(row[0], type=JobOffer)

    def counts(self) -> dict[str, int]:
        """offers, receipts, accepted, rejected, unacked, handed_back, work_units_accepted."""
        with self._lock:
            offers, handed_back = self._db.execute(
                "SELECT count(*), count(handed_back_at) FROM offers"
            ).fetchone()
            receipts, accepted, rejected, unacked, units = self._db.execute(
                "SELECT count(*), coalesce(sum(accepted = 1), 0), coalesce(sum(accepted = 0), 0),"
                " coalesce(sum(accepted IS NULL), 0),"
                " coalesce(sum(CASE WHEN accepted = 1 THEN work_units END), 0) FROM receipts"
            ).fetchone()
        return {
            "offers": offers,
            "receipts": receipts,
            "accepted": accepted,
            "rejected": rejected,
            "unacked": unacked,
            "handed_back": handed_back,
            "work_units_accepted": units,
        }


def _receipt_from_row(r: tuple[Any, ...]) -> JournalReceipt:
    (job_id, offer_hash, worker, coordinator, model_id, result_hash, steps_done, work_units,
     completed_at, signature, image_sha256, chain_id, verifying_contract, meta_json,
     recorded_at, accepted, ack_reason, _acked_at, domain_version) = r  # fmt: skip
    receipt = Receipt(
        job_id=bytes(job_id),
        offer_hash=bytes(offer_hash),
        worker=str(worker),
        coordinator=str(coordinator),
        model_id=str(model_id),
        result_hash=bytes(result_hash),
        steps_done=int(steps_done),
        work_units=int(work_units),
        completed_at=int(completed_at),
    )
    return JournalReceipt(
        receipt=receipt,
        signature=bytes(signature),
        image_sha256=bytes(image_sha256),
        chain_id=None if chain_id is None else int(chain_id),
        verifying_contract=None if verifying_contract is None else str(verifying_contract),
        meta=None if meta_json is None else msgspec.json.decode(str(meta_json), type=RenderMeta),
        recorded_at=float(recorded_at),
        accepted=None if accepted is None else bool(accepted),
        ack_reason=None if ack_reason is None else str(ack_reason),
        domain_version=str(domain_version),
    )
