"""The two files a coordinator publishes per epoch, shared by the coordinator and the nodes.

- ``receipts/0x<keccak256>.json``: the epoch's receipts batch: everything needed to recompute
  the epoch (`sogni_protocol.epoch_math`): every receipt paid with its signature, the signed
  offer it answers, the payer settlement it is paid from (accounts and amounts, no prompts),
  the rules (the Spark -> SOGNI rate and the free emission budget included), the stake
  snapshot block and the stakes read there, each receipt's split (the verifier nodes that
  checked it included, paid from the take); plus the receipts refused.
  Content-addressed: the name is the keccak256 of the exact bytes, and that hash is what
  ``postRoot`` records as ``receiptsHash``, so anyone holding the file can prove it is the
  batch the root was built from.
- ``epoch-<N>.json``: the epoch summary: root, total, rules, this epoch's payouts and every
  cumulative leaf ``[account, cumulativeAmount]``. The Merkle tree (and any proof) is rebuilt
  from the leaves; ``epoch-<N>.tree.json`` is the same tree in OpenZeppelin's ``standard-v1``
  JSON for JS tools.

Amounts are decimal strings (uint256 does not fit JSON numbers); bytes are 0x-hex. Encoding is
canonical (sorted keys, no whitespace) so the same batch always hashes the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect
from eth_hash.auto import keccak

from sogni_protocol.messages import JobOffer, Receipt
from sogni_protocol.payout_rules import PayoutRules

__all__ = [
    "EPOCH_FORMAT",
    "RECEIPTS_FORMAT",
    "BatchEntry",
    "EpochFile",
    "OfferRecord",
    "PayerAuthorization",
    "PayerSettlement",
    "Payout",
    "ReceiptsBatch",
    "Refusal",
    "VerifierPay",
    "content_hash",
    "decode_batch",
    "decode_epoch",
    "encode",
    "epoch_filename",
    "receipts_filename",
]

RECEIPTS_FORMAT = "sogni-receipts-v5"
EPOCH_FORMAT = "sogni-epoch-v3"
_V4_RECEIPTS_FORMAT = "sogni-receipts-v4"
"""Before payout addresses: read as v5 with every receipt paying its worker."""
_OLD_RECEIPTS_FORMAT = "sogni-receipts-v3"
"""Before verifier pay: read as v5 with no verifiers and no payout addresses (the rules were
otherwise the same)."""
_OLD_EPOCH_FORMAT = "sogni-epoch-v2"
"""Before verifier pay: its payouts are workers' and creators' only."""


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s[2:] if s.startswith(("0x", "0X")) else s)


_Signed = TypeVar("_Signed", JobOffer, Receipt)


def _as_record(signed: JobOffer | Receipt) -> dict[str, Any]:
    """The fields of a signed offer or receipt as published: bytes as 0x-hex, the rest as is."""
    out: dict[str, Any] = {}
    for name in signed.__struct_fields__:
        value = getattr(signed, name)
        out[name] = _hex(value) if isinstance(value, bytes) else value
    return out


def _from_record(cls: type[_Signed], record: msgspec.Struct) -> _Signed:
    """`cls` rebuilt from a published record holding its fields (0x-hex for bytes fields)."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    fields: dict[str, Any] = {}
    for f in info.fields:
        value = getattr(record, f.name)
        fields[f.name] = _unhex(value) if isinstance(f.type, msgspec.inspect.BytesType) else value
    return cls(**fields)


class OfferRecord(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """The coordinator-signed offer a receipt answers (its EIP-712 fields and signature)."""

    job_id: str
    coordinator: str
    model_id: str
    params_hash: str
    steps: int
    width: int
    height: int
    seed: int
    work_units: int
    deadline: int
    price_factor_bps: int
    signature: str

    def offer(self) -> JobOffer:
        return _from_record(JobOffer, self)

    @property
    def signature_bytes(self) -> bytes:
        return _unhex(self.signature)

    @classmethod
    def of(cls, offer: JobOffer, signature: bytes) -> OfferRecord:
        return cls(**_as_record(offer), signature=_hex(signature))


class PayerAuthorization(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """The payer's signed `RenderAuthorization` of the request a job belongs to, known by its
    hash only (no prompt): the job id is `eip712.job_id_of(request_hash, index)`, so the
    receipt, the offer and this signature tie the payment to the payer's own consent."""

    request_hash: str
    network_id: str
    expiry: int
    signature: str
    index: int


class PayerSettlement(
    msgspec.Struct, kw_only=True, frozen=True, rename="camel", omit_defaults=True
):
    """What the payer paid for one job, as the ledger settled it (micro units: 1e-6 Spark or
    SOGNI). ``spark_equiv``: the value in micro-Spark (for SOGNI payments, at the request's
    quote). ``discount_bps``: the payer's stake discount the request was priced with (off
    each image's price; omitted when 0, so files without discounts read as before). Accounts
    and amounts only: never a prompt."""

    payer: str
    token_type: Literal["spark", "sogni"]
    spark_free: int
    spark_paid: int
    sogni: int
    spark_equiv: int
    authorization: PayerAuthorization | None = None
    """None only for a request accepted before authorizations were kept: the audit says so."""
    discount_bps: Annotated[int, msgspec.Meta(ge=0, lt=10_000)] = 0


class VerifierPay(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """A verifier node paid from a receipt's take for the steps it re-ran checking that job
    (`sogni_protocol.epoch_math.verifier_pay`)."""

    account: str
    steps: int
    amount: str


class BatchEntry(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """One paid receipt exactly as signed, the offer and payment behind it, and its split.

    ``paid_value`` (SOGNI base units) comes from paid Spark and SOGNI; ``free_value`` from
    free (Daily Boost) Spark after the epoch's emission budget scaled it; their sum is split.
    ``verifiers`` are paid out of the take (the platform's part), never the worker's or the
    creator's.
    """

    job_id: str
    offer_hash: str
    worker: str
    coordinator: str
    model_id: str
    result_hash: str
    steps_done: int
    work_units: int
    completed_at: int
    price_factor_bps: int
    trajectory_root: str
    signature: str
    offer: OfferRecord
    settlement: PayerSettlement
    paid_value: str
    free_value: str
    take_bps: int
    worker_amount: str
    creator: str | None
    creator_amount: str
    verifiers: list[VerifierPay] = msgspec.field(default_factory=list)
    """Sorted by lowercase account, one each; empty in batches before `sogni-receipts-v4`."""
    payout: str | None = None
    """The receipt's signed payout address (`worker_amount` and the take tier follow it);
    None: the worker (always, in batches before `sogni-receipts-v5`)."""

    def receipt(self) -> Receipt:
        return _from_record(Receipt, self)

    @property
    def payee(self) -> str:
        """Who `worker_amount` is paid to: the payout address, else the worker."""
        return self.payout if self.payout is not None else self.worker

    @property
    def signature_bytes(self) -> bytes:
        return _unhex(self.signature)

    @classmethod
    def of(
        cls,
        receipt: Receipt,
        signature: bytes,
        *,
        offer: OfferRecord,
        settlement: PayerSettlement,
        paid_value: int,
        free_value: int,
        take_bps: int,
        worker_amount: int,
        creator: str | None,
        creator_amount: int,
        verifiers: Sequence[VerifierPay] = (),
    ) -> BatchEntry:
        return cls(
            **_as_record(receipt),
            signature=_hex(signature),
            offer=offer,
            settlement=settlement,
            paid_value=str(paid_value),
            free_value=str(free_value),
            take_bps=take_bps,
            worker_amount=str(worker_amount),
            creator=creator,
            creator_amount=str(creator_amount),
            verifiers=list(verifiers),
        )


class Refusal(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """A stored receipt that settlement will never pay, and why."""

    job_id: str
    worker: str
    reason: str


class Restoration(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """A refused receipt's pay restored after its worker won the dispute (`disputes.py`): the
    case, the account paid, the model and micro-Spark value of the refused job, the payee's
    take rate and what the payee is paid (`epoch_math.restoration_problem` recomputes it).
    Without it in the batch, the leaf it adds is one no receipt pays and every audit fails."""

    case_id: str
    payee: str
    model_id: str
    micro_spark: int
    take_bps: int
    amount: str


class ReceiptsBatch(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    format: str
    epoch: int
    chain_id: int
    verifying_contract: str
    network_id: str
    """The ledger's network (shared by its coordinators): payer authorizations name it."""
    rules: PayoutRules
    """The rate (`weiPerSpark`) and free emission budget this epoch was settled with."""
    stake_block: int | None
    """The block each worker's stake (its take-rate tier) was read at; None: no stake read,
    every worker pays tier 0."""
    stakes: dict[str, str]
    """Payee (the receipt's payout address, else its worker) -> active stake (base units) at
    ``stake_block``: the stake that sets a receipt's take tier is the paid account's."""
    free_requested: str
    """The free Spark value (base units) of this batch before the emission budget."""
    receipts: list[BatchEntry]
    refused: list[Refusal] = msgspec.field(default_factory=list)
    restorations: list[Restoration] = msgspec.field(default_factory=list)
    """Disputes won since the last epoch, paid in this one."""


class Payout(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """What one account earned in this epoch (as worker, creator and verifier), its new
    cumulative total, and how many of the batch's receipts it rendered."""

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
    previous_total: str
    """The total of the epoch before (0 for the first): what this epoch added on top."""
    stake_block: int | None
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
    """A receipts batch of this format or an older one (v4: every receipt pays its worker;
    v3: also no verifier is paid)."""
    batch = msgspec.json.decode(data, type=ReceiptsBatch)
    if batch.format in (_OLD_RECEIPTS_FORMAT, _V4_RECEIPTS_FORMAT):
        if any(e.payout is not None for e in batch.receipts):
            raise ValueError(f"a {batch.format} batch cannot name payout addresses")
        if batch.format == _OLD_RECEIPTS_FORMAT and any(e.verifiers for e in batch.receipts):
            raise ValueError(f"a {_OLD_RECEIPTS_FORMAT} batch cannot pay verifiers")
    elif batch.format != RECEIPTS_FORMAT:
        raise ValueError(f"unknown receipts batch format {batch.format!r}")
    return batch


def decode_epoch(data: bytes) -> EpochFile:
    """An epoch file of this format or the one before."""
    epoch = msgspec.json.decode(data, type=EpochFile)
    if epoch.format not in (EPOCH_FORMAT, _OLD_EPOCH_FORMAT):
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
