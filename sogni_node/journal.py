"""The node's own record of its work: offers taken, receipts signed, acks, hand-backs.

Why: a node must be able to audit a coordinator's epoch file and recompute its payout (and
build claims) from its own evidence, not the coordinator's. So every receipt the node signs,
with the signed offer it answers, is durable here (WAL mode, the receipt's commit fsync'd:
`synchronous=FULL`) before the result is sent: a crash after sending never loses the receipt.
Prompts never touch the disk: an offer carries only the params hash, and `record_offer` only
accepts a `JobOffer` record's JSON (which has no prompt field), never free-form JSON.

Durability, and what it costs (BENCHMARKS.md, Dispatch: a fsync'd commit is a few hundred
microseconds of CPU). What the node signs and sends is fsync'd before it is sent: the image
and the receipt's commit (`keep_result`, `record_receipt`, `resign`). Writes that answer
nothing on their own, an offer taken (`record_offer`, `take_offer`) and a coordinator's ack
(`mark_acked`), commit without a fsync of their own (`synchronous=NORMAL` for that commit):
SQLite has them, the operating system holds them, and they become durable with the next
fsync'd commit (the WAL is append-only, so fsyncing it covers every earlier commit) or
`sync`, which the daemon calls within `SYNC_INTERVAL` seconds of such a write. A process
crash loses none of them (the writes are in the kernel's page cache); only a power cut or an
OS crash inside that window can: then an offer taken is forgotten (nothing was sent for it:
a receipt commits it), or an ack is, and its receipt reads as unacked again (the receipt and
its signature are kept; its image, if still kept, waits until `prune_results`).

Results are kept until acked, so a result the coordinator may not have received can be sent
again byte for byte (`stored_result`), re-signed against a new offer if the coordinator
restarted (`resign`: same image, same sha256; only the offer hash and the signature change);
`mark_acked` deletes the image. An image up to `INLINE_MAX` bytes (every image of the
embedded models, most 512-px ones) is a row of `kept_images`, written in the receipt's own
transaction: one fsync per result. A larger one is a file, `<results_dir>/<job id>.<ext>`,
fsync'd with its folder before the receipt row commits (three fsyncs); it is written in
place, not renamed over: no receipt names it until the receipt commits, after the file's
fsync, so a torn file (a crash while writing) is one no receipt names, like a file without a
receipt (a crash between the two steps); either is overwritten by the next render of the
job, `prune_results` clears what no ack will delete, and `stored_result` checks the hash of
what it reads, row or file.

Sync API on one connection guarded by a lock. Every write is fsync'd (and `keep_result` writes
megabytes), so trio code calls it through `trio.to_thread.run_sync`, never on the trio thread.

The schema evolves by ordered forward migrations (`_MIGRATIONS`, applied on open by
`sogni_protocol.migrations`); a journal written by a newer node is refused, never rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec

from sogni_protocol import eip712
from sogni_protocol.atomic import fsync_dir
from sogni_protocol.image_types import EXTENSIONS, extension_of
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import NO_TRAJECTORY, JobOffer, Receipt, RenderMeta
from sogni_protocol.migrations import Migration, SchemaTooNew, migrate

__all__ = [
    "INLINE_MAX",
    "SCHEMA_VERSION",
    "SYNC_INTERVAL",
    "Journal",
    "JournalError",
    "JournalReceipt",
    "StoredResult",
    "storage_fault",
]

log = get_logger(__name__)

INLINE_MAX = 256 * 1024
"""Bytes up to which a kept image is a row of the journal (`kept_images`), not a file: in
SQLite a blob this small reads and writes faster than a file, and it commits with its receipt."""

SYNC_INTERVAL = 1.0
"""Seconds within which the daemon makes commits without a fsync durable (`Journal.sync`)."""

_KEPT_EXTENSIONS = (*dict.fromkeys(EXTENSIONS.values()), "bin")
"""Every extension `extension_of` gives a kept image: its possible file names, no listing."""

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
    Migration(
        3,
        "receipts carry the tier's price factor (EIP-712 version '2'); earlier ones were at "
        "full price",
        "ALTER TABLE receipts ADD COLUMN price_factor_bps INTEGER NOT NULL DEFAULT 10000",
    ),
    Migration(
        4,
        "receipts carry the trajectory root (EIP-712 version '3'); earlier ones had none",
        "ALTER TABLE receipts ADD COLUMN trajectory_root BLOB",
    ),
    Migration(
        5,
        "receipts carry where their rewards go (EIP-712 version '4'); NULL: the worker",
        "ALTER TABLE receipts ADD COLUMN payout TEXT",
    ),
    Migration(
        6,
        "kept images up to INLINE_MAX bytes live in the journal, committed with their receipt "
        "(one fsync per result instead of three); larger ones stay files",
        "CREATE TABLE kept_images (job_id BLOB PRIMARY KEY, image BLOB NOT NULL)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_RECEIPT_COLUMNS = (
    "job_id, offer_hash, worker, coordinator, model_id, result_hash, steps_done, work_units,"
    " completed_at, signature, image_sha256, chain_id, verifying_contract, meta_json,"
    " recorded_at, accepted, ack_reason, acked_at, domain_version, price_factor_bps,"
    " trajectory_root, payout"
)


_EMPTY_SHA256 = hashlib.sha256(b"").digest()


class JournalError(Exception):
    """The journal cannot be opened or read, or refuses a write that would contradict it.
    `todo`: what the operator can do about it (the CLI prints it after the message)."""

    def __init__(self, message: str, todo: str | None = None) -> None:
        super().__init__(message)
        self.todo = todo


DAMAGED_TODO = (
    "stop the node, then restore the journal from a backup copy, or move it aside "
    "(e.g. `mv journal.db journal.db.damaged`, with its -wal and -shm files) and start again "
    "with a new one; the receipts in the damaged one are then missing from `sogni-node "
    "rewards` audits"
)
"""What to do about a damaged journal (the node's words, not the coordinator's)."""

_BUGS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
"""sqlite3 errors that are this code's mistakes, never the disk's."""

_OS_FAULTS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "I/O error",
}
_SQLITE_FAULTS = (
    ("full", "disk full"),
    ("readonly", "read-only"),
    ("read-only", "read-only"),
    ("i/o", "I/O error"),
    ("locked", "locked by another process"),
    ("busy", "locked by another process"),
    ("unable to open", "cannot open the file"),
    ("malformed", "damaged"),
    ("not a database", "damaged"),
)


def storage_fault(exc: BaseException) -> str | None:
    """The kind of storage fault `exc` is, in a few fixed words and its type (`disk full
    (OperationalError)`), never its own text; None when it is not one (a bug, a refusal)."""
    if isinstance(exc, OSError):
        kind = _OS_FAULTS.get(exc.errno or 0, "OS error")
    elif isinstance(exc, sqlite3.Error) and not isinstance(exc, _BUGS):
        low = str(exc).lower()
        kind = next((k for words, k in _SQLITE_FAULTS if words in low), "database error")
    else:
        return None
    return f"{kind} ({type(exc).__name__})"


def _todo_for(fault: str) -> str:
    if fault.startswith("damaged"):
        return DAMAGED_TODO
    if fault.startswith(("disk full", "disk quota")):
        return "free space on the disk of the node's data_dir"
    if fault.startswith("locked"):
        return "another process holds the journal (a `sqlite3` session, a backup): end it"
    return "check the disk and the owner and permissions of the node's data_dir and its files"


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _writes(
    method: Callable[Concatenate[Journal, _P], _T],
) -> Callable[Concatenate[Journal, _P], _T]:
    """A write: a storage fault it meets marks the journal not writable (`write_fault`)
    until `probe_write` succeeds; the error is raised as it was."""

    @functools.wraps(method)
    def wrapper(self: Journal, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (OSError, sqlite3.Error) as exc:
            self._write_failed(exc)
            raise

    return wrapper


def _reads(
    method: Callable[Concatenate[Journal, _P], _T],
) -> Callable[Concatenate[Journal, _P], _T]:
    """A read: a storage fault it meets is a `JournalError` in the node's words."""

    @functools.wraps(method)
    def wrapper(self: Journal, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            raise JournalError(
                f"cannot read the journal {self.path}: {fault}", _todo_for(fault)
            ) from None

    return wrapper


PROBE_BYTES = INLINE_MAX
"""What `probe_write` writes, twice (a journal row and a file): a kept image's worth."""
_PROBE_ID = b"sogni-node write probe"
"""The probe's `kept_images` key: never a job id (those are 32 bytes)."""
_PROBE_FILE = ".write-probe"


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


@dataclass(frozen=True)
class StoredResult:
    """A journalled receipt and the image it names, as kept until the coordinator's ack."""

    entry: JournalReceipt
    image: bytes | None
    """The exact bytes the receipt's `resultHash` names (b"" for a partial receipt); None when
    the file is missing or no longer matches the hash (it cannot be sent again)."""


def _private(path: Path, *, create: bool = True) -> None:
    """`path` readable by its owner only (0600): created so before SQLite opens it (its -wal
    and -shm files then get the same mode), or tightened when an older node left it 0644."""
    try:
        if create:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        pass
    except OSError:  # not ours to change (a read-only copy): SQLite says what it can't do
        pass


class Journal:
    """One node's SQLite journal. Use as a context manager, or call `close()`.

    `check`: run `PRAGMA quick_check` when opening (a damaged journal is a `JournalError`)."""

    def __init__(
        self,
        path: Path,
        results_dir: Path | None = None,
        *,
        inline_max: int = INLINE_MAX,
        check: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        self.inline_max = inline_max
        """Kept images up to this many bytes are journal rows; larger ones files."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results_dir = (
            Path(results_dir).expanduser() if results_dir else self.path.parent / "results"
        )
        self._lock = threading.Lock()
        self.unsynced = 0
        """Commits made without a fsync since the last fsync'd one (`sync` makes them durable)."""
        self.write_fault: str | None = None
        """Why the last write failed (`storage_fault`), until `probe_write` succeeds: while
        set, the node takes no job (it could not record it)."""
        _private(self.path)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            if check:
                self._check()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            fault = storage_fault(exc) or type(exc).__name__
            raise JournalError(
                f"cannot open the journal {self.path}: {fault}", _todo_for(fault)
            ) from None
        for suffix in ("-wal", "-shm"):  # SQLite gives them the journal's mode; older ones
            _private(Path(f"{self.path}{suffix}"), create=False)

    def _check(self) -> None:
        """`PRAGMA quick_check` (every page and index, not their agreement: seconds for a
        journal of gigabytes): a damaged journal is refused in one line, before anything is
        written to it."""
        rows = self._db.execute("PRAGMA quick_check(3)").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            raise JournalError(
                f"the journal {self.path} is damaged (SQLite quick_check: {problems[0][:200]})",
                DAMAGED_TODO,
            )

    @property
    def writable(self) -> bool:
        """False since a write met a storage fault, until `probe_write` succeeds."""
        return self.write_fault is None

    def _write_failed(self, exc: BaseException) -> None:
        fault = storage_fault(exc)
        if fault is None:
            return
        if self.write_fault is None:
            log.error(
                "journal_not_writable",
                reason=fault,
                path=str(self.path),
                hint="the node takes no jobs until its journal can be written again",
            )
        self.write_fault = fault

    def probe_write(self, size: int = PROBE_BYTES) -> bool:
        """Write what a kept image takes, a journal row and a file in the results folder
        (both fsync'd), and remove them: True (and `write_fault` cleared) when that worked.
        Blocking: call it off the event loop."""
        try:
            with self._lock:
                with self._transaction():
                    self._db.execute(
                        "INSERT OR REPLACE INTO kept_images (job_id, image)"
                        " VALUES (?, zeroblob(?))",
                        (_PROBE_ID, size),
                    )
                self._db.execute("DELETE FROM kept_images WHERE job_id = ?", (_PROBE_ID,))
                path = self.results_dir / _PROBE_FILE
                try:
                    self._write_kept(path, bytes(size))
                finally:
                    with contextlib.suppress(OSError):
                        path.unlink()
        except (OSError, sqlite3.Error) as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            self.write_fault = fault
            return False
        if self.write_fault is not None:
            log.info("journal_writable_again", was=self.write_fault)
        self.write_fault = None
        return True

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
        self.sync()
        with self._lock:
            self._db.close()

    @_writes
    def sync(self) -> bool:
        """Make every commit so far durable: fsync the WAL if a commit since the last fsync'd
        one had none of its own. False if there was nothing to do. Blocking (a fsync)."""
        with self._lock:
            if not self.unsynced:
                return False
            try:
                fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # checkpointed and removed: its pages are in the file
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # the file's pages, whichever descriptor wrote them
            finally:
                os.close(fd)
            self.unsynced = 0
            return True

    def _lazy(self, sql: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        """Under the lock: one statement, committed without a fsync of its own (durable with
        the next fsync'd commit or `sync`; the module's docstring says when that is enough)."""
        with self._without_fsync():
            return self._db.execute(sql, args)

    @contextlib.contextmanager
    def _without_fsync(self) -> Iterator[None]:
        """Under the lock: what commits inside is not fsync'd on its own (see `_lazy`)."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")
        self.unsynced += 1

    def _durable(self, sql: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        """Under the lock: one statement, its commit fsync'd (and with it every earlier one)."""
        cur = self._db.execute(sql, args)
        self.unsynced = 0
        return cur

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
    @_writes
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
        row = (
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
        )
        with self._lock:
            self._insert_offer(row)

    def _insert_offer(self, row: tuple[object, ...]) -> None:
        """Under the lock: upsert an offer row; a re-offer clears an earlier hand-back."""
        self._lazy(
            "INSERT INTO offers (job_id, coordinator, model_id, offer_hash, params_hash,"
            " work_units, deadline, offer_json, offer_signature, offered_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (job_id) DO UPDATE SET coordinator = excluded.coordinator,"
            " model_id = excluded.model_id, offer_hash = excluded.offer_hash,"
            " params_hash = excluded.params_hash, work_units = excluded.work_units,"
            " deadline = excluded.deadline, offer_json = excluded.offer_json,"
            " offer_signature = excluded.offer_signature, offered_at = excluded.offered_at,"
            " handed_back_at = NULL, steps_done = NULL, hand_back_reason = NULL",
            row,
        )

    @_writes
    def record_signed_offer(self, offer: JobOffer, offer_hash: bytes, signature: bytes) -> None:
        """`record_offer` from the `JobOffer` record itself, keeping the coordinator's signature
        (the node's evidence that the work was offered)."""
        with self._lock:
            self._insert_offer(_offer_row(offer, offer_hash, signature))

    @_writes
    def take_offer(
        self, offer: JobOffer, offer_hash: bytes, signature: bytes
    ) -> StoredResult | None:
        """A new offer in one call (one thread hop for the node): the kept result that answers
        it if the job has a receipt here not refused (the offer is then not recorded: the
        caller resends or declines); else the offer is recorded (`record_signed_offer`) and
        the answer is None."""
        with self._lock:
            kept = self._stored_result(offer.job_id)
            if kept is not None and kept.entry.accepted is not False:
                return kept
            self._insert_offer(_offer_row(offer, offer_hash, signature))
            return None

    @_writes
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
        Recording the same receipt twice is a no-op; a different receipt for a job that
        already has one is a `JournalError` (a node never signs two results for one job),
        unless the coordinator refused the first (`accepted = 0`): that one is worth nothing,
        and the new receipt replaces it.
        """
        row = _receipt_row(
            receipt, signature, image_sha256, chain_id, verifying_contract, meta, domain_version
        )
        with self._lock:
            self._insert_receipt(receipt.job_id, row, signature)

    def _insert_receipt(self, job_id: bytes, row: tuple[object, ...], signature: bytes) -> None:
        """Insert under the lock: a no-op for the same signature, a replacement for a
        refused receipt, `JournalError` for any other receipt of the same job."""
        if not self._may_record(job_id, signature):
            return
        self._durable(
            "INSERT OR REPLACE INTO receipts (job_id, offer_hash, worker, coordinator,"
            " model_id, result_hash, steps_done, work_units, completed_at, signature,"
            " image_sha256, chain_id, verifying_contract, meta_json, recorded_at,"
            " domain_version, price_factor_bps, trajectory_root, payout)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    def _may_record(self, job_id: bytes, signature: bytes) -> bool:
        """False: this very receipt is already recorded; raises if another one stands."""
        existing = self._db.execute(
            "SELECT signature, accepted FROM receipts WHERE job_id = ?", (job_id,)
        ).fetchone()
        if existing is None or existing[1] == 0:
            return True
        if bytes(existing[0]) == bytes(signature):
            return False
        raise JournalError(f"job 0x{job_id.hex()} already has a different receipt")

    @_writes
    def keep_result(
        self,
        receipt: Receipt,
        signature: bytes,
        image: bytes,
        *,
        meta: RenderMeta | None = None,
        chain_id: int | None = None,
        verifying_contract: str | None = None,
    ) -> None:
        """Keep the image and journal its receipt, durably (fsync'd); both stay until
        `mark_acked`. An image up to `inline_max` bytes is a journal row committed with the
        receipt (one fsync); a larger one a file, fsync'd with its folder before the receipt
        commits. Checks first, so a refused write never replaces a kept image."""
        if hashlib.sha256(image).digest() != receipt.result_hash:
            raise JournalError(f"job 0x{receipt.job_id.hex()}: resultHash is not the image's")
        row = _receipt_row(receipt, signature, None, chain_id, verifying_contract, meta, None)
        job_id = bytes(receipt.job_id)
        with self._lock:
            if not self._may_record(job_id, signature):
                return
            if image and len(image) <= self.inline_max:
                with self._transaction():
                    self._db.execute(
                        "INSERT OR REPLACE INTO kept_images (job_id, image) VALUES (?, ?)",
                        (job_id, image),
                    )
                    self._insert_receipt(job_id, row, signature)
                return
            if image:  # a partial receipt has none
                extension = extension_of(image)
                self._drop_files(job_id, keep=extension)
                self._write_kept(self.results_dir / f"{job_id.hex()}.{extension}", image)
            self._insert_receipt(job_id, row, signature)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Under the lock: one transaction (its commit fsync'd unless inside `_without_fsync`)."""
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already
                self._db.execute("ROLLBACK")
            raise

    def _write_kept(self, path: Path, image: bytes) -> None:
        """Write `image` in place and fsync it and its folder (see the module's docstring for
        why no temporary file and rename: until its receipt commits no one reads it)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the folder is made on first use (or was removed)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover file keeps its mode through O_TRUNC
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    @_writes
    def resign(
        self,
        job_id: bytes,
        offer_hash: bytes,
        signature: bytes,
        *,
        payout: str | None = None,
        domain_version: str = eip712.DOMAIN_VERSION,
    ) -> bool:
        """Point an unacked receipt at a new offer (a coordinator that restarted forgot the
        old one). The image and its hash stay, so the node never signs two different images
        for one job; what the new signature covers besides the offer hash (the payout, the
        EIP-712 version it was signed under) is recorded with it, or the journalled receipt
        would no longer verify. False if no unacked receipt."""
        with self._lock:
            cur = self._durable(
                "UPDATE receipts SET offer_hash = ?, signature = ?, recorded_at = ?,"
                " payout = ?, domain_version = ? WHERE job_id = ? AND accepted IS NULL",
                (
                    bytes(offer_hash),
                    bytes(signature),
                    time.time(),
                    payout,
                    domain_version,
                    bytes(job_id),
                ),
            )
            return cur.rowcount > 0

    @_reads
    def stored_result(self, job_id: bytes) -> StoredResult | None:
        """The journalled receipt for `job_id` and its kept image; None if it has no receipt."""
        with self._lock:
            return self._stored_result(job_id)

    def _stored_result(self, job_id: bytes) -> StoredResult | None:
        row = self._db.execute(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE job_id = ?", (bytes(job_id),)
        ).fetchone()
        if row is None:
            return None
        entry = _receipt_from_row(row)
        if entry.receipt.result_hash == _EMPTY_SHA256:
            return StoredResult(entry, b"")
        inline = self._db.execute(
            "SELECT image FROM kept_images WHERE job_id = ?", (bytes(job_id),)
        ).fetchone()
        if inline is not None and hashlib.sha256(inline[0]).digest() == entry.receipt.result_hash:
            return StoredResult(entry, bytes(inline[0]))
        for path in self._files(job_id):
            try:
                image = path.read_bytes()
            except OSError:
                continue
            if hashlib.sha256(image).digest() == entry.receipt.result_hash:
                return StoredResult(entry, image)
        return StoredResult(entry, None)

    def prune_results(self, max_age: float, *, unknown_after: float = 0.0) -> int:
        """Delete kept images no ack will delete: those of acked or unknown jobs (a crash
        between file and receipt) and those unacked for more than `max_age` seconds (the
        coordinator gave the job to another node, or the ack was lost with the stream).
        Returns how many images went. `unknown_after`: a file is deleted only once it is
        that many seconds old (while the node runs, a render's file is written before its
        receipt commits, and may commit after `keep` was read)."""
        recent = "SELECT job_id FROM receipts WHERE accepted IS NULL AND recorded_at >= ?"
        since = time.time() - max_age
        with self._lock:
            keep = {bytes(job_id).hex() for (job_id,) in self._db.execute(recent, (since,))}
            with self._without_fsync():  # losing the delete loses nothing
                gone = self._db.execute(
                    f"DELETE FROM kept_images WHERE job_id NOT IN ({recent})", (since,)
                ).rowcount
        young = time.time() - unknown_after
        for path in self._kept_files():
            if path.stem in keep:
                continue
            try:
                if path.stat().st_mtime > young:
                    continue  # its receipt may be committing now, after `keep` was read
                path.unlink()
            except OSError:
                continue
            gone += 1
        return gone

    @_reads
    def kept_results(self) -> set[bytes]:
        """The job ids with a kept image (a journal row or a file): what `mark_acked` or
        `prune_results` will delete."""
        with self._lock:
            rows = {bytes(r[0]) for r in self._db.execute("SELECT job_id FROM kept_images")}
        for path in self._kept_files():
            with contextlib.suppress(ValueError):
                rows.add(bytes.fromhex(path.stem))
        return rows

    def _kept_files(self) -> list[Path]:
        """Every image file in the results folder (a listing: `prune_results` and
        `kept_results` only, never per job)."""
        if not self.results_dir.is_dir():
            return []
        return [p for p in self.results_dir.iterdir() if p.is_file() and not p.name.startswith(".")]

    def _files(self, job_id: bytes) -> list[Path]:
        """The names a kept image of `job_id` can have (no folder listing: a glob lists the
        whole folder, and this runs twice per job)."""
        stem = bytes(job_id).hex()
        return [self.results_dir / f"{stem}.{ext}" for ext in _KEPT_EXTENSIONS]

    def _drop_files(self, job_id: bytes, *, keep: str = "") -> None:
        """Delete `job_id`'s kept images (but the one with extension `keep`, about to be
        overwritten)."""
        for path in self._files(job_id):
            if path.suffix[1:] != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def mark_acked(self, job_id: bytes, accepted: bool, reason: str = "") -> bool:
        """Record the coordinator's `ResultAck` and delete the kept image (accepted: the
        coordinator has it; refused: it is worth nothing). False if `job_id` has no receipt.
        Committed without a fsync of its own (durable within `SYNC_INTERVAL`; see above)."""
        return self.mark_acked_many([(job_id, accepted, reason)]) == 1

    @_writes
    def mark_acked_many(self, acks: Sequence[tuple[bytes, bool, str]]) -> int:
        """`mark_acked` for several `(job id, accepted, reason)` in one commit (a session
        journals the acks that arrived while it wrote the last batch together); returns how
        many named a receipt."""
        now = time.time()
        found = 0
        files = []  # jobs whose image was not a journal row: maybe a file
        with self._lock:
            with self._without_fsync(), self._transaction():
                for job_id, accepted, reason in acks:
                    cur = self._db.execute(
                        "UPDATE receipts SET accepted = ?, ack_reason = ?, acked_at = ?"
                        " WHERE job_id = ?",
                        (int(accepted), reason, now, job_id),
                    )
                    found += cur.rowcount
                    cur = self._db.execute("DELETE FROM kept_images WHERE job_id = ?", (job_id,))
                    if cur.rowcount == 0:
                        files.append(job_id)
            for job_id in files:
                self._drop_files(job_id)
        return found

    @_writes
    def void(self, job_id: bytes, reason: str) -> bool:
        """Mark an unacked receipt refused (it is re-signed for another coordinator key, and
        no ack will come for it) and drop its image; False, and nothing changed, when an ack
        was journaled meanwhile (an acceptance is never overwritten)."""
        with self._lock:
            with self._without_fsync(), self._transaction():
                cur = self._db.execute(
                    "UPDATE receipts SET accepted = 0, ack_reason = ?, acked_at = ?"
                    " WHERE job_id = ? AND accepted IS NULL",
                    (reason, time.time(), job_id),
                )
                if cur.rowcount == 0:
                    return False
                inline = self._db.execute("DELETE FROM kept_images WHERE job_id = ?", (job_id,))
            if inline.rowcount == 0:
                self._drop_files(job_id)
        return True

    @_writes
    def mark_handed_back(self, job_id: bytes, steps_done: int, reason: str) -> bool:
        """Record that the job went back unfinished; False if its offer was never recorded."""
        with self._lock:
            cur = self._durable(
                "UPDATE offers SET handed_back_at = ?, steps_done = ?, hand_back_reason = ?"
                " WHERE job_id = ?",
                (time.time(), steps_done, reason, job_id),
            )
            return cur.rowcount > 0

    # --- reads ----------------------------------------------------------------------------
    @_reads
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

    @_reads
    def render_times(self, since: float) -> list[tuple[str, float, int]]:
        """`(model id, seconds from offer to receipt, work units)` of each receipt recorded at
        or after `since` that the coordinator did not refuse (`sogni-node status`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.model_id, r.recorded_at - o.offered_at, r.work_units"
                " FROM receipts r JOIN offers o ON o.job_id = r.job_id"
                " WHERE r.recorded_at >= ? AND coalesce(r.accepted, 1) = 1"
                " ORDER BY r.recorded_at",
                (since,),
            ).fetchall()
        return [(str(m), max(0.0, float(t)), int(u)) for m, t, u in rows]

    @_reads
    def unacked(self, since: float = 0.0) -> list[JournalReceipt]:
        """Receipts with no `ResultAck` yet (the result may not have reached the coordinator),
        recorded at or after `since` (unix seconds)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE accepted IS NULL"
                " AND recorded_at >= ? ORDER BY recorded_at",
                (since,),
            ).fetchall()
        return [_receipt_from_row(r) for r in rows]

    @_reads
    def offer(self, job_id: bytes) -> JobOffer | None:
        """The journalled `JobOffer` for `job_id`, if one was recorded with its JSON."""
        with self._lock:
            row = self._db.execute(
                "SELECT offer_json FROM offers WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None or not row[0]:
            return None
        return msgspec.json.decode(row[0], type=JobOffer)

    @_reads
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


def _offer_row(offer: JobOffer, offer_hash: bytes, signature: bytes) -> tuple[object, ...]:
    """An `offers` row for a signed `JobOffer` (its JSON has no prompt field)."""
    return (
        bytes(offer.job_id),
        offer.coordinator,
        offer.model_id,
        bytes(offer_hash),
        bytes(offer.params_hash),
        offer.work_units,
        offer.deadline,
        msgspec.json.encode(offer).decode(),
        bytes(signature),
        time.time(),
    )


def _receipt_row(
    receipt: Receipt,
    signature: bytes,
    image_sha256: bytes | None,
    chain_id: int | None,
    verifying_contract: str | None,
    meta: RenderMeta | None,
    domain_version: str | None,
) -> tuple[object, ...]:
    return (
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
        receipt.price_factor_bps,
        receipt.trajectory_root,
        receipt.payout,
    )


def _receipt_from_row(r: tuple[Any, ...]) -> JournalReceipt:
    (job_id, offer_hash, worker, coordinator, model_id, result_hash, steps_done, work_units,
     completed_at, signature, image_sha256, chain_id, verifying_contract, meta_json,
     recorded_at, accepted, ack_reason, _acked_at, domain_version,
     price_factor_bps, trajectory_root, payout) = r  # fmt: skip
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
        price_factor_bps=int(price_factor_bps),
        trajectory_root=bytes(trajectory_root) if trajectory_root else NO_TRAJECTORY,
        payout=str(payout) if payout else None,
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
