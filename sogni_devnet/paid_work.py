"""Paid work as a coordinator records it, for tests and benchmarks of settlement.

Each receipt answers an offer the coordinator signed, for an image of a request its payer
signed (the job id derived from the request hash), and is settled in the ledger the way
billing does it (reserve, settle, refund), paid with bought Spark, Daily Boost Spark, SOGNI,
or not at all. The keys are deterministic test keys: never use them for anything real.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from sogni_coordinator.ledger import Ledger, partial_value
from sogni_coordinator.store import Store
from sogni_protocol import eip712, epoch_math
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import JobOffer, JobParams, Receipt, RenderRequest
from sogni_protocol.pricing import Price, Quote

__all__ = [
    "COORDINATOR",
    "COORDINATOR_KEY",
    "MODEL",
    "PAYER",
    "PAYER_KEY",
    "STEPS",
    "Payment",
    "SignedReceipt",
    "signed_receipt",
    "store_receipts",
    "worker",
]

MODEL = "sogni-tiny-sd"
COORDINATOR_KEY: LocalAccount = Account.from_key(keccak(b"settlement coordinator"))
COORDINATOR = COORDINATOR_KEY.address
PAYER_KEY: LocalAccount = Account.from_key(keccak(b"settlement payer"))
PAYER = PAYER_KEY.address
STEPS = 8
_jobs = itertools.count(1)


def worker(i: int) -> LocalAccount:
    acct: LocalAccount = Account.from_key(keccak(f"settlement worker {i}".encode()))
    return acct


def signed_receipt(
    key: LocalAccount,
    domain: Domain,
    *,
    work_units: int = 43_200,
    model: str = MODEL,
    job_id: bytes | None = None,
    price_factor_bps: int = 10_000,
    steps_done: int = STEPS,
    payout: str | None = None,
    version: str | None = None,
) -> SignedReceipt:
    """A receipt for `work_units` (a full job's), answering an offer the coordinator signed,
    for image 0 of a request the payer signed (its job id derived from the request).
    `payout`: the account the receipt pays (None: the worker); `version`: an older EIP-712
    version to sign the offer and receipt under (as a node and coordinator of that time did)."""
    signing = domain.at(version) if version is not None else domain
    request = eip712.sign_request(
        PAYER_KEY.key,
        domain,
        RenderRequest(
            model_id=model,
            positive_prompt=f"request {next(_jobs)}",
            network="fast" if price_factor_bps == 10_000 else "relaxed",
            payer=PAYER,
            expiry=2_000_000_000,
        ),
    )
    job = job_id if job_id is not None else eip712.job_id_of(eip712.request_hash(request), 0)
    offer = JobOffer(
        job_id=job,
        coordinator=COORDINATOR,
        model_id=model,
        params_hash=keccak(b"params" + job),
        steps=STEPS,
        width=64,
        height=64,
        seed=1,
        work_units=work_units,
        deadline=1_700_000_600,
        price_factor_bps=price_factor_bps,
    )
    offer_signature = eip712.sign_digest(COORDINATOR_KEY.key, eip712.offer_hash(signing, offer))
    receipt = Receipt(
        job_id=job,
        offer_hash=eip712.offer_hash(signing, offer),
        worker=key.address,
        coordinator=COORDINATOR,
        model_id=model,
        result_hash=keccak(b"image" + job),
        steps_done=steps_done,
        work_units=work_units * steps_done // STEPS,
        completed_at=1_700_000_000,
        price_factor_bps=price_factor_bps,
        payout=payout,
    )
    signature = eip712.sign_digest(key.key, eip712.receipt_digest(signing, receipt))
    return SignedReceipt(receipt, signature, offer, offer_signature, request)


class SignedReceipt(NamedTuple):
    receipt: Receipt
    signature: bytes
    offer: JobOffer
    offer_signature: bytes
    request: RenderRequest


Payment = Literal["spark", "free", "sogni", "none"]


def store_receipts(
    store: Store,
    receipts: list[SignedReceipt],
    *,
    paid: Payment = "spark",
) -> None:
    """As the dispatcher and billing would: a request with one job per receipt, reserved by
    `payer` (`paid`: with bought Spark, Daily Boost Spark or SOGNI; "none": no payer), then
    the receipt and the ledger's settlement of it."""
    ledger = Ledger(store.path)
    for r in receipts:
        params = JobParams(
            model_id=r.receipt.model_id,
            positive_prompt="p",
            steps=STEPS,
            guidance=4.0,
            width=64,
            height=64,
            seed=1,
        )
        request_id = eip712.request_hash(r.request)
        network = "fast" if r.offer.price_factor_bps == 10_000 else "relaxed"
        store.add_request(
            request_id,
            model_id=r.receipt.model_id,
            network=network,
            token_type="sogni" if paid == "sogni" else "spark",
            client_peer="test",
            jobs=[(r.receipt.job_id, params, r.offer.work_units)],
        )
        if paid != "none":
            spark = epoch_math.expected_charge(r.offer.work_units, r.offer.price_factor_bps, 1, 1)
            per_image = Price(1.0, r.offer.work_units, spark, spark)  # 1 SOGNI per Spark
            quote = Quote(
                r.receipt.model_id,
                1,
                network,
                "sogni" if paid == "sogni" else "spark",
                0.005,
                per_image,
            )
            if paid == "spark":
                ledger.credit_purchase(PAYER, spark, micro=True)
            elif paid == "free":
                _grant_free(ledger, PAYER, spark)
            else:
                ledger.deposit_sogni(PAYER, spark)
            ledger.reserve(
                request_id,
                PAYER,
                quote,
                authorization=request_id,
                authorization_expiry=r.request.expiry,
                signature=r.request.payer_signature,
                network_id=r.request.network_id,
            )
        assert store.store_receipt(
            r.receipt, r.signature, request_id, offer=(r.offer, r.offer_signature)
        )
        if paid != "none":
            value = partial_value(per_image.spark_micro, r.receipt.steps_done, STEPS)
            ledger.settle(
                request_id,
                value,
                r.receipt.worker,
                3000,
                500,
                model_id=MODEL,
                job_id=r.receipt.job_id,
            )
            ledger.refund(request_id)


def _grant_free(ledger: Ledger, payer: str, amount: int) -> None:
    """Daily Boost Spark as the treasury issues it (any amount, for the tests)."""
    with ledger._tx() as db:
        ledger._post(
            db,
            "boost",
            payer.lower(),
            [("treasury", "spark_free", -amount), (payer.lower(), "spark_free", amount)],
        )
