"""Audit a coordinator's published epochs folder from the files alone.

Anyone holding the folder (``epoch-NNNNNN.json``, ``epoch-NNNNNN.tree.json`` and
``receipts/0x<keccak>.json``) can recompute every epoch: each paid receipt with its worker's
and coordinator's signatures, the payer's signed authorization it is paid from, its value and
split under the published rules (the verifiers paid from its take included; the worker's
amount and take tier following the receipt's signed payout address), then what each
account earned, the cumulative leaves on top of the epoch before, the total and the Merkle
root. A coordinator that pays anyone a wei more
than the published evidence justifies, or drops evidence after the fact, is caught here.

What the files cannot prove (the chain's roots and stake snapshot are checked by
``sogni-coordinator epoch audit --chain-url``; the rest is out of reach of any file) is listed
in docs/AUDIT.md.

Pure and file-based: no chain access, nothing outside ``sogni_protocol``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sogni_protocol import epoch_math
from sogni_protocol.airdrop import airdrop_season
from sogni_protocol.airdrop_audit import airdrop_problem
from sogni_protocol.epoch_files import (
    EpochFile,
    Payout,
    ReceiptsBatch,
    content_hash,
    decode_batch,
    decode_epoch,
    epoch_filename,
    receipts_filename,
)
from sogni_protocol.merkle import MerkleTree

__all__ = [
    "AuditReport",
    "AuditedEpoch",
    "EpochAudit",
    "PublishedFolderError",
    "audit_folder",
    "iter_published",
]

_EPOCH_NAME = re.compile(r"^epoch-(\d{6,})\.json$")


class PublishedFolderError(Exception):
    """The published folder is missing, unreadable or holds no epoch file (one line)."""


@dataclass
class EpochAudit:
    """One epoch as audited: what its file states, and the first problem found (None: ok)."""

    epoch: int
    root: str
    total: int
    receipts: int
    problem: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "root": self.root,
            "total": str(self.total),
            "receipts": self.receipts,
            "problem": self.problem,
        }


@dataclass
class AuditReport:
    """Every epoch audited, in order, and each epoch's first problem (empty: all recomputed)."""

    epochs: list[EpochAudit] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, epochs: Iterable[EpochAudit]) -> AuditReport:
        """The report of these audited epochs (problems in epoch order)."""
        listed = list(epochs)
        return cls(listed, [e.problem for e in listed if e.problem is not None])

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "firstProblem": self.first_problem,
            "epochs": [e.as_json() for e in self.epochs],
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class AuditedEpoch:
    """An epoch's decoded files (None where unreadable) and its audit."""

    audit: EpochAudit
    file: EpochFile | None
    batch: ReceiptsBatch | None


class _Mismatch(Exception):
    """The first thing wrong with an epoch (internal: becomes `EpochAudit.problem`)."""


def audit_folder(path: Path, *, through: int | None = None) -> AuditReport:
    """Recompute every epoch in the published folder `path` (up to `through`, if given).

    Raises `PublishedFolderError` when the folder itself cannot be read; anything wrong
    inside it is a problem in the report, naming the epoch, the file and the job or account.
    """
    return AuditReport.of(a.audit for a in iter_published(path, through=through))


def iter_published(path: Path, *, through: int | None = None) -> Iterator[AuditedEpoch]:
    """Audit the folder epoch by epoch, yielding each epoch's decoded files with its audit.

    An epoch with a problem does not stop the audit: the next one is checked on top of the
    leaves and total its predecessor's file states (so each problem is reported where it is).
    A missing epoch does: it is the last one reported.
    """
    folder = Path(path)
    numbers = _epoch_numbers(folder)
    if through is not None:
        numbers = {n: p for n, p in numbers.items() if n <= through}
        last = through
    else:
        last = max(numbers)
    state = _State()
    for n in range(1, last + 1):
        audit = EpochAudit(epoch=n, root="", total=0, receipts=0, problem=None)
        ef: EpochFile | None = None
        batch: ReceiptsBatch | None = None
        try:
            file_path = numbers.get(n)
            if file_path is None:
                raise _Mismatch(f"{epoch_filename(n)} is missing (epochs must run 1, 2, 3, ...)")
            ef = _read_epoch(file_path, n)
            audit.root, audit.receipts = ef.root, 0
            audit.total = _int(ef.total, "total", file_path.name)
            season = airdrop_season(ef.receipts_file)
            if season is not None:  # a season's prizes (sogni_protocol.airdrop_audit)
                _check_airdrop(folder, ef, season, state)
            else:
                batch = _read_batch(folder, ef)
                audit.receipts = len(batch.receipts)
                _check(folder, ef, batch, state)
        except _Mismatch as exc:
            audit.problem = f"epoch {n}: {exc}"
        state.advance(ef, batch)
        yield AuditedEpoch(audit, ef, batch)
        if ef is None and numbers.get(n) is None:  # a gap: nothing after it is checkable
            return  # (and a lone epoch-100000000000.json must not cost 10^11 rounds)


def _check_airdrop(folder: Path, ef: EpochFile, season: int, state: _State) -> None:
    if not state.readable:
        raise _Mismatch(f"cannot be checked: epoch {ef.epoch - 1}'s file is unreadable")
    if state.chain_id is not None and (
        ef.chain_id != state.chain_id or ef.distributor.lower() != (state.distributor or "").lower()
    ):
        raise _Mismatch(f"{epoch_filename(ef.epoch)} is for another chain or distributor")
    why = airdrop_problem(folder, ef, season, state.leaves, state.total)
    if why is not None:
        raise _Mismatch(why)


# --- reading --------------------------------------------------------------------------------
def _epoch_numbers(folder: Path) -> dict[int, Path]:
    if not folder.exists():
        raise PublishedFolderError(f"published folder {folder} does not exist")
    if not folder.is_dir():
        raise PublishedFolderError(f"{folder} is not a folder")
    try:
        names = [p for p in folder.iterdir() if _EPOCH_NAME.match(p.name)]
    except OSError as exc:
        raise PublishedFolderError(f"cannot read {folder}: {exc.strerror or exc}") from None
    numbers: dict[int, Path] = {}
    for p in names:
        match = _EPOCH_NAME.match(p.name)
        assert match is not None
        n = int(match.group(1))
        if p.name != epoch_filename(n):  # e.g. epoch-0000001.json: not a name we publish
            continue
        numbers[n] = p
    if not numbers:
        raise PublishedFolderError(
            f"no epoch files (epoch-NNNNNN.json) in {folder}: is it the publish folder?"
        )
    return numbers


def _read_epoch(path: Path, n: int) -> EpochFile:
    try:
        ef = decode_epoch(path.read_bytes())
    except OSError as exc:
        raise _Mismatch(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _Mismatch(f"{path.name} is not a valid epoch file: {_line(exc)}") from None
    if ef.epoch != n:
        raise _Mismatch(f"{path.name} says it is epoch {ef.epoch}")
    return ef


def _read_batch(folder: Path, ef: EpochFile) -> ReceiptsBatch:
    where = epoch_filename(ef.epoch)
    try:
        digest = bytes.fromhex(ef.receipts_hash.removeprefix("0x"))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise _Mismatch(f"{where}: receiptsHash {ef.receipts_hash} is not a 32-byte hash")
    name = f"receipts/{receipts_filename(digest)}"
    if ef.receipts_file != name:
        raise _Mismatch(
            f"{where}: receiptsFile is {ef.receipts_file}, its receiptsHash names {name}"
        )
    # never follow a path from the file: the name is derived from the hash
    try:
        raw = (folder / name).read_bytes()
    except FileNotFoundError:
        raise _Mismatch(f"receipts file {name} is missing") from None
    except OSError as exc:
        raise _Mismatch(f"receipts file {name} cannot be read: {exc.strerror or exc}") from None
    actual = content_hash(raw)
    if actual != digest:
        raise _Mismatch(
            f"receipts file {name}: its bytes hash to 0x{actual.hex()}, not the receiptsHash "
            "its name and the epoch file give (edited after publication)"
        )
    try:
        return decode_batch(raw)
    except ValueError as exc:
        raise _Mismatch(f"receipts file {name} is not a valid batch: {_line(exc)}") from None


# --- the checks -----------------------------------------------------------------------------
@dataclass
class _State:
    """What the epochs before the current one established."""

    epoch: int = 0
    readable: bool = True
    """False when the previous epoch's file could not be read (nothing to build on)."""
    leaves: dict[str, int] = field(default_factory=dict)
    total: int = 0
    chain_id: int | None = None
    distributor: str | None = None
    network_id: str | None = None
    stake_block: int | None = None
    paid: dict[str, int] = field(default_factory=dict)
    """Job id -> the epoch that paid it."""
    refused: dict[str, int] = field(default_factory=dict)
    """Job id -> the epoch whose batch refused it."""
    restored: dict[str, int] = field(default_factory=dict)
    """Dispute case id -> the epoch whose batch paid its restoration (each case pays once)."""

    def advance(self, ef: EpochFile | None, batch: ReceiptsBatch | None) -> None:
        self.epoch += 1
        self.readable = ef is not None
        if ef is None:
            return
        try:
            self.leaves = {a: int(v) for a, v in ef.leaves}
            self.total = int(ef.total)
        except ValueError:
            self.readable = False
        if self.chain_id is None:
            self.chain_id, self.distributor = ef.chain_id, ef.distributor
        if ef.stake_block is not None:
            self.stake_block = max(self.stake_block or 0, ef.stake_block)
        if batch is not None:
            if self.network_id is None:
                self.network_id = batch.network_id
            for e in batch.receipts:
                self.paid.setdefault(e.job_id.lower(), ef.epoch)
            for r in batch.refused:
                self.refused.setdefault(r.job_id.lower(), ef.epoch)
            for c in batch.restorations:
                self.restored.setdefault(c.case_id.lower(), ef.epoch)


_JOB_ID = re.compile(r"0x[0-9a-f]{64}")


def _job_key(text: str, rfile: str) -> str:
    """A job id exactly as the coordinator writes it: one receipt has one spelling, so the
    paid-twice checks cannot be passed by writing it again as `AB..`, `0xAB..` or with
    spaces (all parse to the same signed bytes)."""
    if not _JOB_ID.fullmatch(text):
        raise _Mismatch(f"{rfile}: job id {text[:80]!r} is not 0x and 64 lower-case hex digits")
    return text


def _case_key(text: str, rfile: str) -> str:
    """A dispute case id in its one spelling (as `_job_key`): a won case pays once, so it
    cannot come back as `0xAB..` or without `0x` to be paid again."""
    if not _JOB_ID.fullmatch(text):
        raise _Mismatch(f"{rfile}: case id {text[:80]!r} is not 0x and 64 lower-case hex digits")
    return text


def _check(folder: Path, ef: EpochFile, batch: ReceiptsBatch, state: _State) -> None:
    n = ef.epoch
    where = epoch_filename(n)
    rfile = f"receipts file {ef.receipts_file}"

    # the batch is this epoch's, on this chain and distributor, as every epoch before
    if batch.epoch != n:
        raise _Mismatch(f"{rfile} is the batch of epoch {batch.epoch}")
    if batch.chain_id != ef.chain_id or batch.verifying_contract.lower() != ef.distributor.lower():
        raise _Mismatch(
            f"{rfile} is for chain {batch.chain_id} and distributor {batch.verifying_contract}, "
            f"{where} for chain {ef.chain_id} and distributor {ef.distributor}"
        )
    if state.chain_id is not None and (
        ef.chain_id != state.chain_id or ef.distributor.lower() != (state.distributor or "").lower()
    ):
        raise _Mismatch(
            f"{where} is for chain {ef.chain_id} and distributor {ef.distributor}, earlier "
            f"epochs for chain {state.chain_id} and distributor {state.distributor}"
        )
    if state.network_id is not None and batch.network_id != state.network_id:
        raise _Mismatch(
            f"{rfile} is for network {batch.network_id!r}, earlier epochs for {state.network_id!r}"
        )
    if batch.rules != ef.rules:
        raise _Mismatch(f"{where} states other rules than its {rfile}")
    if batch.stake_block != ef.stake_block:
        raise _Mismatch(
            f"{where} says stakes were read at block {ef.stake_block}, its {rfile} at "
            f"{batch.stake_block}"
        )
    if (
        batch.stake_block is not None
        and state.stake_block is not None
        and batch.stake_block < state.stake_block
    ):
        raise _Mismatch(
            f"{rfile}: stakes read at block {batch.stake_block}, before the previous "
            f"snapshot's block {state.stake_block}"
        )

    # the batch as a whole, then every receipt in it, recomputed
    why = _guard(epoch_math.batch_problem, batch)
    if why is not None:
        raise _Mismatch(f"{rfile}: {why}")
    seen: set[str] = set()
    for e in batch.receipts:
        job = _job_key(e.job_id, rfile)
        if job in seen:
            raise _Mismatch(f"{rfile}: job {e.job_id} is paid twice in this batch")
        seen.add(job)
        if job in state.paid:
            raise _Mismatch(f"{rfile}: job {e.job_id} was already paid in epoch {state.paid[job]}")
        if job in state.refused:
            raise _Mismatch(
                f"{rfile}: job {e.job_id} was refused in epoch {state.refused[job]} "
                "(a refused receipt is never paid)"
            )
        why = _guard(epoch_math.entry_problem, batch, e)
        if why is not None:
            raise _Mismatch(f"{rfile}: job {e.job_id}: {why}")
    for r in batch.refused:
        if _job_key(r.job_id, rfile) in seen:
            raise _Mismatch(f"{rfile}: job {r.job_id} is both paid and refused")

    # what the receipts earn, on top of the epoch before
    if not state.readable:
        raise _Mismatch(f"cannot be checked: epoch {n - 1}'s file is unreadable")
    cases: set[str] = set()
    for restored in batch.restorations:  # disputes won: their pay is in the leaves
        case = _case_key(restored.case_id, rfile)
        if case in cases:
            raise _Mismatch(f"{rfile}: case {case} is restored twice in this batch")
        cases.add(case)
        if case in state.restored:
            raise _Mismatch(
                f"{rfile}: case {case} was already restored in epoch {state.restored[case]}"
            )
        why = _guard(epoch_math.restoration_problem, batch, restored)
        if why is not None:
            raise _Mismatch(f"{rfile}: restoration of case {case}: {why}")
    try:
        earned = epoch_math.earned_by_account(batch.receipts, batch.restorations)
    except ValueError as exc:
        raise _Mismatch(f"{rfile}: malformed: {_line(exc)}") from None
    want = epoch_math.cumulative_leaves(state.leaves, earned)
    got = [(a, _int(v, f"leaf of {a}", where)) for a, v in ef.leaves]
    _compare_leaves(where, got, want, state.leaves)
    total = _int(ef.total, "total", where)
    leaf_sum = sum(v for _, v in got)
    if total != leaf_sum:
        raise _Mismatch(f"{where}: total is {total}, the leaves sum to {leaf_sum}")
    previous_total = _int(ef.previous_total, "previousTotal", where)
    if previous_total != state.total:
        raise _Mismatch(
            f"{where}: previousTotal is {previous_total}, epoch {n - 1}'s total is {state.total}"
        )
    if total < previous_total:
        raise _Mismatch(f"{where}: total {total} is below the previous total {previous_total}")

    # the root, the tree dump and the payouts list
    try:
        tree = MerkleTree(got)
    except ValueError as exc:
        raise _Mismatch(f"{where}: the leaves do not make a tree: {exc}") from None
    if ef.root.lower() != tree.root_hex:
        raise _Mismatch(f"{where}: root is {ef.root}, the leaves build {tree.root_hex}")
    _check_tree_dump(folder, n, tree)
    _check_payouts(where, ef.payouts, batch, earned, dict(want))


def _compare_leaves(
    where: str, got: list[tuple[str, int]], want: list[tuple[str, int]], before: dict[str, int]
) -> None:
    if got == want:
        return
    got_map, want_map = dict(got), dict(want)
    for account, amount in want:
        if account not in got_map:
            raise _Mismatch(f"{where}: account {account}: no leaf, the receipts give {amount}")
        if got_map[account] != amount:
            earned = amount - before.get(account, 0)
            raise _Mismatch(
                f"{where}: account {account}: leaf is {got_map[account]}, the receipts give "
                f"{amount} ({before.get(account, 0)} before + {earned} earned in this epoch)"
            )
    for account, amount in got:
        if account not in want_map:
            raise _Mismatch(
                f"{where}: account {account}: leaf of {amount} that no receipt or earlier "
                "epoch pays"
            )
    raise _Mismatch(f"{where}: the leaves are not listed once each, sorted by account")


def _check_tree_dump(folder: Path, n: int, tree: MerkleTree) -> None:
    path = folder / epoch_filename(n, "tree.json")
    if not path.exists():
        return
    try:
        dump = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise _Mismatch(f"{path.name} cannot be read: {_line(exc)}") from None
    if dump != tree.dump():
        raise _Mismatch(f"{path.name} is not the tree of the epoch file's leaves")


def _check_payouts(
    where: str,
    payouts: list[Payout],
    batch: ReceiptsBatch,
    earned: dict[str, int],
    cumulative: dict[str, int],
) -> None:
    want = epoch_math.payouts(batch.receipts, earned, cumulative)
    if payouts == want:
        return
    got_by = {p.account: p for p in payouts}
    for p in want:
        q = got_by.get(p.account)
        if q is None:
            raise _Mismatch(f"{where}: account {p.account}: earned {p.amount}, not in payouts")
        if q != p:
            raise _Mismatch(
                f"{where}: account {p.account}: payout says {q.amount} earned "
                f"({q.cumulative_amount} cumulative, {q.receipts} receipts), the receipts give "
                f"{p.amount} ({p.cumulative_amount}, {p.receipts})"
            )
    want_accounts = {p.account for p in want}
    for q in payouts:
        if q.account not in want_accounts:
            raise _Mismatch(f"{where}: account {q.account}: in payouts, earned nothing")
    raise _Mismatch(f"{where}: payouts are not listed once each, sorted by account")


# --- helpers --------------------------------------------------------------------------------
def _int(value: str, what: str, where: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise _Mismatch(f"{where}: {what} {value!r} is not a whole number") from None
    if out < 0:
        raise _Mismatch(f"{where}: {what} {value} is negative")
    return out


def _guard(check: Callable[..., str | None], *args: Any) -> str | None:
    """Run a recomputation; malformed data (bad hex, address or number) is a problem too."""
    try:
        return check(*args)
    except (ValueError, TypeError, OverflowError) as exc:
        return f"malformed: {_line(exc)}"


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
