"""Helpers for the settlement tests: signed receipts in a coordinator store, each answering a
coordinator-signed offer and paid for by a payer in the ledger (as the dispatcher and billing
would leave them), and a chain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from sogni_chain import Chain, Deployment, deploy_all
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


def settler(store: Store, net: Net, tmp: Path, **kw: object) -> Settler:
    return Settler(
        store,
        net.d,
        sender=kw.pop("sender", net.settler),  # type: ignore[arg-type]
        rules=kw.pop("rules", rules()),  # type: ignore[arg-type]
        publish_dir=tmp / "epochs",
        **kw,  # type: ignore[arg-type]
    )
