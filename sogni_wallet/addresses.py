"""The addresses file: where the contracts live on one chain, written by `chain deploy`.

Parsed here once, with no web3 import, because every layer reads it: the chain layer to reach
the contracts, and nodes and coordinators to take their EIP-712 domain (chain id and
distributor) from it when they load their config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
from eth_typing import ChecksumAddress
from eth_utils import is_address, to_checksum_address

from sogni_protocol.atomic import atomic_write_text
from sogni_protocol.settings import DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT

__all__ = ["Addresses", "AddressesFileError", "apply_addresses_file"]


class AddressesFileError(ValueError):
    """An addresses file that is missing, malformed, or for another chain."""


def _address(raw: dict[str, Any], key: str, path: Path) -> ChecksumAddress:
    value = raw.get(key)
    if not isinstance(value, str) or not is_address(value):
        raise AddressesFileError(f"addresses file {path}: {key} is not an address ({value!r})")
    return to_checksum_address(value)


@dataclass(frozen=True)
class Addresses:
    """Where the contracts live on one chain."""

    chain_id: int
    token: ChecksumAddress
    staking: ChecksumAddress
    license: ChecksumAddress
    distributor: ChecksumAddress
    deployed_at_block: int = 0
    disputes: ChecksumAddress | None = None
    """Disputes.sol, where slashes go through a dispute window (absent: slash on Staking)."""
    model_stake: ChecksumAddress | None = None
    """ModelStake.sol, stake on models for visibility (absent in files written before it)."""

    def save(self, path: str | Path) -> None:
        """Write atomically and durably (a reader never sees half a file), keys sorted."""
        body = {k: v for k, v in asdict(self).items() if v is not None}
        atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, chain_id: int | None = None) -> Addresses:
        """Read an addresses file; with ``chain_id``, refuse one written for another chain."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise AddressesFileError(
                f"addresses file {path} not found (write it with `sogni-coordinator chain deploy`)"
            ) from None
        except (OSError, ValueError) as exc:
            raise AddressesFileError(f"addresses file {path} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise AddressesFileError(f"addresses file {path} is not a JSON object")
        try:
            file_chain = int(raw["chain_id"])
            block = int(raw.get("deployed_at_block", 0))
        except (KeyError, TypeError, ValueError):
            raise AddressesFileError(
                f"addresses file {path}: chain_id is missing or not a number"
            ) from None
        if not 1 <= file_chain < 2**63:
            raise AddressesFileError(f"addresses file {path}: chain_id {file_chain} is invalid")
        addresses = cls(
            chain_id=file_chain,
            token=_address(raw, "token", path),
            staking=_address(raw, "staking", path),
            license=_address(raw, "license", path),
            distributor=_address(raw, "distributor", path),
            deployed_at_block=block,
            disputes=_address(raw, "disputes", path) if raw.get("disputes") else None,
            model_stake=_address(raw, "model_stake", path) if raw.get("model_stake") else None,
        )
        if chain_id is not None and addresses.chain_id != chain_id:
            raise AddressesFileError(
                f"{path} is for chain {addresses.chain_id}, but connected to chain {chain_id}"
            )
        return addresses


def apply_addresses_file(cfg: msgspec.Struct) -> None:
    """Take the EIP-712 domain (chain id, verifying contract) from ``cfg.addresses_file``.

    Why: a receipt is only payable under the deployed distributor's domain, so the deployment
    file is the single source of truth; an explicit, different ``chain_id`` or
    ``verifying_contract`` next to it is a contradiction, reported rather than guessed.
    """
    path = Path(cfg.addresses_file).expanduser()  # type: ignore[attr-defined]
    addresses = Addresses.load(path)
    chain_id, distributor = addresses.chain_id, addresses.distributor
    configured_chain: int = cfg.chain_id  # type: ignore[attr-defined]
    configured_contract: str = cfg.verifying_contract  # type: ignore[attr-defined]
    if configured_chain not in (DEFAULT_CHAIN_ID, chain_id):
        raise ValueError(f"chain_id {configured_chain} contradicts {path} (chain {chain_id})")
    if configured_contract.lower() not in (UNDEPLOYED_CONTRACT, distributor.lower()):
        raise ValueError(
            f"verifying_contract {configured_contract} contradicts {path} ({distributor})"
        )
    msgspec.structs.force_setattr(cfg, "addresses_file", path)
    msgspec.structs.force_setattr(cfg, "chain_id", chain_id)
    msgspec.structs.force_setattr(cfg, "verifying_contract", distributor)
