"""Sogni chain layer: the contracts' artifacts, a web3 connection that behaves the same on the
embedded EVM and on anvil, typed contract wrappers, and deployment.

    chain = connect()                      # in-process EVM; connect("http://127.0.0.1:8545")
    addrs = deploy_all(chain, chain.accounts[0], coordinator=chain.accounts[1])
    d = Deployment(chain, addrs)
    d.distributor.post_root(1, tree.root, total, receipts_hash, sender=chain.accounts[1])
"""

from .artifacts import CONTRACT_NAMES, Artifact, load_artifact
from .chain import ANVIL_MNEMONIC, Chain, Event, Signer, Tx, anvil_dev_keys, connect
from .contracts import Distributor, Eip712Domain, License, Staking, Token
from .deploy import Addresses, Deployment, deploy_all
from .errors import ChainRevert

__all__ = [
    "ANVIL_MNEMONIC",
    "CONTRACT_NAMES",
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
    "load_artifact",
]
