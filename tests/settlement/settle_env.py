"""Helpers for the settlement tests: signed receipts in a coordinator store, each answering a
coordinator-signed offer and paid for by a payer in the ledger (as the dispatcher and billing
would leave them), and a chain."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from sogni_chain import Chain, Deployment, deploy_all
from sogni_coordinator.disputes import DisputeBook, RefusalRecord
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_devnet.paid_work import (  # noqa: F401  (re-exported for the tests)
    COORDINATOR,
    COORDINATOR_KEY,
    MODEL,
    PAYER,
    PAYER_KEY,
    STEPS,
    SignedReceipt,
    signed_receipt,
    store_receipts,
    worker,
)
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import JobParams, Receipt
from sogni_protocol.payout_rules import SOGNI, PayoutRules, SettlementConfig

FUNDING = 1_000_000 * SOGNI


@dataclass
class Net:
    """A deployed chain and the accounts the settlement tests use."""

    kind: str
    chain: Chain
    d: Deployment
    treasury: LocalAccount
    settler: LocalAccount  # SETTLEMENT_ROLE

    @property
    def domain(self) -> Domain:
        return Domain(self.d.addresses.chain_id, self.d.addresses.distributor)


def make_net(kind: str, chain: Chain) -> Net:
    treasury, settler = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(chain, treasury, coordinator=settler, distributor_funding=FUNDING)
    return Net(kind, chain, Deployment(chain, addresses, sender=treasury), treasury, settler)


def rules(**overrides: object) -> PayoutRules:
    return SettlementConfig(**overrides).rules()  # type: ignore[arg-type]


def posted_epochs(net: Net) -> list[int]:
    """The epochs the distributor has a root for, in order."""
    return [int(r["epoch"]) for r in net.d.distributor.roots_posted()]


def settler(store: Store, net: Net, tmp: Path, **kw: object) -> Settler:
    return Settler(
        store,
        net.d,
        sender=kw.pop("sender", net.settler),  # type: ignore[arg-type]
        rules=kw.pop("rules", rules()),  # type: ignore[arg-type]
        publish_dir=tmp / "epochs",
        **kw,  # type: ignore[arg-type]
    )


def won_case(book: DisputeBook, payee: str, case: bytes, units: int) -> None:
    """A refused receipt of `units` work units (4 steps) for `payee`, recorded under `case`,
    whose worker then won its dispute: the next epoch owes its restoration."""
    refused = Receipt(
        job_id=b"\x09" * 32,
        offer_hash=b"\x00" * 32,
        worker=payee,
        coordinator=payee,
        model_id="sogni-test",
        result_hash=b"\x00" * 32,
        steps_done=4,
        work_units=units,
        completed_at=1,
    )
    params = JobParams(
        model_id="sogni-test",
        positive_prompt="p",
        steps=4,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )
    record = RefusalRecord(
        refused.job_id, case, payee, payee, refused, params, "float32", "step 0 over",
        b"\x01" * 32, 1, b"sig",
    )  # fmt: skip
    book.add(record)
    assert book.settle(case, worker_won=True)


def stored_at(store: Store, job_id: bytes) -> float:
    """When `store` stored the receipt of `job_id` (read from the file, as another process)."""
    db = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        (at,) = db.execute("SELECT stored_at FROM receipts WHERE job_id=?", (job_id,)).fetchone()
    finally:
        db.close()
    return float(at)
