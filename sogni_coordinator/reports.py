"""Content reports and the blocks an operator's decision puts on a payer or a node.

Why its own component: a report is evidence the operator may need long after the request's
prompt was shredded (`prompt_retention`), so it copies what identifies the job (image hashes,
the worker wallets, the payer, the model, the times) out of the store when it is filed. The
prompt itself is never copied: while its key still exists, a *keyed* hash of it is kept
(HMAC-SHA256 with a key in a file beside the database, `report_hash.key`): prompts are
low-entropy, so a plain sha256 could be reversed by guessing; the keyed one only lets whoever
holds the key check a given prompt against it. After the privacy window there is nothing
left to hash and the report says so (`prompt_hash` None).

A report is filed by the request's payer (proved by the gateway's API key or an EIP-712
signature, `report_intake`) or the operator; once per request and reporter, and at most
`REPORTS_PER_HOUR` per reporter. The operator resolves it with an action: `none`,
`block-payer` or `block-node`. Blocks live in their own table, survive a restart, and are
read by the running coordinator every `BLOCK_POLL_SECONDS` (`watch`): a blocked payer's
requests are refused before anything is reserved, a blocked node's wallet is refused at the
handshake, never routed, and a connected one is told `Goodbye` and dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import msgspec

from sogni_coordinator.db import Database
from sogni_coordinator.delivery import short
from sogni_coordinator.prompt_crypto import PromptKeyError, unseal
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import JobParams, ReportReason

log = get_logger(__name__)

__all__ = [
    "ACTIONS",
    "NODE_BLOCKED",
    "PAYER_BLOCKED",
    "REASONS",
    "Block",
    "Report",
    "ReportRefused",
    "Reports",
]

REASONS: tuple[str, ...] = get_args(ReportReason)
Action = Literal["none", "block-payer", "block-node"]
ACTIONS: tuple[str, ...] = get_args(Action)
MAX_NOTE_CHARS = 1000
REPORTS_PER_HOUR = 20
"""Reports one reporter may file per hour (an operator's queue is not a flood target)."""
BLOCK_POLL_SECONDS = 2.0
"""How often a running coordinator re-reads the blocks (the CLI writes them)."""
OPERATOR = "operator"
HASH_KEY_FILE = "report_hash.key"
NODE_BLOCKED = "blocked by the coordinator's operator after a content report"
PAYER_BLOCKED = (
    "this payer account is blocked by the coordinator's operator after a content report: "
    "nothing was charged; contact the operator"
)

_SCHEMA_V1 = """
CREATE TABLE reports (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id    BLOB NOT NULL,
    image_index   INTEGER NOT NULL,
    reporter      TEXT NOT NULL,
    via           TEXT NOT NULL,
    reason        TEXT NOT NULL,
    note          TEXT NOT NULL DEFAULT '',
    payer         TEXT,
    model_id      TEXT NOT NULL,
    client_peer   TEXT NOT NULL,
    requested_at  REAL NOT NULL,
    prompt_hash   BLOB,
    images        TEXT NOT NULL,
    node_peers    TEXT NOT NULL,
    created_at    REAL NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('open', 'resolved')),
    action        TEXT,
    resolution    TEXT NOT NULL DEFAULT '',
    resolved_at   REAL,
    UNIQUE (request_id, reporter)
);
CREATE INDEX reports_state ON reports(state);
CREATE INDEX reports_reporter ON reports(reporter, created_at);
CREATE TABLE report_blocks (
    kind        TEXT NOT NULL CHECK (kind IN ('payer', 'node')),
    account     TEXT NOT NULL,
    report_id   INTEGER,
    note        TEXT NOT NULL DEFAULT '',
    blocked_at  REAL NOT NULL,
    PRIMARY KEY (kind, account)
);
"""
_V2_SHARED_HASH_KEY = """
CREATE TABLE report_hash_key (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    key  BLOB NOT NULL
);
"""
"""On PostgreSQL every coordinator of the network must hash prompts with one key, so it
lives in the database (a SQLite coordinator keeps its file beside the database)."""
MIGRATIONS = (_SCHEMA_V1, _V2_SHARED_HASH_KEY)

_params_decoder = msgspec.msgpack.Decoder(JobParams)


class ReportRefused(Exception):
    """A report or a resolution that is refused: `code` for machines, `reason` one line."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ReportedImage:
    index: int
    job_id: str
    image_sha256: str
    """sha256 of the image the node delivered (its receipt's result hash)."""
    worker: str
    completed_at: int


@dataclass(frozen=True)
class Report:
    id: int
    request_id: str
    image_index: int
    """-1: every image of the request."""
    reporter: str
    via: str
    reason: str
    note: str
    payer: str | None
    model_id: str
    client_peer: str
    requested_at: float
    prompt_hash: str | None
    """Keyed hash (HMAC-SHA256) of the prompts; None: shredded before the report came."""
    images: list[ReportedImage]
    node_peers: list[str]
    created_at: float
    state: str
    action: str | None
    resolution: str
    resolved_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "requestId": self.request_id,
            "imageIndex": self.image_index,
            "reporter": self.reporter,
            "via": self.via,
            "reason": self.reason,
            "note": self.note,
            "payer": self.payer,
            "modelId": self.model_id,
            "clientPeer": self.client_peer,
            "requestedAt": self.requested_at,
            "promptHash": self.prompt_hash,
            "images": [
                {
                    "index": i.index,
                    "jobId": i.job_id,
                    "imageSha256": i.image_sha256,
                    "worker": i.worker,
                    "completedAt": i.completed_at,
                }
                for i in self.images
            ],
            "nodePeers": self.node_peers,
            "createdAt": self.created_at,
            "state": self.state,
            "action": self.action,
            "resolution": self.resolution,
            "resolvedAt": self.resolved_at,
        }


@dataclass(frozen=True)
class Block:
    kind: str
    account: str
    report_id: int | None
    note: str
    blocked_at: float


_COLUMNS = (
    "id, request_id, image_index, reporter, via, reason, note, payer, model_id, client_peer,"
    " requested_at, prompt_hash, images, node_peers, created_at, state, action, resolution,"
    " resolved_at"
)


def _report(row: tuple[Any, ...]) -> Report:
    images = [ReportedImage(**item) for item in json.loads(row[12])]
    return Report(
        id=int(row[0]),
        request_id=bytes(row[1]).hex(),
        image_index=int(row[2]),
        reporter=str(row[3]),
        via=str(row[4]),
        reason=str(row[5]),
        note=str(row[6]),
        payer=None if row[7] is None else str(row[7]),
        model_id=str(row[8]),
        client_peer=str(row[9]),
        requested_at=float(row[10]),
        prompt_hash=None if row[11] is None else bytes(row[11]).hex(),
        images=images,
        node_peers=list(json.loads(row[13])),
        created_at=float(row[14]),
        state=str(row[15]),
        action=None if row[16] is None else str(row[16]),
        resolution=str(row[17]),
        resolved_at=None if row[18] is None else float(row[18]),
    )


def _account(value: str) -> str:
    return value.lower()


def _hash_key(path: Path) -> bytes:
    """The prompt-hash key beside the database: created once (0600), then read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def prompt_hash(key: bytes, params: JobParams) -> bytes:
    """HMAC-SHA256 of the prompts (positive, negative, style; NUL-separated)."""
    text = "\0".join((params.positive_prompt, params.negative_prompt, params.style_prompt))
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


class Reports(Database):
    """Reports and blocks of one coordinator database (safe to share between threads)."""

    def __init__(self, path: Path | str, *, hash_key: bytes | None = None) -> None:
        super().__init__(path, component="reports", migrations=MIGRATIONS)
        self._hash_key_bytes = hash_key
        self.blocked_payers: frozenset[str] = frozenset()
        """What `refresh` last read: lowercase payer accounts refused."""
        self.blocked_nodes: frozenset[str] = frozenset()
        """Lowercase node wallets refused."""

    def _hash_key(self) -> bytes:
        if self._hash_key_bytes is None:
            if str(self.path) == ":memory:":
                self._hash_key_bytes = os.urandom(32)
            elif self.postgres:
                with self._tx() as db:
                    db.execute(
                        "INSERT OR IGNORE INTO report_hash_key VALUES (1, ?)", (os.urandom(32),)
                    )
                    row = db.execute("SELECT key FROM report_hash_key WHERE id = 1").fetchone()
                self._hash_key_bytes = bytes(row[0])
            else:
                self._hash_key_bytes = _hash_key(self.path.parent / HASH_KEY_FILE)
        return self._hash_key_bytes

    # --- filing ---------------------------------------------------------------------------
    def payer_of(self, request_id: bytes) -> str | None:
        """The account that paid for `request_id` (the ledger's reservation), or None."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT payer FROM ledger_reservations WHERE request_id = ?",
                    (request_id.hex(),),
                ).fetchone()
            except sqlite3.OperationalError:  # no ledger in this file (billing never ran)
                return None
        return None if row is None else _account(str(row[0]))

    def file(
        self,
        request_id: bytes,
        *,
        reporter: str,
        via: str,
        reason: str,
        image_index: int = -1,
        note: str = "",
        node_peers: Iterable[str] = (),
        now: float | None = None,
    ) -> int:
        """Keep the evidence of `request_id` with a report; its id. The caller proved that
        `reporter` is the payer (or the operator): checked again here against the ledger.
        Raises `ReportRefused`."""
        now = time.time() if now is None else now
        if reason not in REASONS:
            raise ReportRefused("invalid_report", f"reason must be one of {', '.join(REASONS)}")
        if len(note) > MAX_NOTE_CHARS or not all(c.isprintable() or c in "\n\t" for c in note):
            raise ReportRefused(
                "invalid_report", f"the note is at most {MAX_NOTE_CHARS} printable characters"
            )
        if not -1 <= image_index < 10_000:
            raise ReportRefused("invalid_report", "imageIndex is -1 (all) or an image's index")
        who = reporter if reporter == OPERATOR else _account(reporter)
        payer = self.payer_of(request_id)
        if who != OPERATOR and who != payer:
            # an unknown request gets the same answer: ids of others' jobs are not confirmed
            raise ReportRefused("unknown_job", "no job of yours has this id")
        with self._tx() as db:
            try:
                request = db.execute(
                    "SELECT model_id, client_peer, created_at FROM requests WHERE request_id = ?",
                    (request_id,),
                ).fetchone()
            except sqlite3.OperationalError:  # no store in this file: no request either
                request = None
            if request is None:
                raise ReportRefused("unknown_job", "no job of yours has this id")
            recent = db.execute(
                "SELECT COUNT(*) FROM reports WHERE reporter = ? AND created_at > ?",
                (who, now - 3600),
            ).fetchone()[0]
            if who != OPERATOR and recent >= REPORTS_PER_HOUR:
                raise ReportRefused(
                    "rate_limited", f"at most {REPORTS_PER_HOUR} reports an hour: try later"
                )
            images = self._images(db, request_id, image_index)
            if not images:
                what = "this job" if image_index < 0 else f"image {image_index} of this job"
                raise ReportRefused("not_delivered", f"nothing of {what} was delivered")
            try:
                cur = db.execute(
                    f"INSERT INTO reports ({_COLUMNS[4:]}) VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', NULL, '', NULL)"
                    " RETURNING id",
                    (
                        request_id,
                        image_index,
                        who,
                        via,
                        reason,
                        note,
                        payer,
                        str(request[0]),
                        str(request[1]),
                        float(request[2]),
                        self._prompt_hash(db, request_id),
                        json.dumps([i.__dict__ for i in images]),
                        json.dumps(sorted(set(node_peers))),
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ReportRefused("duplicate_report", "you already reported this job") from None
            report_id = int(cur.fetchone()[0])
        log.info(
            "report_filed",
            report=report_id,
            reason=reason,
            request=short(request_id),
            via=via,
            images=len(images),
        )
        return report_id

    @staticmethod
    def _images(db: sqlite3.Connection, request_id: bytes, index: int) -> list[ReportedImage]:
        rows = db.execute(
            "SELECT j.idx, r.job_id, r.result_hash, r.worker, r.completed_at FROM receipts r"
            " JOIN jobs j USING (job_id) WHERE r.request_id = ? ORDER BY j.idx",
            (request_id,),
        ).fetchall()
        return [
            ReportedImage(
                index=int(r[0]),
                job_id=bytes(r[1]).hex(),
                image_sha256=bytes(r[2]).hex(),
                worker=str(r[3]),
                completed_at=int(r[4]),
            )
            for r in rows
            if index < 0 or int(r[0]) == index
        ]

    def _prompt_hash(self, db: sqlite3.Connection, request_id: bytes) -> bytes | None:
        """The keyed hash of the request's prompts while its key exists (privacy window)."""
        row = db.execute(
            "SELECT k.key, j.params, j.job_id FROM jobs j JOIN request_keys k USING (request_id)"
            " WHERE j.request_id = ? AND length(j.params) > 0 ORDER BY j.idx LIMIT 1",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        try:
            params = _params_decoder.decode(unseal(bytes(row[0]), bytes(row[1]), bytes(row[2])))
        except (PromptKeyError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return prompt_hash(self._hash_key(), params)

    def matches_prompt(self, report_id: int, prompts: tuple[str, str, str]) -> bool | None:
        """Whether (positive, negative, style) are the reported request's prompts; None when
        the report kept no prompt hash. For an operator who is shown a suspected prompt."""
        report = self.get(report_id)
        if report is None or report.prompt_hash is None:
            return None
        params = JobParams(
            model_id="x",
            positive_prompt=prompts[0],
            negative_prompt=prompts[1],
            style_prompt=prompts[2],
            steps=1,
            guidance=0.0,
            width=64,
            height=64,
            seed=0,
        )
        digest = prompt_hash(self._hash_key(), params)
        return hmac.compare_digest(digest, bytes.fromhex(report.prompt_hash))

    # --- reading --------------------------------------------------------------------------
    def get(self, report_id: int) -> Report | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM reports WHERE id = ?", (report_id,)
            ).fetchone()
        return None if row is None else _report(row)

    def find(self, *, open_only: bool = False) -> list[Report]:
        """Reports, oldest first."""
        where = "WHERE state = 'open'" if open_only else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM reports {where} ORDER BY id"
            ).fetchall()
        return [_report(row) for row in rows]

    # --- resolving and blocks --------------------------------------------------------------
    def resolve(
        self, report_id: int, action: str, note: str = "", now: float | None = None
    ) -> list[Block]:
        """Close an open report with `action`; the blocks it adds (payer, or every worker
        wallet of the reported images). Raises `ReportRefused`."""
        if action not in ACTIONS:
            raise ReportRefused("invalid_action", f"action must be one of {', '.join(ACTIONS)}")
        now = time.time() if now is None else now
        report = self.get(report_id)
        if report is None:
            raise ReportRefused("unknown_report", f"no report {report_id}")
        if report.state != "open":
            raise ReportRefused("already_resolved", f"report {report_id} is already resolved")
        targets: list[tuple[str, str]] = []
        if action == "block-payer":
            if report.payer is None:
                raise ReportRefused("no_payer", "this report's job had no payer to block")
            targets = [("payer", report.payer)]
        elif action == "block-node":
            targets = sorted({("node", _account(i.worker)) for i in report.images})
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reports SET state = 'resolved', action = ?, resolution = ?,"
                " resolved_at = ? WHERE id = ? AND state = 'open'",
                (action, note[:MAX_NOTE_CHARS], now, report_id),
            )
            if cur.rowcount != 1:
                raise ReportRefused("already_resolved", f"report {report_id} is already resolved")
            for kind, account in targets:
                db.execute(
                    "INSERT OR IGNORE INTO report_blocks VALUES (?, ?, ?, ?, ?)",
                    (kind, account, report_id, note[:MAX_NOTE_CHARS], now),
                )
        log.info("report_resolved", report=report_id, action=action, blocks=len(targets))
        return [Block(k, a, report_id, note, now) for k, a in targets]

    def block(self, kind: str, account: str, note: str = "") -> bool:
        """Block an account by hand (no report); False if it was blocked already."""
        if kind not in ("payer", "node"):
            raise ReportRefused("invalid_block", "kind is payer or node")
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO report_blocks VALUES (?, ?, NULL, ?, ?)",
                (kind, _account(account), note[:MAX_NOTE_CHARS], time.time()),
            )
        return cur.rowcount == 1

    def unblock(self, account: str, kind: str | None = None) -> int:
        """Lift the blocks of `account` (both kinds unless `kind`); how many went."""
        with self._tx() as db:
            if kind is None:
                cur = db.execute(
                    "DELETE FROM report_blocks WHERE account = ?", (_account(account),)
                )
            else:
                cur = db.execute(
                    "DELETE FROM report_blocks WHERE account = ? AND kind = ?",
                    (_account(account), kind),
                )
        return max(cur.rowcount, 0)

    def blocks(self) -> list[Block]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, account, report_id, note, blocked_at FROM report_blocks"
                " ORDER BY blocked_at, account"
            ).fetchall()
        return [Block(str(r[0]), str(r[1]), r[2], str(r[3]), float(r[4])) for r in rows]

    def refresh(self) -> tuple[frozenset[str], frozenset[str]]:
        """Re-read the blocks into `blocked_payers` and `blocked_nodes`; returns them."""
        blocks = self.blocks()
        self.blocked_payers = frozenset(b.account for b in blocks if b.kind == "payer")
        self.blocked_nodes = frozenset(b.account for b in blocks if b.kind == "node")
        return self.blocked_payers, self.blocked_nodes
