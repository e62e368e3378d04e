"""A node's rewards: audit the coordinator's published epochs against its own journal, claim.

Why a node audits at all: the coordinator computes payouts, but the node holds the evidence
(every receipt it signed, in its journal). For each published epoch it checks that the
receipts batch is the one whose hash is posted on chain, that every receipt the coordinator
accepted from it is in a batch exactly as signed, that each receipt's split follows the
epoch's published rules, and that its leaf in the cumulative tree equals the sum of what the
batches say it earned (as worker, creator, and verifier of other nodes' jobs). Anything else
is reported as a problem (and `sogni-node rewards` exits non-zero), never silently accepted.

Inputs are files (the coordinator's `epochs/` folder: `epoch-N.json`, `receipts/0x<hash>.json`,
fetched and checked by `sogni_node.epoch_fetch`, or a local copy) and, when a chain is
reachable, the distributor (roots, receipts hashes, claimed amounts).

Claims verify against the distributor's newest *matured* root (a root waits `claimDelay`
seconds after it is posted), so the proof is always built from that epoch's tree
(`plan_claim`), not from the latest file. A claim is sent by the node wallet (`submit_claim`,
which needs ETH for gas: `gas_shortfall` says how much is missing) or by a coordinator's
relayer (`sogni_node.epoch_fetch.relay_claim`); either may stake a share of it at once
(`claimAndStake`, `stake_bps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sogni_node.journal import JournalReceipt
from sogni_node.payout import payout_of, signed_form
from sogni_protocol import eip712, epoch_math
from sogni_protocol.airdrop import airdrop_season, prizes_by_account
from sogni_protocol.airdrop_audit import read_evidence
from sogni_protocol.cli_errors import no_funds
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    RECEIPTS_FORMAT,
    BatchEntry,
    EpochFile,
    ReceiptsBatch,
    content_hash,
    decode_batch,
    decode_epoch,
    receipts_filename,
)
from sogni_protocol.errors import SignatureError
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.messages import Receipt

if TYPE_CHECKING:
    from sogni_chain import Distributor, Signer

__all__ = [
    "MAX_DISPUTE_WINDOW_S",
    "PENDING_GRACE_S",
    "ClaimPlan",
    "ClaimResult",
    "EpochRewards",
    "NoGas",
    "NotMatured",
    "PublicationError",
    "PublishedEpoch",
    "RewardsReport",
    "audit",
    "claim",
    "claim_from_tree",
    "format_sogni",
    "gas_shortfall",
    "load_published",
    "parse_sogni",
    "plan_claim",
    "stake_bps_of",
    "submit_claim",
]

SOGNI = 10**18
PENDING_GRACE_S = 1800.0
"""Slack on top of the dispute window before an unbatched receipt is called missing: a receipt
held by a check waits for it (up to `restart_recheck_timeout`, 900 s, after a coordinator
restart, plus the check's own timeouts), one whose ledger settlement is queued waits an epoch,
and the node's and the coordinator's clocks differ a little. The journal cannot tell a held
receipt from a released one (both are acked "accepted"), so this covers them all."""
MAX_DISPUTE_WINDOW_S = 30 * 86_400.0
"""The largest `[verification] dispute_window` a coordinator accepts: a receipt enters an epoch
only that long after it was stored, and batches do not publish the window. Without a window
given or proven by the node's own paid receipts (`_window_bound`), an unbatched receipt is
pending, not missing, until it is this old at the latest close."""


class PublicationError(Exception):
    """A published epoch file or receipts batch is missing, malformed or inconsistent."""


class NotMatured(Exception):
    """No posted root has matured yet: nothing can be claimed before `opens_at`."""

    def __init__(self, opens_at: int | None) -> None:
        when = (
            f": claims open at {_utc(opens_at)}" if opens_at else ": no reward root is posted yet"
        )
        super().__init__("no reward root has matured yet" + when)
        self.opens_at = opens_at


@dataclass(frozen=True)
class PublishedEpoch:
    """An epoch file with its receipts batch, both checked for internal consistency."""

    file: EpochFile
    batch: ReceiptsBatch
    tree: MerkleTree
    path: Path
    prizes: dict[str, int] = field(default_factory=dict)
    """A season's airdrop epoch: account (lowercase) -> its prizes; its batch is empty."""

    @property
    def epoch(self) -> int:
        return self.file.epoch

    @property
    def domain(self) -> Domain:
        return Domain(self.batch.chain_id, self.batch.verifying_contract)


def load_published(epochs_dir: Path) -> list[PublishedEpoch]:
    """Every ``epoch-N.json`` under ``epochs_dir`` with its batch, by epoch.

    Checks that the batch's keccak256 is the file's ``receiptsHash`` (the content address),
    that both name the same epoch and chain, and that the leaves build the stated root.
    """
    out: list[PublishedEpoch] = []
    for path in sorted(Path(epochs_dir).glob("epoch-*.json")):
        if path.name.endswith(".tree.json"):
            continue
        try:
            ef = decode_epoch(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PublicationError(f"{path}: {exc}") from None
        receipts_hash = _unhex(ef.receipts_hash)
        if airdrop_season(ef.receipts_file) is not None:  # season prizes (protocol/airdrop.py)
            out.append(_airdrop_epoch(Path(epochs_dir), ef, path))
            continue
        # never follow a path from the file: the name is derived from the hash
        batch_path = Path(epochs_dir) / "receipts" / receipts_filename(receipts_hash)
        try:
            raw = batch_path.read_bytes()
        except OSError:
            raise PublicationError(
                f"epoch {ef.epoch}: receipts batch {batch_path} missing"
            ) from None
        if content_hash(raw) != receipts_hash:
            raise PublicationError(f"epoch {ef.epoch}: {batch_path} does not hash to its name")
        try:
            batch = decode_batch(raw)
        except ValueError as exc:
            raise PublicationError(f"{batch_path}: {exc}") from None
        if (batch.epoch, batch.chain_id) != (ef.epoch, ef.chain_id) or (
            batch.verifying_contract.lower() != ef.distributor.lower()
        ):
            raise PublicationError(f"epoch {ef.epoch}: batch is for another epoch or chain")
        tree = MerkleTree(ef.leaf_ints())
        if tree.root_hex != ef.root.lower():
            raise PublicationError(f"epoch {ef.epoch}: leaves do not build root {ef.root}")
        out.append(PublishedEpoch(ef, batch, tree, path))
    out.sort(key=lambda p: p.epoch)
    return out


def _airdrop_epoch(folder: Path, ef: EpochFile, path: Path) -> PublishedEpoch:
    """An airdrop epoch: its evidence checked like a batch, its prizes by account."""
    season = airdrop_season(ef.receipts_file)
    assert season is not None
    ev = read_evidence(folder, ef, season)
    if isinstance(ev, str):
        raise PublicationError(f"epoch {ef.epoch}: {ev}")
    if (ev.epoch, ev.chain_id) != (ef.epoch, ef.chain_id) or not _same(
        ev.distributor, ef.distributor
    ):
        raise PublicationError(f"epoch {ef.epoch}: airdrop evidence is for another epoch or chain")
    tree = MerkleTree(ef.leaf_ints())
    if tree.root_hex != ef.root.lower():
        raise PublicationError(f"epoch {ef.epoch}: leaves do not build root {ef.root}")
    empty = ReceiptsBatch(
        format=RECEIPTS_FORMAT,
        epoch=ef.epoch,
        chain_id=ef.chain_id,
        verifying_contract=ef.distributor,
        network_id="",
        rules=ef.rules,
        stake_block=None,
        stakes={},
        free_requested="0",
        receipts=[],
    )
    prizes = {a.lower(): v for a, v in prizes_by_account(ev).items()}
    return PublishedEpoch(ef, empty, tree, path, prizes)


@dataclass(frozen=True)
class EpochRewards:
    epoch: int
    earned: int
    """This account's amounts in the epoch's batch (worker pay plus any creator share)."""
    cumulative: int
    """Its leaf in the epoch's tree (0 when absent)."""
    receipts: int
    root: str
    onchain: bool | None
    """Root and receiptsHash match the distributor (None: no chain to ask)."""


@dataclass
class RewardsReport:
    account: str
    epochs: list[EpochRewards] = field(default_factory=list)
    earned: int = 0
    """Cumulative amount in the latest epoch's tree."""
    claimed: int | None = None
    claimable: int | None = None
    """What a claim pays now: the leaf in the newest matured epoch minus what was claimed."""
    matured_epoch: int | None = None
    """The epoch claims verify against now (None: no chain to ask; 0: none matured yet)."""
    verified: int = 0
    """Journal receipts found in a batch, identical and correctly split."""
    pending: list[str] = field(default_factory=list)
    """Accepted receipts not yet in any batch (too recent for the last close: `audit`)."""
    unpaid: list[str] = field(default_factory=list)
    """Receipts for free work (no payer): accepted, and never paid on chain by design."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "earned": str(self.earned),
            "claimed": None if self.claimed is None else str(self.claimed),
            "claimable": None if self.claimable is None else str(self.claimable),
            "maturedEpoch": self.matured_epoch,
            "verifiedReceipts": self.verified,
            "pendingReceipts": self.pending,
            "unpaidReceipts": self.unpaid,
            "problems": self.problems,
            "ok": self.ok,
            "epochs": [
                {
                    "epoch": e.epoch,
                    "earned": str(e.earned),
                    "cumulative": str(e.cumulative),
                    "receipts": e.receipts,
                    "root": e.root,
                    "onchain": e.onchain,
                    "claimed": None if self.claimed is None else self.claimed >= e.cumulative,
                }
                for e in self.epochs
            ],
        }


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s[2:] if s.startswith(("0x", "0X")) else s)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.lower() == b.lower()


def _split_problem(pe: PublishedEpoch, e: BatchEntry) -> str | None:
    """Why ``e`` is not what the epoch's rules pay for it (recomputed from the batch), or None."""
    return epoch_math.entry_problem(pe.batch, e)


def audit(
    account: str,
    journal: Iterable[JournalReceipt],
    epochs: Sequence[PublishedEpoch],
    *,
    distributor: Distributor | None = None,
    worker: str | None = None,
    dispute_window: float | None = None,
) -> RewardsReport:
    """Check the published epochs against the journal of ``worker`` (the signing wallet;
    default ``account``), whose receipts pay ``account`` (its payout address, or itself),
    and the chain, if given. Earnings and the leaf are ``account``'s: every receipt paying it
    counts, whichever wallet signed it (a payout address collects several containers'), and
    so does its restored pay for disputes it won (the batch's ``restorations``).

    A receipt in no batch is *missing* only once it was recorded more than the coordinator's
    dispute window plus `PENDING_GRACE_S` before the latest close (else it is *pending*: the
    settler had to leave it out). ``dispute_window`` (seconds) is that window if the caller
    knows it; else the tightest one the node's own paid receipts prove, at most
    `MAX_DISPUTE_WINDOW_S`."""
    worker = worker if worker is not None else account
    payout = payout_of(account, worker)
    report = RewardsReport(account=account)
    if not epochs:
        return report
    domain = epochs[-1].domain
    coordinators = {e.coordinator.lower() for pe in epochs for e in pe.batch.receipts}
    by_job: dict[str, tuple[PublishedEpoch, BatchEntry]] = {}
    refused: dict[str, str] = {}
    running = 0
    contiguous = epochs[0].epoch == 1
    previous_epoch = 0
    for pe in epochs:
        if pe.domain != domain:
            report.problems.append(f"epoch {pe.epoch} is for another chain or distributor")
        contiguous = contiguous and pe.epoch == previous_epoch + 1
        previous_epoch = pe.epoch
        earned = mine = 0
        for e in pe.batch.receipts:
            by_job[e.job_id.lower()] = (pe, e)
            if _same(e.payee, account):
                earned += int(e.worker_amount)
                mine += 1
                why = _split_problem(pe, e)
                if why:
                    report.problems.append(f"epoch {pe.epoch} job {e.job_id}: {why}")
            if _same(e.creator, account):
                earned += int(e.creator_amount)
            for v in e.verifiers:  # paid from the take for checking another node's job
                if _same(v.account, account):
                    earned += int(v.amount)
        for refusal in pe.batch.refused:
            refused[refusal.job_id.lower()] = refusal.reason
        for restored in pe.batch.restorations:  # a dispute this account won: its pay restored
            if _same(restored.payee, account):
                earned += int(restored.amount)
        earned += pe.prizes.get(account.lower(), 0)  # a season's prizes (airdrop epoch)
        running += earned
        try:
            leaf = pe.tree.amount_of(account)
        except KeyError:
            leaf = 0
        if contiguous and leaf != running:
            report.problems.append(
                f"epoch {pe.epoch}: leaf is {leaf} but the batches so far add up to {running}"
            )
        onchain: bool | None = None
        if distributor is not None:
            onchain = distributor.root_of(pe.epoch) == _unhex(pe.file.root) and (
                distributor.receipts_hash_of(pe.epoch) == _unhex(pe.file.receipts_hash)
            )
            if not onchain:
                report.problems.append(f"epoch {pe.epoch}: root or receiptsHash differ on chain")
        report.epochs.append(EpochRewards(pe.epoch, earned, leaf, mine, pe.file.root, onchain))
    if not contiguous:
        report.problems.append("epoch files are not contiguous from 1: leaf totals unchecked")

    ours: list[tuple[JournalReceipt, Receipt]] = []
    for jr in journal:
        r = signed_form(jr.receipt, jr.domain_version, payout)
        if jr.accepted is False or not _same(r.worker, worker):
            continue
        if r.coordinator.lower() not in coordinators:
            continue  # another coordinator's work: its own epochs settle it
        if (
            jr.chain_id is not None
            and jr.verifying_contract is not None
            and (
                jr.chain_id != domain.chain_id
                or not _same(jr.verifying_contract, domain.verifying_contract)
            )
        ):
            continue  # signed for another deployment: never payable here
        ours.append((jr, r))
    window = dispute_window if dispute_window is not None else _window_bound(ours, by_job)
    missing_before = epochs[-1].file.closed_at - window - PENDING_GRACE_S
    for jr, r in ours:
        job = "0x" + r.job_id.hex()
        found = by_job.get(job)
        if found is None:
            if refused.get(job) == epoch_math.NO_PAYER:
                report.unpaid.append(job)  # free work: never paid on chain, not a fault
            elif job in refused:
                report.problems.append(f"job {job} refused by the coordinator: {refused[job]}")
            elif jr.accepted and jr.recorded_at < missing_before:
                report.problems.append(f"job {job} accepted but missing from every batch")
            else:
                report.pending.append(job)
            continue
        pe, entry = found
        if entry.receipt() != r or entry.signature_bytes != jr.signature:
            report.problems.append(f"job {job}: epoch {pe.epoch} batch differs from the journal")
            continue
        try:
            eip712.verify_receipt(pe.domain, r, jr.signature, worker)
        except SignatureError:
            report.problems.append(f"job {job}: signature does not verify under the epoch domain")
            continue
        if not _same(entry.payee, account):
            report.problems.append(f"job {job}: epoch {pe.epoch} pays {entry.payee}, not {account}")
            continue
        report.verified += 1

    report.earned = report.epochs[-1].cumulative
    if distributor is not None:
        report.claimed = distributor.claimed(account)
        report.matured_epoch = distributor.matured_epoch()
        matured = [e.cumulative for e in report.epochs if e.epoch == report.matured_epoch]
        report.claimable = max(0, (matured[0] if matured else 0) - report.claimed)
    return report


def _window_bound(
    ours: Sequence[tuple[JournalReceipt, Receipt]],
    by_job: dict[str, tuple[PublishedEpoch, BatchEntry]],
) -> float:
    """The longest dispute window the coordinator can have now, by the node's own evidence:
    a receipt paid in epoch k was stored at least the window before k closed, so the window
    is at most that gap for each of ours in the newest epoch that paid any (older epochs may
    predate a change of the setting); `MAX_DISPUTE_WINDOW_S` when none was paid yet."""
    newest: dict[int, float] = {}
    for jr, r in ours:
        found = by_job.get("0x" + r.job_id.hex())
        if found is None:
            continue
        pe = found[0]
        gap = max(0.0, pe.file.closed_at - jr.recorded_at)
        newest[pe.epoch] = min(newest.get(pe.epoch, gap), gap)
    if not newest:
        return MAX_DISPUTE_WINDOW_S
    return min(newest[max(newest)], MAX_DISPUTE_WINDOW_S)


def claim(distributor: Distributor, account: Signer, epochs: Sequence[PublishedEpoch]) -> int:
    """Claim everything due against the newest matured root; returns the amount paid (0: none).

    Raises `NotMatured` before any root has matured, `PublicationError` when the matured
    epoch is not among ``epochs`` (the proof must be against the root the contract checks).
    """
    plan = plan_claim(distributor, distributor.chain.address_of(account), epochs)
    if plan is None:
        return 0
    return submit_claim(distributor, account, plan).amount


def claim_from_tree(distributor: Distributor, account: Signer, tree: MerkleTree) -> int:
    """Claim ``account``'s leaf of ``tree`` (the matured root's tree); 0 when nothing is due."""
    address = distributor.chain.address_of(account)
    try:
        cumulative, proof = tree.proof_for(address)
    except KeyError:
        return 0
    if cumulative <= distributor.claimed(address):
        return 0
    tx = distributor.claim(address, cumulative, proof, sender=account)
    return int(tx.event("Claimed")["amount"])


@dataclass(frozen=True)
class ClaimPlan:
    """What `account` can claim now: its leaf in the newest matured epoch, with the proof."""

    account: str
    epoch: int
    cumulative: int
    proof: list[bytes]
    already: int

    @property
    def due(self) -> int:
        return self.cumulative - self.already


@dataclass(frozen=True)
class ClaimResult:
    amount: int
    staked: int
    tx_hash: str


def plan_claim(
    distributor: Distributor, account: str, epochs: Sequence[PublishedEpoch]
) -> ClaimPlan | None:
    """The claim against the newest matured root, or None when nothing is due.

    `NotMatured` before a root has matured; `PublicationError` when that epoch's file is not
    in ``epochs`` or its root is not the one on chain.
    """
    matured = distributor.matured_epoch()
    if matured == 0:
        first = distributor.matures_at(1) if distributor.latest_epoch() else None
        raise NotMatured(first)
    match = [pe for pe in epochs if pe.epoch == matured]
    if not match:
        raise PublicationError(
            f"the chain's newest matured epoch {matured} is not in the published epoch files"
        )
    tree = match[0].tree
    if distributor.root_of(matured) != tree.root:
        raise PublicationError(f"epoch {matured}: the published root is not the one on chain")
    try:
        cumulative, proof = tree.proof_for(account)
    except KeyError:
        return None
    already = distributor.claimed(account)
    if cumulative <= already:
        return None
    return ClaimPlan(account, matured, cumulative, list(proof), already)


def stake_bps_of(share: float) -> int:
    """A stake share (0..1) in basis points, as `claimAndStake` takes it."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"stake share must be between 0 and 1, not {share}")
    return round(share * 10_000)


def _claim_call(distributor: Distributor, plan: ClaimPlan, stake_bps: int, deadline: int) -> Any:
    """The contract call the wallet itself would send (for gas estimates)."""
    fn = distributor.contract.functions
    if stake_bps > 0:
        return fn.claimAndStake(plan.account, plan.cumulative, plan.proof, stake_bps, deadline, b"")
    return fn.claim(plan.account, plan.cumulative, plan.proof)


def gas_shortfall(
    distributor: Distributor,
    plan: ClaimPlan,
    *,
    stake_bps: int = 0,
    deadline: int = 0,
    sender: str | None = None,
) -> tuple[int, int] | None:
    """`(needed, balance)` in wei when `sender` (default: the claiming account) cannot pay
    the claim's gas, else None. Anyone may send a plain claim: the tokens go to the account.

    Estimated from the node's fees now (room for the base fee to double, as `Chain.send`
    offers). A claim the contract would refuse raises its `ChainRevert` here.
    """
    chain = distributor.chain
    w3 = chain.w3
    call = _claim_call(distributor, plan, stake_bps, deadline)
    from eth_tester.exceptions import TransactionFailed
    from web3.exceptions import ContractLogicError

    try:
        payer = sender if sender is not None else plan.account
        gas = int(call.estimate_gas({"from": payer, "value": 0}) * chain.gas_margin)
    except (ContractLogicError, TransactionFailed) as exc:
        raise chain.errors.from_exception(exc) from None
    except Exception as exc:
        if not no_funds(exc):
            raise
        gas = 300_000  # the node estimates with the sender's balance: it has none
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0))
    price = 2 * base_fee + int(w3.eth.max_priority_fee)
    needed = gas * price
    balance = chain.eth_balance(payer)
    return (needed, balance) if balance < needed or balance == 0 else None


class NoGas(Exception):
    """The wallet has too little ETH to send its own claim."""


def submit_claim(
    distributor: Distributor,
    account: Signer,
    plan: ClaimPlan,
    *,
    stake_bps: int = 0,
    deadline: int = 0,
) -> ClaimResult:
    """Send the claim from the wallet itself (it pays the gas; `NoGas` if it cannot).

    With ``stake_bps`` it is `claimAndStake` (no signature needed: the sender is the account).
    """
    try:
        if stake_bps > 0:
            tx = distributor.claim_and_stake(
                plan.account, plan.cumulative, plan.proof, stake_bps, deadline, b"", sender=account
            )
            staked = int(tx.event("AutoStaked")["staked"])
        else:
            tx = distributor.claim(plan.account, plan.cumulative, plan.proof, sender=account)
            staked = 0
    except Exception as exc:
        if no_funds(exc):
            raise NoGas(f"{plan.account} has too little ETH to pay the claim's gas") from None
        raise
    return ClaimResult(int(tx.event("Claimed")["amount"]), staked, tx.hash)


def _utc(ts: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_sogni(text: str) -> int:
    """``"12.5"`` SOGNI -> base units; refuses zero, negatives, non-finite numbers, more
    than 18 decimals and more than a uint256 holds (`ValueError`). The rules are
    `cli_errors.parse_amount`'s, the one amount parser."""
    from sogni_protocol.cli_errors import BadUsage, parse_amount

    try:
        return parse_amount(text)
    except BadUsage as exc:
        raise ValueError(exc.what) from None


def format_sogni(amount: int) -> str:
    """Base units -> SOGNI with up to 18 decimals, trailing zeros trimmed."""
    whole, frac = divmod(amount, SOGNI)
    return f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole)
