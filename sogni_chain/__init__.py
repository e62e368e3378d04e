"""Sogni chain layer: the contracts' artifacts, a web3 connection that behaves the same on the
embedded EVM and on anvil, typed contract wrappers, and deployment.

    chain = connect()                      # in-process EVM; connect("http://127.0.0.1:8545")
    addrs = deploy_all(chain, chain.accounts[0], coordinator=chain.accounts[1])
    d = Deployment(chain, addrs)
    d.distributor.post_root(1, tree.root, total, receipts_hash, sender=chain.accounts[1])
    d.distributor.claim(worker, *tree.proof_for(worker), sender=relayer)  # once matured

Epochs are 1, 2, 3, ...; claims verify against the newest *matured* root
(``distributor.matured_epoch()``: posted at least ``claim_delay()`` seconds ago).
"""

from .artifacts import CONTRACT_NAMES, Artifact, load_artifact
from .chain import ANVIL_MNEMONIC, Chain, Event, Signer, Tx, anvil_dev_keys, connect
from .contracts import (
    DISTRIBUTOR_DOMAIN_VERSION,
    Distributor,
    Eip712Domain,
    License,
    Staking,
    Token,
    sign_stake_authorization,
    stake_authorization_typed_data,
)
from .deploy import Addresses, Deployment, deploy_all, deploy_defaults
from .errors import ChainRevert

__all__ = [
    "ANVIL_MNEMONIC",
    "CONTRACT_NAMES",
    "DISTRIBUTOR_DOMAIN_VERSION",
    "Addresses",
    "Artifact",
    "Chain",
    "ChainRevert",
    "Deployment",
    "Distributor",
    "Eip712Domain",
    "Event",
    "License",
    "Signer",
    "Staking",
    "Token",
    "Tx",
    "anvil_dev_keys",
    "connect",
    "deploy_all",
    "deploy_defaults",
    "load_artifact",
    "sign_stake_authorization",
    "stake_authorization_typed_data",
]
