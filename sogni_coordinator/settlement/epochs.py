"""Closing an epoch: stored receipts -> payouts -> cumulative Merkle root on chain.

Why the two steps (plan, then post) and their order: a crash may hit anywhere, and the chain
accepts exactly one root per epoch. So a close first *plans* (verifies receipts, splits their
value, builds the cumulative tree, writes the content-addressed receipts file) and commits the
plan and the "settled" mark of every receipt in it in one SQLite transaction; only then does
it post. A restart finds the planned epoch and finishes it instead of planning a new one,
and before posting it asks the chain (`rootOf(epoch)`): if our root is already there (crash
after posting, before recording it) it is only recorded. A receipt can therefore be in one
plan only (primary key), each epoch is posted at most once, and nobody is paid twice.

The tree is cumulative (every account ever paid, with its running total), so a claim against
the latest root pays what was not claimed yet, whatever epochs a worker skipped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from sogni_chain import ChainRevert, Deployment, Signer
from sogni_coordinator.store import EpochRecord, Store
from sogni_protocol import eip712
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    EPOCH_FORMAT,
    RECEIPTS_FORMAT,
    BatchEntry,
    EpochFile,
    Payout,
    ReceiptsBatch,
    Refusal,
    content_hash,
    decode_epoch,
    encode,
    epoch_filename,
    receipts_filename,
)
from sogni_protocol.errors import SignatureError
from sogni_protocol.logs import get_logger
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.messages import Receipt
from sogni_protocol.payout_rules import PayoutRules

__all__ = [
    "EpochConflict",
    "EpochResult",
    "SettlementError",
    "Settler",
    "epoch_claims",
]

log = get_logger(__name__)


class SettlementError(Exception):
    """An epoch could not be closed (the plan, if any, is kept and retried next time)."""


class EpochConflict(SettlementError):
    """The chain or another closer disagrees with this database: never resolved silently."""


@dataclass(frozen=True)
class EpochResult:
    """A closed epoch (``posted``: its root is on chain)."""

    epoch: int
    root: bytes
    total: int
    receipts_hash: bytes
    receipts_file: Path
    epoch_file: Path
    paid_receipts: int
    refused_receipts: int
    payouts: dict[str, int]
    """Account -> amount earned in this epoch (base units)."""
    posted: bool
    tx_hash: str | None
    resumed: bool
    """True when this call finished a plan an earlier (crashed) call had committed."""

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "root": "0x" + self.root.hex(),
            "total": str(self.total),
            "receiptsHash": "0x" + self.receipts_hash.hex(),
            "receiptsFile": str(self.receipts_file),
            "epochFile": str(self.epoch_file),
            "paidReceipts": self.paid_receipts,
            "refusedReceipts": self.refused_receipts,
            "payouts": {a: str(v) for a, v in self.payouts.items()},
            "posted": self.posted,
            "txHash": self.tx_hash,
            "resumed": self.resumed,
        }


class Settler:
    """Closes epochs for one coordinator database against one deployment.

    ``sender`` must hold SETTLEMENT_ROLE on the distributor. ``read_stake``: look up each
    worker's active stake on chain for its take-rate tier (else everyone pays tier 0).
    Receipts are re-verified here against the deployment's EIP-712 domain (chain id and
    distributor): a database carried over from another chain or deployment pays nothing.
    """

    def __init__(
        self,
        store: Store,
        deployment: Deployment,
        *,
        sender: Signer,
        rules: PayoutRules,
        publish_dir: str | Path,
        read_stake: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.deployment = deployment
        self.distributor = deployment.distributor
        self.sender = sender
        self.rules = rules
        self.publish_dir = Path(publish_dir)
        self.read_stake = read_stake
        self._clock = clock
        addrs = deployment.addresses
        self.domain = Domain(addrs.chain_id, addrs.distributor)

    # --- the whole close ----------------------------------------------------------------
    def close_epoch(self) -> EpochResult | None:
        """Finish a pending plan, or plan and post the next epoch; None if nothing to pay."""
        pending = self.store.last_epoch_record(state="planned")
        if pending is not None:
            return self.post(pending, resumed=True)
        record = self.plan_epoch()
        if record is None:
            return None
        return self.post(record, resumed=False)

    # --- step 1: plan --------------------------------------------------------------------
    def plan_epoch(self) -> EpochRecord | None:
        """Compute and commit the next epoch's plan (no chain writes); None if nothing new.

        A plan already pending is returned as is: one unposted plan at a time.
        """
        pending = self.store.last_epoch_record(state="planned")
        if pending is not None:
            return pending
        stored = self.store.unsettled_receipts()
        if not stored:
            return None
        paid: list[tuple[Receipt, bytes]] = []
        refused: list[Refusal] = []
        for s in stored:
            why = self._refusal(s.receipt, s.signature)
            if why is None:
                paid.append((s.receipt, s.signature))
            else:
                job = "0x" + s.receipt.job_id.hex()
                refused.append(Refusal(job_id=job, worker=s.receipt.worker, reason=why))
        if refused:
            log.warning("receipts_refused", count=len(refused), first=refused[0].reason)
        if not paid:
            self.store.save_refused([(bytes.fromhex(r.job_id[2:]), r.reason) for r in refused])
            return None

        last = self.store.last_epoch_record()
        db_epoch = last.epoch if last is not None else 0
        chain_epoch = self.distributor.latest_epoch()
        if chain_epoch > db_epoch:
            raise EpochConflict(
                f"the distributor has epoch {chain_epoch} posted but this database knows only "
                f"up to {db_epoch}: restore the database or settle against a new deployment"
            )
        epoch = db_epoch + 1
        previous = _leaves_of(last.plan) if last is not None else {}

        entries, earned, counts = self._split(paid)
        cumulative = dict(previous)
        for account, amount in earned.items():
            cumulative[account] = cumulative.get(account, 0) + amount
        leaves = sorted(cumulative.items())
        tree = MerkleTree(leaves)
        total = sum(cumulative.values())

        batch = ReceiptsBatch(
            format=RECEIPTS_FORMAT,
            epoch=epoch,
            chain_id=self.domain.chain_id,
            verifying_contract=to_checksum_address(self.domain.verifying_contract),
            rules=self.rules,
            receipts=sorted(entries, key=lambda e: e.job_id),
            refused=sorted(refused, key=lambda r: r.job_id),
        )
        batch_bytes = encode(batch)
        receipts_hash = content_hash(batch_bytes)
        receipts_name = receipts_filename(receipts_hash)
        atomic_write_bytes(self.publish_dir / "receipts" / receipts_name, batch_bytes)

        plan = EpochFile(
            format=EPOCH_FORMAT,
            epoch=epoch,
            chain_id=self.domain.chain_id,
            distributor=to_checksum_address(self.domain.verifying_contract),
            root=tree.root_hex,
            total=str(total),
            receipts_hash="0x" + receipts_hash.hex(),
            receipts_file=f"receipts/{receipts_name}",
            closed_at=int(self._clock()),
            rules=self.rules,
            payouts=[
                Payout(
                    account=a,
                    amount=str(earned[a]),
                    cumulative_amount=str(cumulative[a]),
                    receipts=counts.get(a, 0),
                )
                for a in sorted(earned)
            ],
            leaves=[(a, str(v)) for a, v in leaves],
        )
        plan_bytes = encode(plan)
        try:
            self.store.save_epoch_plan(
                epoch,
                root=tree.root,
                total=total,
                receipts_hash=receipts_hash,
                plan=plan_bytes,
                paid=[r.job_id for r, _ in paid],
                refused=[(bytes.fromhex(r.job_id[2:]), r.reason) for r in refused],
            )
        except sqlite3.IntegrityError as exc:
            raise EpochConflict(
                f"another closer planned epoch {epoch} (or some of its receipts) first: {exc}"
            ) from None
        log.info(
            "epoch_planned",
            epoch=epoch,
            receipts=len(paid),
            refused=len(refused),
            accounts=len(earned),
            leaves=len(leaves),
            total=str(total),
        )
        record = self.store.epoch_record(epoch)
        assert record is not None
        self._publish(record, tree)
        return record

    def _refusal(self, receipt: Receipt, signature: bytes) -> str | None:
        try:
            signer = eip712.recover_receipt_signer(self.domain, receipt, signature)
        except SignatureError as exc:
            return f"bad signature: {exc}"
        if not eip712.same_address(signer, receipt.worker):
            return (
                "signature is not the worker's under this chain and distributor "
                f"(chain {self.domain.chain_id}, {self.domain.verifying_contract})"
            )
        return None

    def _split(
        self, paid: list[tuple[Receipt, bytes]]
    ) -> tuple[list[BatchEntry], dict[str, int], dict[str, int]]:
        workers = {to_checksum_address(r.worker) for r, _ in paid}
        stakes: dict[str, int | None] = dict.fromkeys(workers)
        if self.read_stake:
            for w in workers:
                stakes[w] = self.deployment.staking.active_stake(w)
        take = {w: self.rules.take_bps(stakes[w]) for w in workers}
        entries: list[BatchEntry] = []
        earned: dict[str, int] = {}
        counts: dict[str, int] = {}
        for receipt, signature in paid:
            worker = to_checksum_address(receipt.worker)
            split = self.rules.split(receipt.work_units, receipt.model_id, take[worker])
            entries.append(
                BatchEntry.of(
                    receipt,
                    signature,
                    take_bps=take[worker],
                    worker_amount=split.worker,
                    creator=split.creator,
                    creator_amount=split.creator_amount,
                )
            )
            earned[worker] = earned.get(worker, 0) + split.worker
            counts[worker] = counts.get(worker, 0) + 1
            if split.creator is not None and split.creator_amount:
                earned[split.creator] = earned.get(split.creator, 0) + split.creator_amount
        return entries, earned, counts

    def _publish(self, record: EpochRecord, tree: MerkleTree | None = None) -> Path:
        """(Re)write the epoch file and tree dump from the committed plan: idempotent."""
        path = self.publish_dir / epoch_filename(record.epoch)
        atomic_write_bytes(path, record.plan)
        tree_path = self.publish_dir / epoch_filename(record.epoch, "tree.json")
        if tree is None and not tree_path.exists():  # crashed before writing it
            tree = MerkleTree(decode_epoch(record.plan).leaf_ints())
        if tree is not None:
            atomic_write_bytes(tree_path, json.dumps(tree.dump(), separators=(",", ":")).encode())
        return path

    # --- step 2: post --------------------------------------------------------------------
    def post(self, record: EpochRecord, *, resumed: bool = False) -> EpochResult:
        """Put a planned epoch's root on chain, exactly once."""
        plan = decode_epoch(record.plan)
        epoch_file = self._publish(record)
        tx_hash: str | None = record.tx_hash
        if record.state != "posted":
            onchain = self.distributor.root_of(record.epoch)
            if onchain is None:
                try:
                    tx = self.distributor.post_root(
                        record.epoch,
                        record.root,
                        record.total,
                        record.receipts_hash,
                        sender=self.sender,
                    )
                    tx_hash = tx.hash
                except ChainRevert as exc:
                    if exc.error != "RootAlreadyPosted":
                        raise SettlementError(
                            f"posting epoch {record.epoch} failed: {exc.reason} "
                            "(the plan is kept; closing again retries it)"
                        ) from None
                    onchain = self.distributor.root_of(record.epoch)
            if onchain is not None and onchain != record.root:
                raise EpochConflict(
                    f"epoch {record.epoch} has root 0x{onchain.hex()} on chain, "
                    f"not this plan's 0x{record.root.hex()}"
                )
            self.store.mark_epoch_posted(record.epoch, tx_hash)
            log.info("epoch_posted", epoch=record.epoch, tx=tx_hash, resumed=resumed)
        counts = {e: (p, r) for e, _state, _total, p, r in self.store.epoch_summaries()}
        paid_n, refused_n = counts.get(record.epoch, (0, 0))
        return EpochResult(
            epoch=record.epoch,
            root=record.root,
            total=record.total,
            receipts_hash=record.receipts_hash,
            receipts_file=self.publish_dir / plan.receipts_file,
            epoch_file=epoch_file,
            paid_receipts=paid_n,
            refused_receipts=refused_n,
            payouts={p.account: int(p.amount) for p in plan.payouts},
            posted=True,
            tx_hash=tx_hash,
            resumed=resumed,
        )


def _leaves_of(plan: bytes) -> dict[str, int]:
    return dict(decode_epoch(plan).leaf_ints())


def epoch_claims(record: EpochRecord) -> dict[str, Any]:
    """What `epoch show --json` prints: root, receiptsHash and every claim with its proof."""
    plan = decode_epoch(record.plan)
    leaves = plan.leaf_ints()
    tree = MerkleTree(leaves)
    if tree.root != record.root:  # pragma: no cover - the plan and its row are one commit
        raise SettlementError(f"epoch {record.epoch}: stored leaves do not build its root")
    return {
        "epoch": record.epoch,
        "root": "0x" + record.root.hex(),
        "receiptsHash": "0x" + record.receipts_hash.hex(),
        "total": str(record.total),
        "state": record.state,
        "txHash": record.tx_hash,
        "receiptsFile": plan.receipts_file,
        "chainId": plan.chain_id,
        "distributor": plan.distributor,
        "claims": [
            {
                "account": account,
                "cumulativeAmount": str(amount),
                "proof": ["0x" + p.hex() for p in tree.proof(i)],
            }
            for i, (account, amount) in enumerate(leaves)
        ],
    }
