"""The ModelStake contract: SOGNI staked on a model (id = keccak256 of its catalog name) to
raise its place in model lists. Deployed with the others (`deploy_all`), its address in the
addresses file as `model_stake`."""

from __future__ import annotations

from collections.abc import Iterable

from eth_typing import ChecksumAddress
from web3 import Web3

from .chain import Chain, Signer, Tx
from .contracts import _Bound

__all__ = ["MAX_LOG_BLOCKS", "ModelStake", "deploy_model_stake", "keys_of", "model_key"]

MAX_LOG_BLOCKS = 50_000
"""Blocks read per `get_logs` call (public nodes cap a range)."""


def model_key(name: str) -> bytes:
    """The contract's model id: keccak256 of the catalog name (UTF-8)."""
    return bytes(Web3.keccak(text=name))


class ModelStake(_Bound):
    NAME = "ModelStake"
    COOLDOWN_SECONDS = 7 * 24 * 3600

    def stake(self, model: str, amount: int, *, sender: Signer | None = None) -> Tx:
        """Needs a prior ``Token.approve(model_stake, amount)``."""
        return self._send("stake", model_key(model), amount, sender=sender)

    def request_unstake(self, model: str, amount: int, *, sender: Signer | None = None) -> Tx:
        return self._send("requestUnstake", model_key(model), amount, sender=sender)

    def withdraw(self, model: str, *, sender: Signer | None = None) -> Tx:
        return self._send("withdraw", model_key(model), sender=sender)

    def total(self, model: str) -> int:
        """Wei counting for `model` now."""
        return int(self._call("totalStake", model_key(model)))

    def stake_of(self, model: str, account: Signer) -> int:
        return int(self._call("stakeOf", model_key(model), self._acct(account)))

    def totals_since(self, first_block: int, last_block: int) -> dict[bytes, int]:
        """Model id -> its latest total from the events in [first_block, last_block] (models
        with no event there are absent)."""
        out: dict[bytes, tuple[int, int, int]] = {}
        start = first_block
        while start <= last_block:
            end = min(last_block, start + MAX_LOG_BLOCKS - 1)
            for name in ("ModelStaked", "ModelUnstakeRequested"):
                for e in self.contract.events[name]().get_logs(from_block=start, to_block=end):
                    key = (int(e["blockNumber"]), int(e["logIndex"]))
                    model = bytes(e["args"]["model"])
                    if model not in out or out[model][:2] < key:
                        out[model] = (*key, int(e["args"]["modelTotal"]))
            start = end + 1
        return {m: v[2] for m, v in out.items()}


def deploy_model_stake(chain: Chain, token: str, *, sender: Signer) -> ChecksumAddress:
    address = chain.deploy("ModelStake", token, sender=sender).contract_address
    assert address
    return Web3.to_checksum_address(address)


def keys_of(names: Iterable[str]) -> dict[bytes, str]:
    """Model id -> catalog name, for the names a reader knows."""
    return {model_key(n): n for n in names}
