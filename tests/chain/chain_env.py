"""Shared helpers for the chain tests (a uniquely named module: conftest is not importable)."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from sogni_chain import Addresses, Chain, Deployment, deploy_all
from sogni_chain.anvil import find_anvil

CHAINS = ["embedded", "anvil"]
SOGNI = 10**18
DISTRIBUTOR_FUNDING = 1_000_000 * SOGNI
WORKER_FUNDING = 10_000 * SOGNI


@dataclass
class Env:
    """A deployed network and its cast: who governs, settles, slashes, works and relays."""

    kind: str
    chain: Chain
    addresses: Addresses
    d: Deployment
    treasury: LocalAccount  # also governance (admin roles)
    coordinator: LocalAccount  # SETTLEMENT_ROLE
    slasher: LocalAccount  # SLASHER_ROLE
    workers: list[LocalAccount]
    relayer: LocalAccount  # holds nothing, pays gas for others


def anvil_missing_reason() -> str | None:
    if find_anvil() is None:
        return (
            "anvil binary not installed (npm ci --prefix contracts installs @foundry-rs/anvil, "
            "or set SOGNI_ANVIL); anvil chain tests skipped"
        )
    return None


def make_env(kind: str, chain: Chain) -> Env:
    accts = chain.accounts
    treasury, coordinator, slasher = accts[0], accts[1], accts[2]
    workers, relayer = accts[3:9], accts[9]
    addresses = deploy_all(
        chain,
        treasury,
        coordinator=coordinator,
        slasher=slasher,
        distributor_funding=DISTRIBUTOR_FUNDING,
    )
    d = Deployment(chain, addresses, sender=treasury)
    for w in workers:
        d.token.transfer(w, WORKER_FUNDING)
    return Env(kind, chain, addresses, d, treasury, coordinator, slasher, workers, relayer)
