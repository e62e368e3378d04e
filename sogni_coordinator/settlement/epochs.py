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

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from sogni_chain import ChainRevert, Deployment, Signer
from sogni_coordinator.disputes import Restorations
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.network_params import NetworkParamsReader
from sogni_coordinator.storage.session_lock import LockHeld, exclusive
from sogni_coordinator.store import EpochRecord, Store, StoredReceipt
from sogni_protocol import eip712, epoch_math
from sogni_protocol.airdrop import airdrop_season
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    EPOCH_FORMAT,
    RECEIPTS_FORMAT,
    BatchEntry,
    EpochFile,
    OfferRecord,
    PayerSettlement,
    ReceiptsBatch,
    Refusal,
    Restoration,
    content_hash,
    decode_batch,
    decode_epoch,
    encode,
    epoch_filename,
    receipts_filename,
)
from sogni_protocol.errors import SignatureError
from sogni_protocol.logs import get_logger
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.payout_rules import PayoutRules

__all__ = [
    "EpochConflict",
    "EpochResult",
    "SettlementBusy",
    "SettlementError",
    "Settler",
    "check_unsigned",
    "epoch_claims",
    "sign_offline",
]

log = get_logger(__name__)

ENDED_UNSETTLED = (
    "its request ended (and was refunded) before this receipt was settled: nothing was "
    "charged for it"
)
"""The refusal of a receipt that committed after its job was given up (its node's last
attempt ran out while the receipt was being written): it waited in every epoch before."""

MAX_RECEIPTS_PER_EPOCH = 20_000
"""Receipts one epoch takes at most, oldest first (the rest go into the next, closed at once):
its receipts batch (~1.9 KB a receipt) stays well under `ids.EPOCH_FILE_LIMIT` (64 MiB), the
most any node fetches. Uncapped, a busy hour's batch was refused by every node: none could
audit or claim that epoch, nor any after it."""

UNSIGNED_FORMAT = "sogni-unsigned-post-root-v1"
SIGNED_FORMAT = "sogni-signed-post-root-v1"
_POST_ROOT = keccak(b"postRoot(uint256,bytes32,uint256,bytes32)")[:4]
_POST_ROOT_ARGS = ["uint256", "bytes32", "uint256", "bytes32"]


class SettlementError(Exception):
    """An epoch could not be closed (the plan, if any, is kept and retried next time)."""


class EpochConflict(SettlementError):
    """The chain or another closer disagrees with this database: never resolved silently."""


class SettlementBusy(SettlementError):
    """Another coordinator on the same database is closing an epoch now."""


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
    unsigned_tx: Path | None = None
    """With an offline settlement key: the unsigned `postRoot` awaiting its signature."""

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
            "unsignedTx": None if self.unsigned_tx is None else str(self.unsigned_tx),
        }


class Settler:
    """Closes epochs for one coordinator database against one deployment.

    ``sender`` must hold SETTLEMENT_ROLE on the distributor. ``read_stake``: look up each
    payee's active stake on chain for its receipts' take-rate tier (else everyone pays tier
    0); the payee is the receipt's signed payout address, else its worker: an ephemeral
    container's signing key stakes nothing, the account it pays does.
    Receipts are re-verified here against the deployment's EIP-712 domain (chain id and
    distributor): a database carried over from another chain or deployment pays nothing.
    ``dispute_window`` (seconds, `[verification] dispute_window`): a receipt enters an epoch
    only once that long has passed since it was stored, so a dispute can still keep it out.
    """

    def __init__(
        self,
        store: Store,
        deployment: Deployment,
        *,
        sender: Signer | None,
        rules: PayoutRules,
        publish_dir: str | Path,
        ledger: Ledger | None = None,
        network_id: str = "sogni-local",
        read_stake: bool = True,
        dispute_window: float = 0.0,
        clock: Callable[[], float] = time.time,
        params: NetworkParamsReader | None = None,
        confirmations: int = 0,
    ) -> None:
        self.params = params
        """Governed parameters (docs/GOVERNANCE.md), folded into ``rules`` at each plan."""
        self.store = store
        self.ledger = ledger if ledger is not None else Ledger(store.path)
        self.network_id = network_id
        self.deployment = deployment
        self.distributor = deployment.distributor
        self.sender = sender
        self.rules = rules
        self.publish_dir = Path(publish_dir)
        self.read_stake = read_stake
        self.dispute_window = dispute_window
        self.confirmations = confirmations
        """Blocks behind the head that stakes are read at (`[settlement] confirmations`)."""
        self.max_receipts = MAX_RECEIPTS_PER_EPOCH
        self.more_waiting = False
        """The last plan took `max_receipts` and more wait: close the next epoch at once."""
        self._clock = clock
        self.restorations: Restorations | None = None
        addrs = deployment.addresses
        self.domain = Domain(addrs.chain_id, addrs.distributor)

    # --- the whole close ----------------------------------------------------------------
    def close_epoch(self) -> EpochResult | None:
        """Finish a pending plan, or plan and post the next epoch; None if nothing to pay.

        One closer at a time over the network's database (`storage.session_lock`): another
        coordinator already closing gets `SettlementBusy`, and its next tick tries again."""
        try:
            with exclusive(self.store.location, "epoch-close"):
                return self._close_epoch()
        except LockHeld:
            raise SettlementBusy(
                "another coordinator of this network is closing an epoch; "
                "the next close will include these receipts"
            ) from None

    def _close_epoch(self) -> EpochResult | None:
        self.publish_missing()  # what other coordinators of the network closed
        dropped = self._dropped()
        if dropped is not None:
            return self.post(dropped, resumed=True)
        pending = self.store.last_epoch_record(state="planned")
        if pending is not None:
            return self.post(pending, resumed=True)
        record = self.plan_epoch()
        if record is None:
            return None
        return self.post(record, resumed=False)

    def _dropped(self) -> EpochRecord | None:
        """The lowest epoch recorded posted whose root the chain no longer has, made a plan
        again: a reorganisation dropped its `postRoot` and nobody mined it again. It is
        posted from its stored plan (same root, files and leaves as published); nothing after
        it could be posted before it (`epoch == latest + 1`)."""
        last = self.store.last_epoch_record(state="posted")
        if last is None:
            return None
        chain_epoch = self.distributor.latest_epoch()
        if chain_epoch >= last.epoch:
            return None
        epoch = chain_epoch + 1
        if not self.store.mark_epoch_dropped(epoch):
            raise EpochConflict(
                f"the distributor's latest epoch is {chain_epoch}, behind this database's "
                f"posted epoch {last.epoch}, and epoch {epoch} is not in it to post again"
            )
        log.warning("epoch_post_dropped", epoch=epoch, chain_latest=chain_epoch)
        record = self.store.epoch_record(epoch)
        assert record is not None
        return record

    # --- step 1: plan --------------------------------------------------------------------
    def plan_epoch(self) -> EpochRecord | None:
        """Compute and commit the next epoch's plan (no chain writes); None if nothing new.

        A plan already pending is returned as is: one unposted plan at a time. Only paid
        value is paid: a receipt earns what its payer paid for that job (the ledger's
        settlement), at this epoch's rate; a request with no payer earns nothing; a paid one
        whose ledger settlement is still queued waits for the next epoch, and so does one
        stored within the last `dispute_window` seconds (or held by a pending check).
        """
        pending = self.store.last_epoch_record(state="planned")
        if pending is not None:  # resumed: whether more wait is not known, so look at once
            self.more_waiting = True
            return pending
        if self.params is not None:
            self.rules = self.params.rules_for_epoch(self.rules)
        window_closed = self._clock() - self.dispute_window if self.dispute_window > 0 else None
        stored = self.store.unsettled_receipts(stored_before=window_closed, limit=self.max_receipts)
        self.more_waiting = len(stored) >= self.max_receipts  # the rest: the next epoch, now
        owed = (
            []
            if self.restorations is None
            else self.restorations.owed(self._epoch_state, self._restored_in)
        )
        if not stored and not owed:  # an epoch of restorations alone still closes
            return None
        settlements, reserved = self.ledger.payer_settlements(
            [(s.receipt.job_id, s.request_id, s.index) for s in stored]
        )
        candidates: list[tuple[StoredReceipt, PayerSettlement]] = []
        refused: list[Refusal] = []
        waiting = 0
        for s in stored:
            paid_for = settlements.get(s.receipt.job_id)
            why = self._refusal(s, paid_for)
            if why is None and paid_for is None:
                open_reservation = reserved.get(s.request_id)
                if open_reservation:
                    waiting += 1  # its ledger settlement is queued: next epoch
                    continue
                # a closed reservation never settles it (its request ended first, refunded)
                why = epoch_math.NO_PAYER if open_reservation is None else ENDED_UNSETTLED
            if why is None:
                assert paid_for is not None
                candidates.append((s, paid_for))
            else:
                job = "0x" + s.receipt.job_id.hex()
                refused.append(Refusal(job_id=job, worker=s.receipt.worker, reason=why))
        if refused:
            log.warning("receipts_refused", count=len(refused), first=refused[0].reason)
        if waiting:
            log.info("receipts_waiting_for_ledger", count=waiting)
        if not candidates and not owed:
            if refused:
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
        previous_total = sum(previous.values())

        stake_block, stakes = self._stake_snapshot(
            {r.receipt.payee for r, _ in candidates} | {payee for _, payee, _, _ in owed}
        )
        entries, free_requested = self._value(candidates, stakes)
        earned = epoch_math.earned_by_account(entries)
        restored: list[Restoration] = []
        if self.restorations is not None and owed:  # disputes won (disputes.py)
            earned, restored = self.restorations.add_to(
                earned,
                self.rules,
                epoch,
                owed,
                lambda payee: self.rules.take_bps(stakes.get(payee) if self.read_stake else None),
            )
        leaves = epoch_math.cumulative_leaves(previous, earned)
        cumulative = dict(leaves)
        tree = MerkleTree(leaves)
        total = sum(cumulative.values())
        self._check_growth(total - previous_total)

        batch = ReceiptsBatch(
            format=RECEIPTS_FORMAT,
            epoch=epoch,
            chain_id=self.domain.chain_id,
            verifying_contract=to_checksum_address(self.domain.verifying_contract),
            network_id=self.network_id,
            rules=self.rules,
            stake_block=stake_block,
            stakes={w: str(v) for w, v in sorted(stakes.items())},
            free_requested=str(free_requested),
            receipts=sorted(entries, key=lambda e: e.job_id),
            refused=sorted(refused, key=lambda r: r.job_id),
            restorations=sorted(restored, key=lambda r: r.case_id),
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
            previous_total=str(previous_total),
            stake_block=stake_block,
            rules=self.rules,
            payouts=epoch_math.payouts(entries, earned, cumulative),
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
                paid=[bytes.fromhex(e.job_id[2:]) for e in entries],
                refused=[(bytes.fromhex(r.job_id[2:]), r.reason) for r in refused],
                evidence=batch_bytes,
            )
        except sqlite3.IntegrityError as exc:
            raise EpochConflict(
                f"another closer planned epoch {epoch} (or some of its receipts) first: {exc}"
            ) from None
        log.info(
            "epoch_planned",
            epoch=epoch,
            receipts=len(entries),
            refused=len(refused),
            accounts=len(earned),
            verifier_payments=sum(len(e.verifiers) for e in entries),
            leaves=len(leaves),
            total=str(total),
            stake_block=stake_block,
        )
        record = self.store.epoch_record(epoch)
        assert record is not None
        self._publish(record, tree)
        return record

    def _restored_in(self, epoch: int) -> set[bytes] | None:
        """The dispute cases epoch `epoch`'s published batch pays (None: its batch is not in
        the database, an epoch closed before v8, or an airdrop's evidence)."""
        raw = self.store.epoch_evidence(epoch)
        if raw is None:
            return None
        try:
            batch = decode_batch(raw)
        except ValueError:  # an airdrop's evidence: it pays no dispute
            return set()
        return {bytes.fromhex(r.case_id.removeprefix("0x")) for r in batch.restorations}

    def _epoch_state(self, epoch: int) -> str | None:
        record = self.store.epoch_record(epoch)
        return None if record is None else record.state

    def _refusal(self, s: StoredReceipt, paid_for: PayerSettlement | None) -> str | None:
        """Why a stored receipt will never be paid, or None (it may be, once paid for)."""
        receipt, signature = s.receipt, s.signature
        try:  # under the EIP-712 version it was signed in (receipts outlive version changes)
            domain = self.domain.at(
                eip712.verify_receipt(self.domain, receipt, signature, receipt.worker)
            )
        except SignatureError as exc:
            return (
                "signature is not the worker's under this chain and distributor "
                f"(chain {self.domain.chain_id}, {self.domain.verifying_contract}): {exc}"
            )
        if s.offer is None or s.offer_signature is None:
            return "no signed offer on record for this receipt"
        if eip712.offer_hash(domain, s.offer) != receipt.offer_hash:
            return "the receipt does not answer the offer on record"
        try:
            offer_signer = eip712.recover_offer_signer(domain, s.offer, s.offer_signature)
        except SignatureError as exc:
            return f"bad offer signature: {exc}"
        if not eip712.same_address(offer_signer, receipt.coordinator):
            return "the offer is not signed by the coordinator the receipt names"
        if receipt.price_factor_bps != s.offer.price_factor_bps:
            return "the receipt's price factor differs from its offer's"
        if paid_for is None:
            return None  # the caller tells "queued in the ledger" from "no payer"
        why = epoch_math.self_dealing(
            paid_for.payer, paid_for.spark_free, receipt.worker, receipt.payee
        )
        if why is not None:
            return why
        charged = epoch_math.mispriced(s.offer, receipt, paid_for)
        if charged is not None:
            return (
                f"the payer was charged {paid_for.spark_equiv} micro-Spark for it, not the "
                f"{charged} its offer prices"
            )
        if paid_for.spark_paid + paid_for.sogni == 0 and self.rules.free_budget_wei == 0:
            if paid_for.spark_free:
                return "free (Daily Boost) work, and this network's free emission budget is 0"
            return "the payer was charged nothing for it"
        return None

    def _stake_snapshot(self, workers: set[str]) -> tuple[int | None, dict[str, int]]:
        """Every payee's active stake at one recorded block (its receipts' take-rate tier),
        `confirmations` behind the head: a reorganisation cannot change it after the close."""
        if not self.read_stake:
            return None, {}
        block = max(0, self.deployment.chain.block_number() - self.confirmations)
        staking = self.deployment.staking
        return block, {
            to_checksum_address(w): staking.active_stake(w, block=block) for w in sorted(workers)
        }

    def _value(
        self, candidates: list[tuple[StoredReceipt, PayerSettlement]], stakes: dict[str, int]
    ) -> tuple[list[BatchEntry], int]:
        """Each receipt's value (what its payer paid, at the rate; free Spark scaled into the
        emission budget), split, and the verifiers paid from its take for checking it;
        returns the entries and the free value requested."""
        free_requested = sum(epoch_math.free_value(p, self.rules) for _, p in candidates)
        work = self.store.verifier_work([s.receipt.job_id for s, _ in candidates])
        entries: list[BatchEntry] = []
        for s, paid_for in candidates:
            receipt = s.receipt
            payee = to_checksum_address(receipt.payee)
            take = self.rules.take_bps(stakes.get(payee) if self.read_stake else None)
            valued = epoch_math.split_entry(
                paid_for, receipt.model_id, self.rules, take, free_requested
            )
            assert s.offer is not None and s.offer_signature is not None
            verifiers = epoch_math.verifiers_of(
                work.get(receipt.job_id, []),
                worker=receipt.worker,
                payee=receipt.payee,
                free_payer=paid_for.payer if paid_for.spark_free > 0 else None,
                value=valued.split.value,
                take=valued.split.take,
                job_steps=s.offer.steps,
            )
            entries.append(
                BatchEntry.of(
                    receipt,
                    s.signature,
                    offer=OfferRecord.of(s.offer, s.offer_signature),
                    settlement=paid_for,
                    paid_value=valued.paid_value,
                    free_value=valued.free_value,
                    take_bps=take,
                    worker_amount=valued.split.worker,
                    creator=valued.split.creator,
                    creator_amount=valued.split.creator_amount,
                    verifiers=verifiers,
                )
            )
        return entries, free_requested

    def _check_growth(self, growth: int) -> None:
        cap = self.distributor.max_total_growth()
        if growth > cap:
            raise SettlementError(
                f"this epoch would add {growth} to the total, over the distributor's cap of "
                f"{cap} per epoch: close epochs more often, or have the admin raise the cap"
            )

    def publish_missing(self) -> int:
        """Write every posted epoch this coordinator's folder lacks (its file, tree dump and
        evidence) from the network's database: with several coordinators only the closer
        wrote them, and a node fetching from another found gaps its audit refuses. Blocking;
        returns how many epochs it (re)wrote."""
        written = 0
        for record in self.store.posted_epochs():
            ef = decode_epoch(record.plan)
            evidence = self.publish_dir / ef.receipts_file
            missing = not (self.publish_dir / epoch_filename(record.epoch)).exists()
            if not evidence.exists():
                raw = self.store.epoch_evidence(record.epoch)
                if raw is not None and content_hash(raw) == record.receipts_hash:
                    atomic_write_bytes(evidence, raw)
                    missing = True
            if missing:
                self._publish(record)
                written += 1
        if written:
            log.info("epochs_published_from_database", epochs=written)
        return written

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
        """Put a planned epoch's root on chain, exactly once. With an offline settlement key
        (`sender` is only its address) the unsigned transaction is written instead
        (`EpochResult.unsigned_tx`) for `sign_offline`, and `submit_signed` finishes it."""
        epoch_file = self._publish(record)
        tx_hash: str | None = record.tx_hash
        season = airdrop_season(decode_epoch(record.plan).receipts_file)
        if record.state != "posted":
            onchain = self.distributor.root_of(record.epoch)
            if onchain is None and isinstance(self.sender, str):
                if season is not None:
                    raise SettlementError(
                        f"epoch {record.epoch} is season {season}'s airdrop: it is posted "
                        "online by the AIRDROP_ROLE key (sogni-coordinator season close)"
                    )
                return self._result(record, epoch_file, resumed, self._write_unsigned(record))
            if onchain is None:
                try:
                    if season is not None:  # a season's prizes (settlement/airdrop.py)
                        tx = self.distributor.post_airdrop_root(
                            record.epoch,
                            season,
                            record.root,
                            record.total,
                            record.receipts_hash,
                            sender=self.sender,
                        )
                    else:
                        tx = self.distributor.post_root(
                            record.epoch,
                            record.root,
                            record.total,
                            record.receipts_hash,
                            sender=self.sender,
                        )
                    tx_hash = tx.hash
                except ChainRevert as exc:
                    onchain = self.distributor.root_of(record.epoch)
                    if onchain is None:  # not a lost race with ourselves: a real refusal
                        raise SettlementError(
                            f"posting epoch {record.epoch} failed: {exc.reason} "
                            "(the plan is kept; closing again retries it)"
                        ) from None
            self._record_posted(record, onchain, tx_hash, resumed)
        return self._result(record, epoch_file, resumed, None, tx_hash)

    def _record_posted(
        self, record: EpochRecord, onchain: bytes | None, tx_hash: str | None, resumed: bool
    ) -> None:
        if onchain is not None and onchain != record.root:
            raise EpochConflict(
                f"epoch {record.epoch} has root 0x{onchain.hex()} on chain, "
                f"not this plan's 0x{record.root.hex()}"
            )
        self.store.mark_epoch_posted(record.epoch, tx_hash)
        if self.restorations is not None:  # won disputes its batch carries are now paid
            self.restorations.posted(record.epoch, self._restored_in(record.epoch))
        log.info("epoch_posted", epoch=record.epoch, tx=tx_hash, resumed=resumed)

    # --- an offline settlement key ---------------------------------------------------------
    def _write_unsigned(self, record: EpochRecord) -> Path:
        assert isinstance(self.sender, str)
        try:
            tx = self.distributor.build_post_root(
                record.epoch, record.root, record.total, record.receipts_hash, sender=self.sender
            )
        except ChainRevert as exc:
            raise SettlementError(
                f"epoch {record.epoch}'s root would be refused: {exc.reason} (the plan is kept)"
            ) from None
        document = {
            "format": UNSIGNED_FORMAT,
            "epoch": record.epoch,
            "root": "0x" + record.root.hex(),
            "total": str(record.total),
            "receiptsHash": "0x" + record.receipts_hash.hex(),
            "chainId": self.domain.chain_id,
            "distributor": to_checksum_address(self.distributor.address),
            "from": to_checksum_address(self.sender),
            "tx": tx,
        }
        path = self.publish_dir.parent / "unsigned" / f"post-epoch-{record.epoch:06d}.json"
        atomic_write_bytes(path, json.dumps(document, indent=2).encode())
        log.info("epoch_awaiting_signature", epoch=record.epoch, file=str(path))
        return path

    def submit_signed(self, signed: dict[str, Any]) -> EpochResult:
        """Broadcast the planned epoch's `postRoot`, signed offline (`sign_offline`'s output),
        after checking it is exactly that epoch's root from the settlement key.

        The signed raw transaction itself is decoded and compared with the stored plan (its
        target, chain, value and calldata), not only the file's labels: a file whose labels
        name the plan but whose transaction posts another root is refused before sending."""
        record = self.store.last_epoch_record(state="planned")
        if record is None:
            raise SettlementError("no planned epoch awaits a signature")
        if signed.get("format") != SIGNED_FORMAT:
            raise SettlementError(f"not a signed epoch root transaction ({SIGNED_FORMAT})")
        if (signed.get("epoch"), signed.get("root")) != (record.epoch, "0x" + record.root.hex()):
            raise SettlementError(
                f"the signed transaction is for epoch {signed.get('epoch')} root "
                f"{signed.get('root')}, but epoch {record.epoch} root 0x{record.root.hex()} "
                "awaits: sign the current unsigned file"
            )
        _check_signed(signed, record, self.distributor.address, self.domain.chain_id)
        onchain = self.distributor.root_of(record.epoch)
        tx_hash = None
        if onchain is None:
            try:
                tx_hash = self.deployment.chain.send_raw(str(signed["raw"])).hash
            except ChainRevert as exc:
                raise SettlementError(
                    f"posting epoch {record.epoch} failed: {exc.reason}"
                ) from None
            onchain = self.distributor.root_of(record.epoch)
        self._record_posted(record, onchain, tx_hash, False)
        posted = self.store.epoch_record(record.epoch)
        assert posted is not None
        return self.post(posted)

    def _result(
        self,
        record: EpochRecord,
        epoch_file: Path,
        resumed: bool,
        unsigned: Path | None,
        tx_hash: str | None = None,
    ) -> EpochResult:
        plan = decode_epoch(record.plan)
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
            posted=unsigned is None,
            tx_hash=tx_hash or record.tx_hash,
            resumed=resumed,
            unsigned_tx=unsigned,
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


def _post_root_calldata(epoch: int, root: bytes, total: int, receipts_hash: bytes) -> bytes:
    return _POST_ROOT + abi_encode(_POST_ROOT_ARGS, [epoch, root, total, receipts_hash])


def _decode_post_root(data: bytes) -> tuple[int, bytes, int, bytes]:
    """`postRoot`'s (epoch, root, total, receiptsHash) from calldata; any other call (another
    function, trailing bytes) is refused."""
    if data[:4] != _POST_ROOT:
        raise SettlementError(
            f"the transaction calls selector 0x{data[:4].hex()}, not the distributor's postRoot"
        )
    try:
        epoch, root, total, receipts_hash = abi_decode(_POST_ROOT_ARGS, data[4:], strict=True)
    except (DecodingError, ValueError) as exc:
        raise SettlementError(f"the transaction's postRoot calldata is malformed: {exc}") from None
    if _post_root_calldata(epoch, root, total, receipts_hash) != data:
        raise SettlementError("the transaction's postRoot calldata carries extra bytes")
    return int(epoch), bytes(root), int(total), bytes(receipts_hash)


def _bytes32(text: Any, what: str) -> bytes:
    raw = str(text)
    try:
        out = bytes.fromhex(raw.removeprefix("0x"))
    except ValueError:
        out = b""
    if len(out) != 32 or not raw.startswith("0x"):
        raise SettlementError(f"the file's {what} {raw[:80]!r} is not a 0x 32-byte hash")
    return out


def _mismatch(
    decoded: tuple[int, bytes, int, bytes], stated: tuple[int, bytes, int, bytes]
) -> str | None:
    """Which postRoot argument differs from what the file (or plan) states, or None."""
    names = ("epoch", "root", "total", "receiptsHash")
    for name, got, want in zip(names, decoded, stated, strict=True):
        if got != want:
            return f"the transaction posts {name} {_shown(got)}, the file states {_shown(want)}"
    return None


def _shown(value: object) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def check_unsigned(unsigned: dict[str, Any], distributor: str | None = None) -> dict[str, Any]:
    """What an unsigned `postRoot` file would really do, decoded from its transaction, after
    checking it is what the file's labels state: sent to the distributor the file names (and
    `distributor`, if the signer knows it), on the file's chain, with no ETH, calling
    `postRoot(epoch, root, total, receiptsHash)` with the labelled values. The online host
    writes the file, so the offline key must not trust its labels alone."""
    if unsigned.get("format") != UNSIGNED_FORMAT:
        raise SettlementError(f"not an unsigned epoch root transaction ({UNSIGNED_FORMAT})")
    try:
        epoch, total = int(unsigned["epoch"]), int(unsigned["total"])
        sender, tx = str(unsigned["from"]), unsigned["tx"]
        to, data = str(tx["to"]), bytes.fromhex(str(tx["data"]).removeprefix("0x"))
        tx_chain, value = int(tx["chainId"]), int(tx.get("value", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise SettlementError(f"not an unsigned epoch root transaction: {exc!r}") from None
    stated = (
        epoch,
        _bytes32(unsigned.get("root"), "root"),
        total,
        _bytes32(unsigned.get("receiptsHash"), "receiptsHash"),
    )
    named = unsigned.get("distributor")
    if named is None and distributor is None:
        raise SettlementError(
            "the file names no distributor (written by an older version): run `epoch close` "
            "again to rewrite it"
        )
    if (
        named is not None
        and distributor is not None
        and not eip712.same_address(str(named), distributor)
    ):
        raise SettlementError(f"the file is for distributor {named}, not {distributor}")
    target = str(named if named is not None else distributor)
    if not eip712.same_address(to, target):
        raise SettlementError(f"the transaction is sent to {to}, not the distributor {target}")
    file_chain = unsigned.get("chainId")
    if file_chain is not None and int(file_chain) != tx_chain:
        raise SettlementError(
            f"the transaction is for chain {tx_chain}, the file for chain {file_chain}"
        )
    if value != 0:
        raise SettlementError(f"the transaction sends {value} wei; postRoot sends none")
    decoded = _decode_post_root(data)
    why = _mismatch(decoded, stated)
    if why is not None:
        raise SettlementError(why)
    gas, fee = int(tx.get("gas", 0)), int(tx.get("maxFeePerGas", tx.get("gasPrice", 0)))
    return {
        "epoch": decoded[0],
        "root": "0x" + decoded[1].hex(),
        "total": str(decoded[2]),
        "receiptsHash": "0x" + decoded[3].hex(),
        "to": to_checksum_address(to),
        "chainId": tx_chain,
        "from": sender,
        "maxCostWei": str(gas * fee),
    }


def _check_signed(
    signed: dict[str, Any], record: EpochRecord, distributor: str, chain_id: int
) -> None:
    """The signed raw transaction is this plan's `postRoot` to this deployment's distributor,
    on its chain, sending no ETH, from the key the file names."""
    from eth_account import Account
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes

    try:
        raw = HexBytes(str(signed["raw"]))
        tx = TypedTransaction.from_bytes(raw).as_dict()
        sender = str(Account.recover_transaction(raw))
        to = "0x" + bytes(tx["to"]).hex()
        data, tx_chain, value = bytes(tx["data"]), int(tx["chainId"]), int(tx["value"])
    except Exception as exc:  # malformed hex, RLP or signature: one line, not a traceback
        raise SettlementError(f"not a signed EIP-1559 transaction: {_one_line(exc)}") from None
    if not eip712.same_address(to, distributor):
        raise SettlementError(
            f"the signed transaction is sent to {to_checksum_address(to)}, not the "
            f"distributor {distributor}: not sent"
        )
    if tx_chain != chain_id:
        raise SettlementError(f"the signed transaction is for chain {tx_chain}, not {chain_id}")
    if value != 0:
        raise SettlementError(f"the signed transaction sends {value} wei; postRoot sends none")
    why = _mismatch(
        _decode_post_root(data), (record.epoch, record.root, record.total, record.receipts_hash)
    )
    if why is not None:
        raise SettlementError(why.replace("the file states", "the plan states") + ": not sent")
    if not eip712.same_address(sender, str(signed.get("from"))):
        raise SettlementError(
            f"the transaction is signed by {sender}, not by {signed.get('from')}: not sent"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def sign_offline(
    unsigned: dict[str, Any], private_key: bytes, *, distributor: str | None = None
) -> dict[str, Any]:
    """Sign an unsigned `postRoot` (`Settler` wrote it) with the settlement key, without any
    chain access: the output is what `Settler.submit_signed` broadcasts.

    Refuses (`SettlementError`) unless the transaction is exactly the `postRoot` the file's
    labels state, to the distributor it names (`check_unsigned`); the output's `epoch`,
    `root`, `total`, `receiptsHash`, `to` and `chainId` are decoded from what was signed."""
    from eth_account import Account

    call = check_unsigned(unsigned, distributor)
    account = Account.from_key(private_key)
    if not eip712.same_address(account.address, str(unsigned["from"])):
        raise SettlementError(
            f"the transaction is to be sent from {unsigned['from']}, not from this key's "
            f"{account.address}"
        )
    signed = account.sign_transaction(unsigned["tx"])
    return {
        "format": SIGNED_FORMAT,
        **call,
        "from": account.address,
        "raw": "0x" + bytes(signed.raw_transaction).hex(),
        "hash": "0x" + bytes(signed.hash).hex(),
    }
