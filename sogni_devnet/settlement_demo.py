"""Settlement for a local network in one process: the embedded chain cannot be shared.

The embedded EVM (eth-tester) lives inside the process that created it, so in the local demo
the *launcher* owns it: it deploys the contracts before starting the coordinator and nodes
(they read the addresses file, so receipts are signed under the deployed distributor's
domain), and after the renders it calls `settle_and_claim`, which closes the epoch from the
coordinator's SQLite database (WAL lets it read while the coordinator runs) and has each node
wallet claim. Separate processes that need a shared chain use anvil (`chain_url`).

Deployment on a fresh embedded chain is deterministic (same dev keys, same nonces), so the
addresses file it writes is always the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sogni_chain import Deployment, Signer, connect, deploy_all
from sogni_coordinator.settlement.epochs import EpochResult, Settler
from sogni_coordinator.store import Store
from sogni_node.rewards import claim_from_tree
from sogni_protocol.epoch_files import decode_epoch
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.payout_rules import SOGNI, PayoutRules, SettlementConfig

__all__ = ["SettleAndClaim", "embedded_deployment", "settle_and_claim"]

GAS_ALLOWANCE_WEI = 10**17
"""ETH given to a node wallet that has less, so it can pay for its own claim."""


def embedded_deployment(
    addresses_path: str | Path | None = None, *, funding_sogni: int = 1_000_000
) -> Deployment:
    """A fresh in-process chain with the four contracts deployed and the distributor funded.

    Dev account 0 is treasury and governance (the default sender), account 1 holds
    SETTLEMENT_ROLE (`settle_and_claim`'s default settler). With ``addresses_path`` the
    addresses file is written there for the coordinator's and nodes' ``addresses_file``.
    """
    chain = connect()
    treasury, settler = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(
        chain,
        treasury,
        coordinator=settler,
        distributor_funding=funding_sogni * SOGNI,
        path=addresses_path,
    )
    return Deployment(chain, addresses, sender=treasury)


@dataclass(frozen=True)
class SettleAndClaim:
    epoch: EpochResult | None
    """The epoch closed now (None: no new receipts, only claims were attempted)."""
    claimed: dict[str, int]
    """Node wallet (checksummed, in ``node_keys`` order) -> SOGNI base units claimed now."""


def settle_and_claim(
    db_path: str | Path,
    deployment: Deployment,
    node_keys: Sequence[str | bytes],
    *,
    settler: Signer | None = None,
    publish_dir: str | Path | None = None,
    rules: PayoutRules | None = None,
) -> SettleAndClaim:
    """Close the epoch from the coordinator database at ``db_path``, then claim for each node.

    ``deployment``: from `embedded_deployment` (or any chain). ``node_keys``: the nodes'
    wallet private keys (e.g. ``load_wallet(path, password).private_key``); a wallet without
    gas gets ``GAS_ALLOWANCE_WEI`` from dev account 0 first. ``settler`` defaults to dev
    account 1, ``publish_dir`` to ``<db dir>/epochs``, ``rules`` to the default
    `SettlementConfig` on a local network (free work paid within a generous budget). Safe to
    call again: closing is idempotent, claiming twice pays 0.
    """
    chain = deployment.chain
    db = Path(db_path)
    store = Store(db)
    try:
        result = Settler(
            store,
            deployment,
            sender=settler if settler is not None else chain.accounts[1],
            rules=rules if rules is not None else SettlementConfig().rules(local=True),
            publish_dir=publish_dir if publish_dir is not None else db.parent / "epochs",
        ).close_epoch()
        latest = store.last_epoch_record(state="posted")
    finally:
        store.close()
    claimed: dict[str, int] = {}
    tree = MerkleTree(decode_epoch(latest.plan).leaf_ints()) if latest is not None else None
    for key in node_keys:
        wallet = chain.add_key(key)
        claimed[wallet.address] = 0
        if tree is None:
            continue
        if chain.eth_balance(wallet) < GAS_ALLOWANCE_WEI // 10:
            chain.send_eth(wallet, GAS_ALLOWANCE_WEI, sender=chain.accounts[0])
        claimed[wallet.address] = claim_from_tree(deployment.distributor, wallet, tree)
    return SettleAndClaim(epoch=result, claimed=claimed)
