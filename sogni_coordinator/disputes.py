"""The coordinator's side of disputes (contracts/src/Disputes.sol, docs/GOVERNANCE.md).

Why here: a refusal is only disputable if the coordinator signed it, the jurors can only judge
what the coordinator publishes, and a won dispute only matters if the coordinator pays it.

- `Reporter.refused` (the dispatcher's `check_failed` hook): signs the refusal with the
  coordinator's reporter key (EIP-191 over `Disputes.refusalDigest`: case id, worker, evidence
  hash, time; no gas) and keeps it, with what a re-check and a re-credit need, in `DisputeBook`
  (its own database component). `sogni-node dispute open JOB` fetches it (or reads the node's
  journal) and sends it on chain with the bond.
- `DisputeDesk.poll`: reads the contract's events. A dispute opened on one of this
  coordinator's refusals schedules `rechecks` more re-runs of every challenged step on nodes of
  other wallets (none of them the worker's, its payee's, or a verifier already heard; they are
  not told whose job it is: the same `VerifyStep` as any check), writes the evidence bundle
  (`disputes/<case>.json` under the publish dir: the original verdict, every re-check, no
  prompt, verifiers named v1, v2, ...) and opens the vote with its keccak256. A dispute
  resolved for the worker takes back the strikes of its jobs (`DisputeDesk.apply_pardons`,
  `Reputation.pardon_strikes`: a refusal's job, or every failed job a won slash named; each
  job once, recorded in `dispute_pardons`) and a refusal queues a restoration that the next
  epoch pays (`Restorations.add_to`). Each case is handled on its own: one whose step fails
  is logged and retried at the next poll, the others go on.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
from eth_hash.auto import keccak

from sogni_coordinator import prompt_crypto
from sogni_coordinator.db import Database
from sogni_coordinator.evidence import decode_evidence
from sogni_protocol import epoch_math
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.epoch_files import Restoration
from sogni_protocol.messages import JobParams, Receipt, StepOpeningWire

if TYPE_CHECKING:
    from sogni_chain.disputes import Disputes
    from sogni_coordinator.jobs import NodeLink
    from sogni_coordinator.reputation import Reputation
    from sogni_coordinator.store import Store
    from sogni_coordinator.verifiers import PendingVerifications
    from sogni_protocol.payout_rules import PayoutRules

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_RECHECKS",
    "DisputeBook",
    "DisputeDesk",
    "RefusalRecord",
    "Reporter",
    "Restorations",
    "SlashCase",
    "case_id_of",
    "evidence_hash_of",
    "slash_evidence_hash",
]

log = structlog.get_logger(__name__)

PROPOSAL_KEEP = 14 * 86_400.0
"""Seconds an open slash proposal (not sent on chain) keeps its jobs' sealed parameters for a
re-check: an operator who never acts on it must not keep prompts for ever (dismissing it
releases them at once)."""

BUNDLE_FORMAT = "sogni-dispute-bundle-v1"
DEFAULT_RECHECKS = 3
"""Re-runs of each challenged step per dispute, each on another wallet's node."""

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS dispute_refusals (
    job_id        BLOB NOT NULL,
    case_id       BLOB PRIMARY KEY,
    worker        TEXT NOT NULL,
    payee         TEXT NOT NULL,
    receipt       BLOB NOT NULL,
    params        BLOB NOT NULL,
    dtype         TEXT NOT NULL,
    reason        TEXT NOT NULL,
    evidence_hash BLOB NOT NULL,
    refused_at    INTEGER NOT NULL,
    signature     BLOB NOT NULL,
    bundle_hash   BLOB,
    bundle_path   TEXT,
    outcome       TEXT
);
CREATE INDEX IF NOT EXISTS dispute_refusals_job ON dispute_refusals(job_id);
CREATE TABLE IF NOT EXISTS dispute_restorations (
    case_id       BLOB PRIMARY KEY,
    job_id        BLOB NOT NULL,
    payee         TEXT NOT NULL,
    model_id      TEXT NOT NULL,
    micro_spark   INTEGER NOT NULL,
    epoch         INTEGER,
    amount        TEXT
);
CREATE TABLE IF NOT EXISTS dispute_cursor (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    next_block    INTEGER NOT NULL
);
"""
# A restoration is first *planned* into an epoch (before that epoch's plan is saved), and only
# marked paid (`epoch`, `amount`) once that epoch is posted: a plan that was never saved puts
# it back in the next plan, a posted one pays it exactly once (Restorations).
_SCHEMA_V2 = """
ALTER TABLE dispute_restorations ADD COLUMN planned_epoch INTEGER;
ALTER TABLE dispute_restorations ADD COLUMN planned_amount TEXT;
"""
# A refusal's job parameters (the prompt too: a dispute's re-checks re-run its steps) are
# sealed with a key of their own (`prompt_crypto`, the case id as associated data), and the
# key is shredded (`params` emptied) once no re-check can need them: the vote opened, the
# case resolved, or the dispute window closed undisputed. Rows written before this held the
# parameters in plain text, forever; `DisputeBook` seals them when it opens.
_SCHEMA_V3 = """
ALTER TABLE dispute_refusals ADD COLUMN params_key BLOB;
"""
# What billing would have charged for the refused receipt, in paid micro-Spark (free Spark
# counts nothing, a request with no payer nothing at all): a won dispute restores the
# worker's share of that, as an epoch would have paid it. NULL (older rows): the list price.
_SCHEMA_V4 = """
ALTER TABLE dispute_refusals ADD COLUMN charge INTEGER;
"""
# This coordinator's slash cases on Disputes (proposed by its settlement key from a
# `slash_proposals` row: the case's evidence hash is keccak of the proposal's failed job ids),
# followed like refusals: the desk publishes the bundle and opens the vote when the worker
# disputes, then resolves and executes what is due. `vote_by` once disputed (the vote must be
# open by then, or the case is upheld); `outcome`: 'worker won', 'slash upheld', 'executed',
# 'expired'; `finished` once nothing is left to send for it.
_SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS dispute_slashes (
    case_id       BLOB PRIMARY KEY,
    proposal_id   INTEGER NOT NULL,
    worker        TEXT NOT NULL,
    job_ids       BLOB NOT NULL,
    evidence_hash BLOB NOT NULL,
    amount        TEXT NOT NULL,
    reason        TEXT NOT NULL,
    vote_by       INTEGER,
    bundle_hash   BLOB,
    bundle_path   TEXT,
    outcome       TEXT,
    finished      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dispute_slashes_open ON dispute_slashes(finished);
"""
# A won dispute takes back exactly the strikes of its jobs, once, across restarts:
# `struck_at` is when the refused job struck the worker (`Reputation.strike`'s clock, told by
# its `on_strike`; NULL: not known), `dispute_pardons` the jobs whose strike a won dispute
# (refusal or slash) took back (a job is pardoned once, whichever case wins first), and
# `pardoned` marks a won case whose pardon is applied (a crash in between: applied at the
# next poll). Refusals won before this were pardoned when they were resolved.
_SCHEMA_V6 = """
ALTER TABLE dispute_refusals ADD COLUMN struck_at REAL;
ALTER TABLE dispute_refusals ADD COLUMN pardoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dispute_slashes ADD COLUMN pardoned INTEGER NOT NULL DEFAULT 0;
UPDATE dispute_refusals SET pardoned=1 WHERE outcome IS NOT NULL;
CREATE TABLE IF NOT EXISTS dispute_pardons (
    worker        TEXT NOT NULL,
    job_id        BLOB NOT NULL,
    case_id       BLOB NOT NULL,
    pardoned_at   INTEGER NOT NULL,
    PRIMARY KEY (worker, job_id)
);
"""


def evidence_hash_of(evidence: bytes | None, reason: str) -> bytes:
    """What the signed refusal commits to: the stored evidence (else the reason)."""
    return keccak(evidence if evidence else reason.encode())


def case_id_of(disputes: str, job_id: bytes, worker: str) -> bytes:
    """One case per (contract, job, worker): a job refused twice, for two workers, is two."""
    return keccak(
        b"sogni-refusal-case" + bytes.fromhex(disputes[2:]) + job_id + bytes.fromhex(worker[2:])
    )


@dataclass(frozen=True)
class SlashCase:
    """One of this coordinator's slash cases on Disputes (`dispute_slashes`)."""

    case_id: bytes
    proposal_id: int
    worker: str
    job_ids: list[bytes]
    evidence_hash: bytes
    amount: int
    reason: str
    vote_by: int | None = None
    bundle_hash: bytes | None = None
    bundle_path: str | None = None
    outcome: str | None = None
    finished: bool = False


_SLASH_COLS = (
    "case_id, proposal_id, worker, job_ids, evidence_hash, amount, reason, vote_by,"
    " bundle_hash, bundle_path, outcome, finished"
)


def _slash_case(row: tuple[Any, ...]) -> SlashCase:
    return SlashCase(
        bytes(row[0]),
        int(row[1]),
        str(row[2]),
        msgspec.msgpack.decode(row[3], type=list[bytes]),
        bytes(row[4]),
        int(row[5]),
        str(row[6]),
        None if row[7] is None else int(row[7]),
        None if row[8] is None else bytes(row[8]),
        row[9],
        row[10],
        bool(row[11]),
    )


def slash_evidence_hash(job_ids: list[bytes]) -> bytes:
    """What `slash propose-tx` puts on chain as a slash's evidence: keccak of its job ids."""
    return keccak(b"".join(job_ids))


@dataclass(frozen=True)
class RefusalRecord:
    job_id: bytes
    case_id: bytes
    worker: str
    payee: str
    receipt: Receipt
    params: JobParams | None
    """None once shredded (see `_SCHEMA_V3`): no re-check can run, the vote goes on the
    original evidence."""
    dtype: str
    reason: str
    evidence_hash: bytes
    refused_at: int
    signature: bytes
    bundle_hash: bytes | None = None
    bundle_path: str | None = None
    outcome: str | None = None
    charge: int | None = None
    """Paid micro-Spark billing would have charged (`_SCHEMA_V4`); None: the list price."""

    def as_json(self) -> dict[str, Any]:
        """What a worker needs to dispute it (`sogni_chain.disputes.Refusal.from_json`)."""
        return {
            "jobId": "0x" + self.job_id.hex(),
            "caseId": "0x" + self.case_id.hex(),
            "worker": self.worker,
            "evidenceHash": "0x" + self.evidence_hash.hex(),
            "refusedAt": self.refused_at,
            "signature": "0x" + self.signature.hex(),
            "reason": self.reason,
            "outcome": self.outcome,
        }


_COLS = (
    "job_id, case_id, worker, payee, receipt, params, dtype, reason, evidence_hash, refused_at,"
    " signature, bundle_hash, bundle_path, outcome, params_key, charge"
)


def _record(row: tuple[Any, ...]) -> RefusalRecord:
    params = None
    if row[14] is not None:
        plain = prompt_crypto.unseal(bytes(row[14]), bytes(row[5]), bytes(row[1]))
        params = msgspec.msgpack.decode(plain, type=JobParams)
    return RefusalRecord(
        bytes(row[0]),
        bytes(row[1]),
        str(row[2]),
        str(row[3]),
        msgspec.msgpack.decode(row[4], type=Receipt),
        params,
        str(row[6]),
        str(row[7]),
        bytes(row[8]),
        int(row[9]),
        bytes(row[10]),
        None if row[11] is None else bytes(row[11]),
        row[12],
        row[13],
        None if row[15] is None else int(row[15]),
    )


class DisputeBook(Database):
    """Signed refusals, their bundles and outcomes, and restorations owed (component
    `disputes`, in the coordinator's database)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            path,
            component="disputes",
            migrations=[_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6],
        )
        self._seal_plain_rows()

    def _seal_plain_rows(self) -> None:
        """Rows written before `_SCHEMA_V3`: their plain parameters sealed now, or dropped
        where no re-check can need them any more (the vote opened, the case resolved)."""
        with self._tx() as db:
            db.execute(
                "UPDATE dispute_refusals SET params = ? WHERE params_key IS NULL"
                " AND length(params) > 0 AND (bundle_hash IS NOT NULL OR outcome IS NOT NULL)",
                (b"",),
            )
            rows = db.execute(
                "SELECT case_id, params FROM dispute_refusals"
                " WHERE params_key IS NULL AND length(params) > 0"
            ).fetchall()
            for case_id, params in rows:
                key = prompt_crypto.new_key()
                sealed = prompt_crypto.seal(key, bytes(params), bytes(case_id))
                db.execute(
                    "UPDATE dispute_refusals SET params=?, params_key=? WHERE case_id=?",
                    (sealed, key, bytes(case_id)),
                )

    def add(self, r: RefusalRecord) -> None:
        key = prompt_crypto.new_key() if r.params is not None else None
        sealed = b""
        if key is not None:
            sealed = prompt_crypto.seal(key, msgspec.msgpack.encode(r.params), r.case_id)
        with self._tx() as db:
            db.execute(
                f"INSERT INTO dispute_refusals ({_COLS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)"
                " ON CONFLICT (case_id) DO NOTHING",
                (
                    r.job_id,
                    r.case_id,
                    r.worker.lower(),
                    r.payee.lower(),
                    msgspec.msgpack.encode(r.receipt),
                    sealed,
                    r.dtype,
                    r.reason,
                    r.evidence_hash,
                    r.refused_at,
                    r.signature,
                    key,
                    r.charge,
                ),
            )

    def shred(
        self,
        case_id: bytes | None = None,
        *,
        undisputed_before: int | None = None,
        keep: Collection[tuple[str, bytes]] = (),
    ) -> int:
        """Forget the parameters (the prompt) of one case, or of every case refused before
        `undisputed_before` that was never disputed (no bundle) except those of `keep`
        ((worker, job id): named by a slash that may still be disputed). Returns how many
        were forgotten."""
        if case_id is not None:
            targets = [case_id]
        elif undisputed_before is not None:
            kept = {(w.lower(), bytes(j)) for w, j in keep}
            with self._lock:
                rows = self._db.execute(
                    "SELECT case_id, worker, job_id FROM dispute_refusals"
                    " WHERE params_key IS NOT NULL AND bundle_hash IS NULL AND refused_at < ?",
                    (undisputed_before,),
                ).fetchall()
            targets = [bytes(c) for c, w, j in rows if (str(w).lower(), bytes(j)) not in kept]
        else:
            raise ValueError("shred needs a case id or a time")
        done = 0
        with self._tx() as db:
            for target in targets:
                cur = db.execute(
                    "UPDATE dispute_refusals SET params=?, params_key=NULL"
                    " WHERE params_key IS NOT NULL AND case_id=?",
                    (b"", target),
                )
                done += int(cur.rowcount)
        return done

    def refusals(self, job_id: bytes | None = None) -> list[RefusalRecord]:
        where, args = ("WHERE job_id=?", (job_id,)) if job_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLS} FROM dispute_refusals {where} ORDER BY refused_at, case_id", args
            ).fetchall()
        return [_record(r) for r in rows]

    def by_case(self, case_id: bytes) -> RefusalRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLS} FROM dispute_refusals WHERE case_id=?", (case_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def set_bundle(self, case_id: bytes, bundle_hash: bytes, path: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE dispute_refusals SET bundle_hash=?, bundle_path=? WHERE case_id=?",
                (bundle_hash, path, case_id),
            )

    def settle(self, case_id: bytes, worker_won: bool) -> bool:
        """Record the outcome once; a won refusal owes a restoration. False if already set."""
        with self._tx() as db:
            done = db.execute(
                "UPDATE dispute_refusals SET outcome=? WHERE case_id=? AND outcome IS NULL",
                ("worker won" if worker_won else "refusal upheld", case_id),
            )
            if done.rowcount == 0:
                return False
            if worker_won:
                row = db.execute(
                    "SELECT job_id, payee, receipt, charge FROM dispute_refusals WHERE case_id=?",
                    (case_id,),
                ).fetchone()
                receipt = msgspec.msgpack.decode(row[2], type=Receipt)
                charge = row[3]
                if charge is None:  # refused before charges were recorded: the list price
                    charge = epoch_math.expected_charge(
                        receipt.work_units,
                        receipt.price_factor_bps,
                        receipt.steps_done,
                        receipt.steps_done,
                    )
                db.execute(
                    "INSERT INTO dispute_restorations"
                    " (case_id, job_id, payee, model_id, micro_spark) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (case_id) DO NOTHING",
                    (case_id, bytes(row[0]), str(row[1]), receipt.model_id, charge),
                )
            return True

    def due(self) -> list[tuple[bytes, str, str, int, int | None]]:
        """(case id, payee, model, micro-Spark, epoch planned into) of restorations no posted
        epoch paid yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT case_id, payee, model_id, micro_spark, planned_epoch"
                " FROM dispute_restorations WHERE epoch IS NULL ORDER BY case_id"
            ).fetchall()
        return [
            (bytes(c), str(p), str(m), int(s), None if e is None else int(e))
            for c, p, m, s, e in rows
        ]

    def plan(self, epoch: int, amounts: Mapping[bytes, int]) -> None:
        """Put restorations into `epoch`'s plan (before the plan is saved): not paid yet."""
        with self._tx() as db:
            for case_id, amount in amounts.items():
                db.execute(
                    "UPDATE dispute_restorations SET planned_epoch=?, planned_amount=?"
                    " WHERE case_id=? AND epoch IS NULL",
                    (epoch, str(amount), case_id),
                )

    def posted(self, epoch: int, paid: Collection[bytes] | None = None) -> int:
        """`epoch` is on chain: its planned restorations are paid (once), those its batch
        published (`paid` case ids) when known; one planned into it that the batch does not
        carry (another plan took that number) is owed again. Returns how many were paid."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT case_id FROM dispute_restorations WHERE planned_epoch=? AND epoch IS NULL",
                (epoch,),
            ).fetchall()
            done = 0
            for (case_id,) in rows:
                if paid is None or bytes(case_id) in paid:
                    db.execute(
                        "UPDATE dispute_restorations SET epoch=planned_epoch,"
                        " amount=planned_amount WHERE case_id=?",
                        (case_id,),
                    )
                    done += 1
                else:
                    db.execute(
                        "UPDATE dispute_restorations SET planned_epoch=NULL, planned_amount=NULL"
                        " WHERE case_id=?",
                        (case_id,),
                    )
            return done

    def restorations(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT case_id, job_id, payee, epoch, amount FROM dispute_restorations"
                " ORDER BY case_id"
            ).fetchall()
        return [
            {
                "caseId": "0x" + bytes(c).hex(),
                "jobId": "0x" + bytes(j).hex(),
                "payee": p,
                "epoch": e,
                "amount": a,
            }
            for c, j, p, e, a in rows
        ]

    # -- pardons: a won dispute takes back exactly the strikes of its jobs --

    def struck(self, worker: str, job_id: bytes, at: float) -> None:
        """`Reputation.on_strike`: the refused `job_id` struck `worker` at `at` (written with
        the next group of writes; the refusal row was written before the strike)."""
        self.submit("dispute strike", self._struck, worker.lower(), job_id, at)

    def _struck(self, worker: str, job_id: bytes, at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE dispute_refusals SET struck_at=? WHERE job_id=? AND worker=?",
                (at, job_id, worker),
            )

    def unpardoned_strikes(
        self, worker: str, job_ids: Collection[bytes]
    ) -> list[tuple[bytes, float | None]]:
        """(job id, when it struck; None: not known) of `worker`'s refused jobs among
        `job_ids` whose strike no won dispute took back yet. A refusal is signed for every
        check failure that strikes, so a failed job without one struck nothing here."""
        out: list[tuple[bytes, float | None]] = []
        w = worker.lower()
        with self._lock:
            for job_id in dict.fromkeys(bytes(j) for j in job_ids):
                row = self._db.execute(
                    "SELECT MIN(struck_at), COUNT(*) FROM dispute_refusals"
                    " WHERE worker=? AND job_id=?",
                    (w, job_id),
                ).fetchone()
                if row is None or int(row[1]) == 0:
                    continue
                done = self._db.execute(
                    "SELECT 1 FROM dispute_pardons WHERE worker=? AND job_id=?", (w, job_id)
                ).fetchone()
                if done is None:
                    out.append((job_id, None if row[0] is None else float(row[0])))
        return out

    def record_pardons(self, worker: str, job_ids: Collection[bytes], case_id: bytes) -> None:
        """`job_ids`' strikes were taken back for `case_id`, which is done."""
        w = worker.lower()
        with self._tx() as db:
            for job_id in job_ids:
                db.execute(
                    "INSERT INTO dispute_pardons (worker, job_id, case_id, pardoned_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (worker, job_id) DO NOTHING",
                    (w, job_id, case_id, int(time.time())),
                )
            db.execute("UPDATE dispute_refusals SET pardoned=1 WHERE case_id=?", (case_id,))
            db.execute("UPDATE dispute_slashes SET pardoned=1 WHERE case_id=?", (case_id,))

    def pardoned(self, worker: str, job_ids: Collection[bytes]) -> set[bytes]:
        """Those of `job_ids` whose strike against `worker` a won dispute took back: no
        evidence against it any more (a new slash proposal leaves them out)."""
        w = worker.lower()
        out: set[bytes] = set()
        with self._lock:
            for job_id in job_ids:
                row = self._db.execute(
                    "SELECT 1 FROM dispute_pardons WHERE worker=? AND job_id=?",
                    (w, bytes(job_id)),
                ).fetchone()
                if row is not None:
                    out.add(bytes(job_id))
        return out

    def won_unpardoned(self) -> list[tuple[bytes, str, list[bytes]]]:
        """(case id, worker, job ids) of cases the worker won whose pardon is not applied."""
        with self._lock:
            refusals = self._db.execute(
                "SELECT case_id, worker, job_id FROM dispute_refusals"
                " WHERE outcome='worker won' AND pardoned=0 ORDER BY refused_at, case_id"
            ).fetchall()
            slashes = self._db.execute(
                "SELECT case_id, worker, job_ids FROM dispute_slashes"
                " WHERE outcome='worker won' AND pardoned=0 ORDER BY proposal_id, case_id"
            ).fetchall()
        out = [(bytes(c), str(w), [bytes(j)]) for c, w, j in refusals]
        out += [
            (bytes(c), str(w), msgspec.msgpack.decode(j, type=list[bytes])) for c, w, j in slashes
        ]
        return out

    # -- slash cases --

    def add_slash(self, case: SlashCase) -> bool:
        """Follow a slash case (once); False if it was followed already."""
        with self._tx() as db:
            done = db.execute(
                f"INSERT INTO dispute_slashes ({_SLASH_COLS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, 0)"
                " ON CONFLICT (case_id) DO NOTHING",
                (
                    case.case_id,
                    case.proposal_id,
                    case.worker.lower(),
                    msgspec.msgpack.encode(case.job_ids),
                    case.evidence_hash,
                    str(case.amount),
                    case.reason,
                ),
            )
            return int(done.rowcount) == 1

    def slash_cases(
        self, *, open_only: bool = False, proposal_id: int | None = None
    ) -> list[SlashCase]:
        """Slash cases followed, oldest proposal first (unfinished ones / one proposal's)."""
        where: list[str] = []
        args: list[Any] = []
        if open_only:
            where.append("finished=0")
        if proposal_id is not None:
            where.append("proposal_id=?")
            args.append(proposal_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SLASH_COLS} FROM dispute_slashes {clause} ORDER BY proposal_id, case_id",
                tuple(args),
            ).fetchall()
        return [_slash_case(r) for r in rows]

    def slash_case(self, case_id: bytes) -> SlashCase | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SLASH_COLS} FROM dispute_slashes WHERE case_id=?", (case_id,)
            ).fetchone()
        return None if row is None else _slash_case(row)

    def update_slash(
        self,
        case_id: bytes,
        *,
        vote_by: int | None = None,
        bundle: tuple[bytes, str] | None = None,
        outcome: str | None = None,
        finished: bool | None = None,
    ) -> None:
        sets: list[str] = []
        args: list[Any] = []
        if vote_by is not None:
            sets.append("vote_by=?")
            args.append(vote_by)
        if bundle is not None:
            sets += ["bundle_hash=?", "bundle_path=?"]
            args += [bundle[0], bundle[1]]
        if outcome is not None:
            sets.append("outcome=?")
            args.append(outcome)
        if finished is not None:
            sets.append("finished=?")
            args.append(int(finished))
        if not sets:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE dispute_slashes SET {', '.join(sets)} WHERE case_id=?",
                (*args, case_id),
            )

    def next_block(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT next_block FROM dispute_cursor WHERE id=1").fetchone()
        return 0 if row is None else int(row[0])

    def set_next_block(self, block: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO dispute_cursor VALUES (1, ?) ON CONFLICT(id) DO UPDATE"
                " SET next_block=excluded.next_block",
                (block,),
            )


class Reporter:
    """Signs refusals with the coordinator's reporter key (REPORTER_ROLE on Disputes)."""

    def __init__(
        self,
        book: DisputeBook,
        key: bytes,
        *,
        chain_id: int,
        disputes: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book, self._key, self.chain_id, self.disputes = book, key, chain_id, disputes
        self._clock = clock

    def refused(
        self,
        receipt: Receipt,
        params: JobParams,
        dtype: str,
        reason: str,
        evidence: bytes | None,
        charge: int | None = None,
    ) -> RefusalRecord:
        """Sign and keep the refusal; `charge`: what billing would have charged for the
        receipt (`Ledger.paid_value_of`), what a won dispute restores the worker's share of."""
        from sogni_chain.disputes import sign_refusal

        case_id = case_id_of(self.disputes, receipt.job_id, receipt.worker)
        evidence_hash = evidence_hash_of(evidence, reason)
        refused_at = int(self._clock()) - 1  # never ahead of the next block's timestamp
        signed = sign_refusal(
            self._key,
            chain_id=self.chain_id,
            disputes=self.disputes,
            case_id=case_id,
            worker=receipt.worker,
            evidence_hash=evidence_hash,
            refused_at=refused_at,
        )
        record = RefusalRecord(
            receipt.job_id,
            case_id,
            receipt.worker.lower(),
            receipt.payee.lower(),
            receipt,
            params,
            dtype,
            reason,
            evidence_hash,
            refused_at,
            signed.signature,
            charge=charge,
        )
        self.book.add(record)
        return record


class Restorations:
    """The epoch hook: pays each won dispute's receipt, valued as billing would have charged
    it (worker share at the paying epoch's rules, from the distributor's funding: the payer
    was charged nothing for the refused receipt, and the job was rendered again).

    Exactly once: `add_to` plans the owed pay into the epoch being planned (recorded before
    the plan is saved); `posted` marks it paid when that epoch's root is on chain. A plan that
    never got saved (a failed save, a crash) leaves it owed, so the next plan includes it
    again; a restoration planned into an epoch that the store has as posted is paid (a crash
    between posting and `posted` is repaired at the next plan), never planned twice.

    Take rate: the payee's stake tier at the paying epoch's stake snapshot, as for any receipt
    of that epoch (`take_of`). The refused receipt was never valued (a refusal keeps it out of
    every epoch), so the epoch that pays it is the one whose rules and tier apply, exactly as
    they would have to a receipt that waited out a dispute window.
    """

    def __init__(self, book: DisputeBook) -> None:
        self.book = book

    def owed(
        self,
        epoch_state: Callable[[int], str | None],
        paid_in: Callable[[int], Collection[bytes] | None] = lambda _epoch: None,
    ) -> list[tuple[bytes, str, str, int]]:
        """(case, payee, model, micro-Spark) the next plan must pay; `epoch_state(e)` is the
        store's state of epoch e ("planned", "posted", None when no plan of it was saved),
        `paid_in(e)` the case ids epoch e's published batch pays (None: not known)."""
        out: list[tuple[bytes, str, str, int]] = []
        for case_id, payee, model_id, micro_spark, planned in self.book.due():
            state = None if planned is None else epoch_state(planned)
            if planned is not None and state == "posted":  # posted, then crashed before
                paid = paid_in(planned)  # marking it; or another plan took that number
                self.book.posted(planned, paid)
                if paid is None or case_id in paid:
                    continue
            if state == "planned":
                continue  # in a saved plan that is still to be posted
            out.append((case_id, payee, model_id, micro_spark))
        return out

    def add_to(
        self,
        earned: dict[str, int],
        rules: PayoutRules,
        epoch: int,
        owed: list[tuple[bytes, str, str, int]],
        take_of: Callable[[str], int],
    ) -> tuple[dict[str, int], list[Restoration]]:
        """`earned` plus the `owed` restorations, recorded as planned into `epoch`; and the
        restorations as the batch publishes them (the audit recomputes each)."""
        from eth_utils import to_checksum_address

        out = dict(earned)
        planned: dict[bytes, int] = {}
        published: list[Restoration] = []
        for case_id, payee, model_id, micro_spark in owed:
            account = to_checksum_address(payee)
            take = take_of(account)
            amount = epoch_math.restored_amount(rules, micro_spark, model_id, take)
            out[account] = out.get(account, 0) + amount
            planned[case_id] = amount
            published.append(
                Restoration(
                    case_id="0x" + case_id.hex(),
                    payee=account,
                    model_id=model_id,
                    micro_spark=micro_spark,
                    take_bps=take,
                    amount=str(amount),
                )
            )
        if planned:
            self.book.plan(epoch, planned)
            log.info("disputes_restoration_planned", epoch=epoch, count=len(planned))
        return out, published

    def posted(self, epoch: int, paid: Collection[bytes] | None = None) -> None:
        count = self.book.posted(epoch, paid)
        if count:
            log.info("disputes_restored", epoch=epoch, count=count)


class _Dispatcher(Protocol):
    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...

    @property
    def store(self) -> Store: ...


class DisputeDesk:
    """Follows Disputes' events for this coordinator's cases: re-checks and publishes the
    bundle when one is opened, restores pay and reputation when the worker wins."""

    def __init__(
        self,
        book: DisputeBook,
        disputes: Disputes,
        *,
        reporter: Any,
        publish_dir: Path,
        dispatcher: _Dispatcher | None = None,
        reputation: Reputation | None = None,
        rechecks: int = DEFAULT_RECHECKS,
        verify_timeout: float = 30.0,
        rng: random.Random | None = None,
        public_url: str | None = None,
        store: Store | None = None,
    ) -> None:
        self.book, self.disputes, self.reporter = book, disputes, reporter
        self.store: Store | None = (
            store if store is not None else getattr(dispatcher, "store", None)
        )
        """Where this coordinator's slash proposals are (`slash_proposals`): a slash case on
        chain is followed when its evidence hash is one of theirs."""
        self.publish_dir = publish_dir
        self.dispatcher, self.reputation = dispatcher, reputation
        self.rechecks, self.verify_timeout = rechecks, verify_timeout
        self._rng = rng or random.SystemRandom()
        self._window: int | None = None
        self._retry_from: int | None = None
        """The first block whose events a poll failed to handle (read again next poll)."""
        self._pending_open: set[bytes] = set()
        """Disputed refusals whose vote failed to open (retried; their prompt is kept)."""
        if reputation is not None:  # which refused job struck when: exact pardons
            reputation.on_strike = book.struck
        self.public_url: str | None = public_url
        """Base URL jurors fetch bundles from (`[gateway] public_url`, else the bound
        `http_listen`); None without an HTTP server: the bundle's file URI is published."""

    def bundle_uri(self, case_id: bytes, path: Path) -> str:
        """`<public url>/disputes/bundles/0x<case>` (the route below serves it)."""
        if self.public_url is None:
            return path.as_uri()
        return f"{self.public_url.rstrip('/')}/disputes/bundles/0x{case_id.hex()}"

    def events(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """New DisputeOpened and DisputeResolved events since the last poll (SlashProposed
        ones of this coordinator's proposals are followed on the way). The cursor moves past
        them; `poll` moves it back to the first event whose handling failed."""
        start = self.book.next_block()
        head = self.disputes.chain.block_number()
        if head < start:
            return [], []
        if self.store is not None:
            for ev in self.disputes.events_of("SlashProposed", start):
                if ev["blockNumber"] <= head:
                    try:
                        self.follow_slash(ev)
                    except Exception as exc:  # a store error: read again at the next poll
                        self._failed("follow", bytes(ev["caseId"]), exc, ev["blockNumber"])
        opened = [
            e for e in self.disputes.events_of("DisputeOpened", start) if e["blockNumber"] <= head
        ]
        resolved = [
            e for e in self.disputes.events_of("DisputeResolved", start) if e["blockNumber"] <= head
        ]
        self.book.set_next_block(head + 1)
        return opened, resolved

    def _failed(self, step: str, case_id: bytes, exc: Exception, block: int | None = None) -> None:
        """One case's `step` failed: logged (the case's id prefix and the error's type, never
        its text, which could quote a prompt), retried at the next poll (its event, from
        `block`, is read again); the other cases go on."""
        log.warning(
            "dispute_case_step_failed",
            step=step,
            case=case_id.hex()[:16],
            error=type(exc).__name__,
        )
        if block is not None:
            block = int(block)
            self._retry_from = block if self._retry_from is None else min(self._retry_from, block)

    async def poll(self) -> int:
        """Handle what happened on chain since the last poll; returns events handled. Each
        case is handled on its own: one whose step fails (a chain hiccup, a store or bundle
        write error) is logged and retried at the next poll, the others go on."""
        if self._window is None:  # read once: a change by governance applies after a restart
            self._window = int(self.disputes.params().dispute_window)
        head_time = int(self.disputes.chain.timestamp())  # of the blocks `events` reads
        self._retry_from = None
        opened, resolved = self.events()
        for ev in opened:
            await self._on_opened(ev)
        for ev in resolved:
            case_id = bytes(ev["caseId"])
            try:
                self.resolved(case_id, bool(ev["workerWon"]))
            except Exception as exc:
                self._failed("resolved", case_id, exc, ev["blockNumber"])
        if self._retry_from is not None:  # read those events again at the next poll
            self.book.set_next_block(min(self._retry_from, self.book.next_block()))
        await self.follow_slashes()
        self.apply_pardons()
        # then the refusals nobody disputed in time: their prompts are forgotten. After the
        # events, and by the chain's clock: a dispute opened in time while this coordinator
        # was away is handled (re-checked) first; an hour's slack besides. Kept longer: the
        # jobs a slash names, while that slash may still be disputed (`_kept`)
        try:
            keep = self._kept()
            self.book.shred(undisputed_before=head_time - self._window - 3600, keep=keep)
        except Exception as exc:  # nothing is forgotten this time; the next poll tries again
            log.warning("dispute_shred_failed", error=type(exc).__name__)
        return len(opened) + len(resolved)

    async def _on_opened(self, ev: Mapping[str, Any]) -> None:
        from sogni_chain import ChainRevert
        from sogni_chain.disputes import CaseState

        case_id = bytes(ev["caseId"])
        try:
            record = self.book.by_case(case_id)
            if record is None:
                return
            case = self.disputes.case(case_id)
            if case.state is not CaseState.DISPUTED:
                self._pending_open.discard(case_id)
                return  # its vote is open (an event read again after a failure), or over
            if case.vote_by and int(self.disputes.chain.timestamp()) + 1 >= case.vote_by:
                self._pending_open.discard(case_id)  # nobody may open it now: no re-checks
                log.warning("dispute_vote_too_late", case=case_id.hex()[:16])
                return
            await self.open_vote(record)
            self._pending_open.discard(case_id)
        except ChainRevert as exc:  # the contract's answer: another try gets the same
            self._pending_open.discard(case_id)
            log.warning("dispute_vote_refused", case=case_id.hex()[:16], error=str(exc))
        except Exception as exc:
            self._pending_open.add(case_id)  # its prompt is kept for the retry
            self._failed("open vote", case_id, exc, ev["blockNumber"])

    def _kept(self) -> set[tuple[str, bytes]]:
        """(worker, job id) of refusals whose parameters a re-check may still need after
        their own dispute window: the jobs of an open slash proposal (not on chain yet, for
        `PROPOSAL_KEEP` at most) and
        of a slash case with no bundle yet (disputable until its own window ends, then
        re-checked when disputed), and disputed refusals whose vote is to be retried."""
        keep: set[tuple[str, bytes]] = set()
        if self.store is not None:
            now = time.time()
            for p in self.store.slash_proposals("proposed"):
                if now - p.proposed_at < PROPOSAL_KEEP:  # never acted on: not for ever
                    keep |= {(p.wallet.lower(), bytes(j)) for j in p.job_ids}
        for sc in self.book.slash_cases(open_only=True):
            if sc.bundle_hash is None:
                keep |= {(sc.worker.lower(), bytes(j)) for j in sc.job_ids}
        for case_id in self._pending_open:
            record = self.book.by_case(case_id)
            if record is not None:
                keep.add((record.worker.lower(), record.job_id))
        return keep

    @staticmethod
    def _published(bundle_hash: bytes | None, path: str | None) -> tuple[bytes, Path] | None:
        """A bundle already written for the case (its vote failed to open): sent again as
        it is, not re-built (its re-checks are done and the prompt may be gone)."""
        if bundle_hash is None or path is None:
            return None
        try:
            body = Path(path).read_bytes()
        except OSError:
            return None
        return (bundle_hash, Path(path)) if keccak(body) == bundle_hash else None

    async def open_vote(self, record: RefusalRecord) -> bytes:
        published = self._published(record.bundle_hash, record.bundle_path)
        rechecks: list[dict[str, Any]] = []
        if published is not None:
            digest, path = published
        else:
            rechecks = await self.recheck(record) if self.dispatcher is not None else []
            bundle = {
                "format": BUNDLE_FORMAT,
                "caseId": "0x" + record.case_id.hex(),
                "jobId": "0x" + record.job_id.hex(),
                "worker": record.worker,
                "modelId": record.receipt.model_id,
                "steps": record.receipt.steps_done,
                "refusedAt": record.refused_at,
                "reason": record.reason,
                "evidenceHash": "0x" + record.evidence_hash.hex(),
                "rechecks": rechecks,
            }
            body = json.dumps(bundle, indent=2, sort_keys=True).encode()
            digest = keccak(body)
            path = self.publish_dir / "disputes" / f"{record.case_id.hex()}.json"
            atomic_write_bytes(path, body)
            self.book.set_bundle(record.case_id, digest, str(path))
            self.book.shred(record.case_id)  # the re-checks are done: the prompt is not needed
        uri = self.bundle_uri(record.case_id, path)
        self.disputes.open_voting(record.case_id, digest, uri, sender=self.reporter)
        log.info(
            "dispute_vote_opened",
            case=record.case_id.hex()[:16],
            rechecks=len(rechecks),
            republished=published is not None,
        )
        return digest

    # -- slash cases: followed from the proposal to the executed (or cancelled) slash --

    def follow_slash(self, ev: Mapping[str, Any]) -> SlashCase | None:
        """A `SlashProposed` event: followed when it is one of this coordinator's proposals
        (same wallet, evidence hash = keccak of the proposal's failed job ids)."""
        if self.store is None:
            return None
        case_id, worker = bytes(ev["caseId"]), str(ev["worker"]).lower()
        evidence = bytes(ev["evidenceHash"])
        for p in self.store.slash_proposals():
            if p.wallet.lower() == worker and slash_evidence_hash(p.job_ids) == evidence:
                case = SlashCase(
                    case_id, p.id, worker, p.job_ids, evidence, int(ev["amount"]), str(ev["reason"])
                )
                if self.book.add_slash(case):
                    log.info("dispute_slash_followed", case=case_id.hex()[:16], proposal=p.id)
                return case
        return None

    async def follow_slashes(self) -> None:
        """Move each unfinished slash case of this coordinator on, from the chain's state:
        disputed -> publish the bundle and open the vote (before `voteBy`; after it, resolve:
        upheld); vote over -> resolve; window closed undisputed, or lost -> execute. Each
        case on its own: a step that fails (a revert, a chain hiccup, a bundle or store write
        error) is logged and retried at the next poll; the other cases go on."""
        from sogni_chain import ChainRevert

        for sc in self.book.slash_cases(open_only=True):
            try:
                await self._follow(sc)
            except ChainRevert as exc:
                log.warning(
                    "dispute_slash_step_refused", case=sc.case_id.hex()[:16], error=str(exc)
                )
            except Exception as exc:
                self._failed("slash", sc.case_id, exc)

    async def _follow(self, sc: SlashCase) -> None:
        from sogni_chain.disputes import CaseState

        case = self.disputes.case(sc.case_id)
        now = int(self.disputes.chain.timestamp()) + 1  # the next block, at least
        short = sc.case_id.hex()[:16]
        if case.vote_by and sc.vote_by != case.vote_by:
            self.book.update_slash(sc.case_id, vote_by=case.vote_by)
        state = case.state
        if state is CaseState.DISPUTED and now < case.vote_by:
            await self.open_slash_vote(sc)
        elif state is CaseState.DISPUTED or (state is CaseState.VOTING and now >= case.reveal_end):
            self.disputes.resolve(sc.case_id, sender=self.reporter)
            log.info("dispute_slash_resolved", case=short)
        elif state is CaseState.PROPOSED and now >= case.window_end:
            self._execute(sc, case.execute_by, now)
        elif state is CaseState.WORKER_LOST:
            deadline = max(case.execute_by, case.reveal_end + 7 * 86400)  # EXECUTE_GRACE
            self._execute(sc, deadline, now)
        elif state is CaseState.WORKER_WON:
            self.book.update_slash(sc.case_id, outcome="worker won", finished=True)
            self.apply_pardons()
        elif state is CaseState.EXECUTED:
            self.book.update_slash(sc.case_id, outcome="executed", finished=True)

    def _execute(self, sc: SlashCase, deadline: int, now: int) -> None:
        if now >= deadline:  # left too long (this coordinator was away): it never executes
            self.book.update_slash(sc.case_id, outcome="expired", finished=True)
            log.warning("dispute_slash_expired", case=sc.case_id.hex()[:16])
            return
        tx = self.disputes.execute_slash(sc.case_id, sender=self.reporter)
        slashed = int(tx.event("SlashExecuted")["slashed"])
        self.book.update_slash(sc.case_id, outcome="executed", finished=True)
        log.info("dispute_slash_executed", case=sc.case_id.hex()[:16], slashed=slashed)

    def slash_failures(self, sc: SlashCase) -> list[dict[str, Any]]:
        """The failed checks behind a slash, as its bundle lists them (no prompt, no image)."""
        out: list[dict[str, Any]] = []
        if self.store is None:
            return out
        for job_id in sc.job_ids:
            for _job, worker, receipt, reason in self.store.failed_receipts(job_id):
                if worker.lower() != sc.worker.lower():
                    continue  # another worker failed the same job
                out.append(
                    {
                        "jobId": "0x" + job_id.hex(),
                        "modelId": receipt.model_id,
                        "steps": receipt.steps_done,
                        "reason": reason,
                    }
                )
        return out

    async def open_slash_vote(self, sc: SlashCase) -> bytes:
        """Publish a disputed slash's bundle (its failed checks and, where the job's
        parameters are still kept, re-runs of their steps on other wallets) and open the vote.
        The jobs whose parameters are gone are listed (`recheckImpossible`, with `why`):
        jurors see that no re-check could run for them, not just an empty list."""
        published = self._published(sc.bundle_hash, sc.bundle_path)
        short = sc.case_id.hex()[:16]
        rechecks: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        if published is not None:
            digest, path = published
        else:
            impossible: dict[bytes, str] = {}
            for job_id in sc.job_ids:
                records = [
                    r for r in self.book.refusals(job_id) if r.worker.lower() == sc.worker.lower()
                ]
                kept = [r for r in records if r.params is not None]
                if not kept:  # shredded after the refusal's own window, or never kept
                    impossible[job_id] = "parameters deleted" if records else "parameters not kept"
                    continue
                if self.dispatcher is not None:
                    for record in kept:
                        rechecks += [
                            {"jobId": "0x" + job_id.hex(), **r} for r in await self.recheck(record)
                        ]
            failures = self.slash_failures(sc)
            bundle: dict[str, Any] = {
                "format": BUNDLE_FORMAT,
                "kind": "slash",
                "caseId": "0x" + sc.case_id.hex(),
                "worker": sc.worker,
                "amount": str(sc.amount),
                "reason": sc.reason,
                "evidenceHash": "0x" + sc.evidence_hash.hex(),
                "failures": failures,
                "rechecks": rechecks,
            }
            if impossible:
                bundle["recheckImpossible"] = ["0x" + j.hex() for j in impossible]
                bundle["why"] = "; ".join(sorted(set(impossible.values())))
                log.warning(  # once: a retry sends the bundle written here
                    "dispute_slash_recheck_impossible",
                    case=short,
                    jobs=len(impossible),
                    why=bundle["why"],
                )
            body = json.dumps(bundle, indent=2, sort_keys=True).encode()
            digest = keccak(body)
            path = self.publish_dir / "disputes" / f"{sc.case_id.hex()}.json"
            atomic_write_bytes(path, body)
            self.book.update_slash(sc.case_id, bundle=(digest, str(path)))
        uri = self.bundle_uri(sc.case_id, path)
        self.disputes.open_voting(sc.case_id, digest, uri, sender=self.reporter)
        log.info(
            "dispute_slash_vote_opened",
            case=short,
            failures=len(failures),
            rechecks=len(rechecks),
            republished=published is not None,
        )
        return digest

    async def recheck(self, record: RefusalRecord) -> list[dict[str, Any]]:
        """`rechecks` more re-runs of each step the check held against the worker, each on a
        node of a wallet not heard on this job yet."""
        from sogni_coordinator.verifiers import verify_step

        assert self.dispatcher is not None
        if record.params is None:  # shredded: disputed after its window, as seen here
            log.warning("dispute_recheck_impossible", case=record.case_id.hex()[:16])
            return []
        params = record.params
        kept = self.dispatcher.store.failed_evidence(record.job_id)
        if not kept:
            return []
        evidence = decode_evidence(kept[-1])
        openings: dict[int, StepOpeningWire] = (
            {o.step: o for o in evidence.challenge.openings} if evidence.challenge else {}
        )
        nodes = self.dispatcher.nodes
        heard: set[str] = set()
        for step in evidence.steps:
            for answer in (step.first, step.third):
                if answer is not None and answer.verifier:
                    heard.add(answer.verifier.lower())
        out: list[dict[str, Any]] = []
        labels: dict[str, str] = {}
        for step in evidence.steps:
            ok, nxt = openings.get(step.step), openings.get(step.step + 1)
            if step.kind != "step" or ok is None or nxt is None:
                continue
            for _ in range(self.rechecks):
                v = await verify_step(
                    self.dispatcher,
                    params=params,
                    scheduler=params.scheduler,
                    worker=record.worker,
                    opening_k=ok,
                    opening_next=nxt,
                    dtype=record.dtype,
                    timeout=self.verify_timeout,
                    rng=self._rng,
                    exclude=frozenset(heard),
                    worker_payout=record.payee,
                    job=record.job_id,
                )
                if v.verifier is None:
                    break  # no other wallet left to ask
                link = nodes.get(v.verifier)
                wallet = link.wallet.lower() if link is not None else v.verifier
                heard |= set(link.accounts) if link is not None else {wallet}
                label = labels.setdefault(wallet, f"v{len(labels) + 1}")
                out.append(
                    {
                        "step": step.step,
                        "verifier": label,
                        "distance": v.distance,
                        "tolerance": v.tolerance,
                        "passed": v.passed,
                        "reason": v.reason,
                    }
                )
        return out

    def resolved(self, case_id: bytes, worker_won: bool) -> None:
        """A `DisputeResolved` of one of this coordinator's cases: its outcome recorded
        once; a win takes back the strikes of its jobs (`apply_pardons`)."""
        slash = self.book.slash_case(case_id)
        if slash is not None and slash.outcome is None:
            outcome = "worker won" if worker_won else "slash upheld"
            self.book.update_slash(case_id, outcome=outcome, finished=worker_won)
            log.info("dispute_slash_decided", case=case_id.hex()[:16], worker_won=worker_won)
        record = self.book.by_case(case_id)
        if record is not None and self.book.settle(case_id, worker_won):
            self.book.shred(case_id)
            log.info("dispute_resolved", case=case_id.hex()[:16], worker_won=worker_won)
        if worker_won:
            self.apply_pardons()

    def apply_pardons(self) -> int:
        """Take back the strikes of the jobs of every case the worker won (a refusal: its
        job; a slash: the failed jobs it named), each job once whichever of its cases won
        first, and persisted with the case marked pardoned (a crash before that: applied at
        the next poll): the worker is not blacklisted, nor proposed for a slash, again on
        that evidence. A job refused here struck (a refusal is signed for each failure that
        strikes); one without a refusal struck nothing to take back. Returns cases done."""
        if self.reputation is None:
            return 0
        done = 0
        for case_id, worker, job_ids in self.book.won_unpardoned():
            try:
                struck = self.book.unpardoned_strikes(worker, job_ids)
                if struck:
                    self.reputation.pardon_strikes(worker, [t for _job, t in struck])
                self.book.record_pardons(worker, [j for j, _t in struck], case_id)
            except Exception as exc:  # a write failed: tried again at the next poll
                self._failed("pardon", case_id, exc)
                continue
            log.info("dispute_pardoned", case=case_id.hex()[:16], strikes=len(struck))
            done += 1
        return done

    async def run(self, poll_seconds: float) -> None:
        """Poll the contract until cancelled; a failing poll is logged and retried."""
        import trio

        while True:
            try:
                await self.poll()
            except Exception as exc:  # a chain hiccup must not stop the coordinator
                log.warning("dispute_poll_failed", error=str(exc))
            await trio.sleep(poll_seconds)


def attach_disputes(
    link: Any, dispatcher: Any, signer_key: bytes, publish_dir: Path, database: Path | str
) -> DisputeDesk | None:
    """Wire disputes into a coordinator whose deployment has a Disputes contract: the
    dispatcher signs refusals, the epoch settler pays restorations; returns the desk to run."""
    if link is None or link.deployment.disputes is None:
        return None
    disputes = link.deployment.disputes
    book = DisputeBook(database)
    reporter = link.deployment.chain.add_key(signer_key)
    if not disputes.has_role("REPORTER_ROLE", reporter.address):
        log.warning(  # refusals it signs would not be disputable, nor its bundles published
            "disputes_not_reporter",
            key=reporter.address,
            todo="governance: Disputes.grantRole(REPORTER_ROLE, this coordinator's offer key)",
        )
    dispatcher.refusals = Reporter(
        book, signer_key, chain_id=link.deployment.chain.chain_id, disputes=disputes.address
    )
    link.settler.restorations = Restorations(book)
    if book.next_block() == 0:  # never scan the chain from before the contracts existed
        book.set_next_block(link.deployment.addresses.deployed_at_block)
    return DisputeDesk(
        book,
        disputes,
        reporter=reporter,
        publish_dir=publish_dir,
        dispatcher=dispatcher,
        reputation=dispatcher.reputation,
    )


READ_THREADS = 4
"""Worker threads the dispute routes read with at once (their requests are not authenticated)."""


def dispute_routes(dispatcher: Any) -> list[Any]:
    """`GET /disputes/refusals/0x<job id>`: the signed refusals of a job (what `sogni-node
    dispute open` sends on chain; no prompt, no image), 404 when there is none;
    `GET /disputes/bundles/0x<case id>`: a case's published evidence bundle, for jurors.

    Anyone may ask, so the database and file reads run in worker threads (at most
    `READ_THREADS` at once): on the event loop one would stall every task for as long as
    the database writer holds its lock (up to 30 s). anyio's threads, not trio's, so the
    routes also serve under starlette's TestClient (asyncio)."""
    import anyio.to_thread
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    reads = anyio.CapacityLimiter(READ_THREADS)

    async def refusals(request: Request) -> JSONResponse:
        reporter: Reporter | None = getattr(dispatcher, "refusals", None)
        text = str(request.path_params["job"]).lower().removeprefix("0x")
        try:
            job_id = bytes.fromhex(text)
        except ValueError:
            job_id = b""
        if len(job_id) != 32:
            return JSONResponse({"error": "a job id is 32 bytes of hex"}, status_code=400)
        found = []
        if reporter is not None:
            found = await anyio.to_thread.run_sync(reporter.book.refusals, job_id, limiter=reads)
        if not found:
            return JSONResponse({"error": "no refusal for this job"}, status_code=404)
        return JSONResponse({"refusals": [r.as_json() for r in found]})

    async def bundle(request: Request) -> Response:
        reporter: Reporter | None = getattr(dispatcher, "refusals", None)
        text = str(request.path_params["case"]).lower().removeprefix("0x").removesuffix(".json")
        try:
            case_id = bytes.fromhex(text)
        except ValueError:
            case_id = b""

        def read(book: DisputeBook) -> bytes | None:
            record = book.by_case(case_id)
            where = record.bundle_path if record is not None else None
            if where is None:  # a slash case's bundle
                slash = book.slash_case(case_id)
                where = slash.bundle_path if slash is not None else None
            if where is None:
                return None
            return Path(where).read_bytes()  # its keccak256 is the bundleHash

        body = None
        if reporter is not None and case_id:
            body = await anyio.to_thread.run_sync(read, reporter.book, limiter=reads)
        if body is None:
            return JSONResponse({"error": "no published bundle for this case"}, status_code=404)
        return Response(body, media_type="application/json")

    return [
        Route("/disputes/refusals/{job}", refusals, methods=["GET"]),
        Route("/disputes/bundles/{case}", bundle, methods=["GET"]),
    ]
