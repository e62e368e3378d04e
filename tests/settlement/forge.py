"""A forger's toolkit for the audit tests: edit a copy of a published epochs folder and, like
a dishonest coordinator holding its own key, make everything downstream consistent again
(receipts file re-hashed and renamed, epoch files re-pointed, leaves, totals, payouts, roots
and tree dumps rebuilt), so that only a recomputation from the evidence can tell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from sogni_protocol import eip712, epoch_math
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    BatchEntry,
    EpochFile,
    OfferRecord,
    PayerAuthorization,
    PayerSettlement,
    ReceiptsBatch,
    content_hash,
    decode_batch,
    decode_epoch,
    encode,
    epoch_filename,
    receipts_filename,
)
from sogni_protocol.merkle import MerkleTree

from .settle_env import SignedReceipt


def epoch_file(folder: Path, n: int) -> EpochFile:
    return decode_epoch((folder / epoch_filename(n)).read_bytes())


def batch_of(folder: Path, n: int) -> ReceiptsBatch:
    return decode_batch((folder / epoch_file(folder, n).receipts_file).read_bytes())


def write_epoch(folder: Path, ef: EpochFile) -> None:
    (folder / epoch_filename(ef.epoch)).write_bytes(encode(ef))


def replace(struct: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(struct, **changes)


def publish_batch(folder: Path, n: int, batch: ReceiptsBatch) -> None:
    """Replace epoch `n`'s batch: new content address, epoch `n` re-pointed at it, and every
    epoch from `n` on rebuilt from the batches (leaves, totals, payouts, roots, trees)."""
    ef = epoch_file(folder, n)
    (folder / ef.receipts_file).unlink()
    raw = encode(batch)
    digest = content_hash(raw)
    name = f"receipts/{receipts_filename(digest)}"
    (folder / name).write_bytes(raw)
    write_epoch(folder, replace(ef, receipts_hash="0x" + digest.hex(), receipts_file=name))
    rebuild(folder, n)


def rebuild(folder: Path, start: int) -> None:
    """Recompute epochs `start`.. (as the settler would) from their batches."""
    n = start
    previous = dict(epoch_file(folder, start - 1).leaf_ints()) if start > 1 else {}
    while (folder / epoch_filename(n)).exists():
        ef, batch = epoch_file(folder, n), batch_of(folder, n)
        earned = epoch_math.earned_by_account(batch.receipts, batch.restorations)
        leaves = epoch_math.cumulative_leaves(previous, earned)
        cumulative = dict(leaves)
        tree = MerkleTree(leaves)
        write_epoch(
            folder,
            replace(
                ef,
                root=tree.root_hex,
                total=str(sum(cumulative.values())),
                previous_total=str(sum(previous.values())),
                payouts=epoch_math.payouts(batch.receipts, earned, cumulative),
                leaves=[(a, str(v)) for a, v in leaves],
            ),
        )
        tree_path = folder / epoch_filename(n, "tree.json")
        tree_path.write_text(json.dumps(tree.dump(), separators=(",", ":")))
        previous = cumulative
        n += 1


def revalue(batch: ReceiptsBatch, e: BatchEntry, *, take_bps: int | None = None) -> BatchEntry:
    """`e` with its value and split recomputed by the rules (at `take_bps`, if given)."""
    worker = to_checksum_address(e.worker)
    if take_bps is None:
        stake = batch.stakes.get(worker)
        take_bps = batch.rules.take_bps(int(stake) if stake is not None else None)
    v = epoch_math.split_entry(
        e.settlement, e.model_id, batch.rules, take_bps, int(batch.free_requested)
    )
    return replace(
        e,
        paid_value=str(v.paid_value),
        free_value=str(v.free_value),
        take_bps=take_bps,
        worker_amount=str(v.split.worker),
        creator=v.split.creator,
        creator_amount=str(v.split.creator_amount),
    )


def entry_for(
    batch: ReceiptsBatch,
    signed: SignedReceipt,
    *,
    payer: str,
    authorization: PayerAuthorization | None,
) -> BatchEntry:
    """A batch entry for a receipt (signed by its worker, answering a coordinator-signed
    offer), paid in Spark at the offer's price by `payer` with `authorization`, split by the
    rules: as consistent as a forger can make it."""
    r, offer = signed.receipt, signed.offer
    charge = epoch_math.expected_charge(
        offer.work_units, offer.price_factor_bps, r.steps_done, offer.steps
    )
    settlement = PayerSettlement(
        payer=payer,
        token_type="spark",
        spark_free=0,
        spark_paid=charge,
        sogni=0,
        spark_equiv=charge,
        authorization=authorization,
    )
    entry = BatchEntry.of(
        r,
        signed.signature,
        offer=OfferRecord.of(offer, signed.offer_signature),
        settlement=settlement,
        paid_value=0,
        free_value=0,
        take_bps=0,
        worker_amount=0,
        creator=None,
        creator_amount=0,
    )
    return revalue(batch, entry)


def authorization_of(signed: SignedReceipt, index: int = 0) -> PayerAuthorization:
    """The payer authorization the ledger keeps for `signed`'s request."""
    request = signed.request
    assert request.payer_signature is not None
    return PayerAuthorization(
        request_hash="0x" + eip712.request_hash(request).hex(),
        network_id=request.network_id,
        expiry=request.expiry,
        signature="0x" + request.payer_signature.hex(),
        index=index,
    )


def signed_by(key: LocalAccount, domain: Domain, signed: SignedReceipt) -> PayerAuthorization:
    """`signed`'s authorization, but signed by `key` instead of the payer it names."""
    again = eip712.sign_request(key.key, domain, replace(signed.request, payer_signature=None))
    return authorization_of(SignedReceipt(*signed[:4], again))
