"""The two files a coordinator publishes per epoch, shared by the coordinator and the nodes.

- ``receipts/0x<keccak256>.json``: the epoch's receipts batch (every receipt paid, with its
  signature and split, plus the receipts refused). Content-addressed: the name is the
  keccak256 of the exact bytes, and that hash is what ``postRoot`` records as ``receiptsHash``,
  so anyone holding the file can prove it is the batch the root was built from.
- ``epoch-<N>.json``: the epoch summary: root, total, rules, this epoch's payouts and every
  cumulative leaf ``[account, cumulativeAmount]``. The Merkle tree (and any proof) is rebuilt
  from the leaves; ``epoch-<N>.tree.json`` is the same tree in OpenZeppelin's ``standard-v1``
  JSON for JS tools.

Amounts are decimal strings (uint256 does not fit JSON numbers); bytes are 0x-hex. Encoding is
canonical (sorted keys, no whitespace) so the same batch always hashes the same.
"""

from __future__ import annotations

import msgspec
from eth_hash.auto import keccak

from sogni_protocol.messages import Receipt
from sogni_protocol.payout_rules import PayoutRules

__all__ = [
    "EPOCH_FORMAT",
    "RECEIPTS_FORMAT",
    "BatchEntry",
    "EpochFile",
    "Payout",
    "ReceiptsBatch",
    "Refusal",
    "content_hash",
    "decode_batch",
    "decode_epoch",
    "encode",
    "epoch_filename",
    "receipts_filename",
]

RECEIPTS_FORMAT = "sogni-receipts-v1"
EPOCH_FORMAT = "sogni-epoch-v1"


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s[2:] if s.startswith(("0x", "0X")) else s)


class BatchEntry(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """One paid receipt exactly as signed, plus how its value was split."""

    job_id: str
    offer_hash: str
    worker: str
    coordinator: str
    model_id: str
    result_hash: str
    steps_done: int
    work_units: int
    completed_at: int
    signature: str
    take_bps: int
    worker_amount: str
    creator: str | None
    creator_amount: str

    def receipt(self) -> Receipt:
        return Receipt(
            job_id=_unhex(self.job_id),
            offer_hash=_unhex(self.offer_hash),
            worker=self.worker,
            coordinator=self.coordinator,
            model_id=self.model_id,
            result_hash=_unhex(self.result_hash),
            steps_done=self.steps_done,
            work_units=self.work_units,
            completed_at=self.completed_at,
        )

    @property
    def signature_bytes(self) -> bytes:
        return _unhex(self.signature)

    @classmethod
    def of(
        cls,
        receipt: Receipt,
        signature: bytes,
        *,
        take_bps: int,
        worker_amount: int,
        creator: str | None,
        creator_amount: int,
    ) -> BatchEntry:
        return cls(
            job_id=_hex(receipt.job_id),
            offer_hash=_hex(receipt.offer_hash),
            worker=receipt.worker,
            coordinator=receipt.coordinator,
            model_id=receipt.model_id,
            result_hash=_hex(receipt.result_hash),
            steps_done=receipt.steps_done,
            work_units=receipt.work_units,
            completed_at=receipt.completed_at,
            signature=_hex(signature),
            take_bps=take_bps,
            worker_amount=str(worker_amount),
            creator=creator,
            creator_amount=str(creator_amount),
        )


class Refusal(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """A stored receipt that settlement will never pay, and why."""

    job_id: str
    worker: str
    reason: str


class ReceiptsBatch(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    format: str
    epoch: int
    chain_id: int
    verifying_contract: str
    rules: PayoutRules
    receipts: list[BatchEntry]
    refused: list[Refusal] = msgspec.field(default_factory=list)


class Payout(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """What one account earned in this epoch, and its new cumulative total."""

    account: str
    amount: str
    cumulative_amount: str
    receipts: int


class EpochFile(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    format: str
    epoch: int
    chain_id: int
    distributor: str
    root: str
    total: str
    receipts_hash: str
    receipts_file: str
    closed_at: int
    rules: PayoutRules
    payouts: list[Payout]
    leaves: list[tuple[str, str]]
    """Every ``[account, cumulativeAmount]`` in the tree (all accounts ever paid)."""

    def leaf_ints(self) -> list[tuple[str, int]]:
        return [(a, int(v)) for a, v in self.leaves]


def encode(value: msgspec.Struct) -> bytes:
    """Canonical JSON (sorted keys, compact): equal content, equal bytes, equal hash."""
    return msgspec.json.encode(value, order="sorted")


def decode_batch(data: bytes) -> ReceiptsBatch:
    batch = msgspec.json.decode(data, type=ReceiptsBatch)
    if batch.format != RECEIPTS_FORMAT:
        raise ValueError(f"unknown receipts batch format {batch.format!r}")
    return batch


def decode_epoch(data: bytes) -> EpochFile:
    epoch = msgspec.json.decode(data, type=EpochFile)
    if epoch.format != EPOCH_FORMAT:
        raise ValueError(f"unknown epoch file format {epoch.format!r}")
    return epoch


def receipts_filename(receipts_hash: bytes) -> str:
    """The content address: ``0x<keccak256 of the file>.json``."""
    return f"{_hex(receipts_hash)}.json"


def content_hash(data: bytes) -> bytes:
    """keccak256 of a file's bytes: its name, and the ``receiptsHash`` posted on chain."""
    return bytes(keccak(data))


def epoch_filename(epoch: int, suffix: str = "json") -> str:
    return f"epoch-{epoch:06d}.{suffix}"
