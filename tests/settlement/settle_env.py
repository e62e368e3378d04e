"""Helpers for the settlement tests: signed receipts in a coordinator store, and a chain."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from sogni_chain import Chain, Deployment, deploy_all
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import JobParams, Receipt
from sogni_protocol.payout_rules import SOGNI, PayoutRules, SettlementConfig

MODEL = "sogni-tiny-sd"
COORDINATOR = "0x" + "c0" * 20
FUNDING = 1_000_000 * SOGNI
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
) -> tuple[Receipt, bytes]:
    job = job_id if job_id is not None else keccak(f"job {next(_jobs)}".encode())
    receipt = Receipt(
        job_id=job,
        offer_hash=keccak(b"offer" + job),
        worker=key.address,
        coordinator=COORDINATOR,
        model_id=model,
        result_hash=keccak(b"image" + job),
        steps_done=8,
        work_units=work_units,
        completed_at=1_700_000_000,
    )
    return receipt, eip712.sign_receipt(key.key, domain, receipt)


def store_receipts(store: Store, receipts: list[tuple[Receipt, bytes]]) -> None:
    """As the dispatcher would: a request with one job per receipt, then the receipt."""
    for receipt, signature in receipts:
        params = JobParams(
            model_id=receipt.model_id,
            positive_prompt="p",
            steps=8,
            guidance=4.0,
            width=64,
            height=64,
            seed=1,
        )
        request_id = keccak(b"request" + receipt.job_id)
        store.add_request(
            request_id,
            model_id=receipt.model_id,
            network="fast",
            token_type="spark",
            client_peer="test",
            jobs=[(receipt.job_id, params, receipt.work_units)],
        )
        assert store.store_receipt(receipt, signature, request_id)


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


def settler(store: Store, net: Net, tmp: Path, **kw: object) -> Settler:
    return Settler(
        store,
        net.d,
        sender=net.settler,
        rules=kw.pop("rules", rules()),  # type: ignore[arg-type]
        publish_dir=tmp / "epochs",
        **kw,  # type: ignore[arg-type]
    )
