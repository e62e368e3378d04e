"""The node's payout account: where its receipts' rewards go, and how journalled receipts
carry it.

A node may name `payout_address` (env `SOGNI_NODE_PAYOUT_ADDRESS`) distinct from the wallet
that signs its receipts: a partner container's signing key is thrown away with the container,
the rewards stay with the payout account (see docs/REWARDS.md). Each receipt signs it
(EIP-712 version "4"), so nobody can redirect a receipt's pay after signing.
"""

from __future__ import annotations

import msgspec
from eth_utils import is_checksum_address, to_checksum_address

from sogni_protocol.messages import Receipt

__all__ = ["ZERO_ADDRESS", "check_payout_address", "payout_of", "signed_form"]

ZERO_ADDRESS = "0x" + "00" * 20

_NO_PAYOUT_VERSIONS = frozenset({"1", "2", "3"})
"""EIP-712 versions whose receipts pay their worker only (no `payout` field)."""


def check_payout_address(address: str) -> str:
    """The checksummed payout address, or `ValueError` saying what is wrong with it.

    A mixed-case address must be a valid EIP-55 checksum (a typo in one hex digit is caught,
    not paid to a stranger); all-lower (or all-upper) hex has no checksum to check. The zero
    address is refused: nobody can claim what it is paid."""
    body = address[2:] if address.startswith("0x") else ""
    if len(body) != 40 or any(c not in "0123456789abcdefABCDEF" for c in body):
        raise ValueError(f"payout_address {address!r} is not a 0x address of 40 hex digits")
    if body.lower() != body and body.upper() != body and not is_checksum_address(address):
        raise ValueError(
            f"payout_address {address} has a wrong EIP-55 checksum (a mistyped digit?): "
            "copy it again, or give it all in lower case"
        )
    if int(body, 16) == 0:
        raise ValueError("payout_address is the zero address: nobody could claim its rewards")
    return to_checksum_address(address)


def payout_of(payout_address: str | None, wallet: str) -> str | None:
    """What a receipt's `payout` field holds for this node: None when it pays its own wallet."""
    if payout_address is None or payout_address.lower() == wallet.lower():
        return None
    return to_checksum_address(payout_address)


def signed_form(receipt: Receipt, domain_version: str, payout: str | None) -> Receipt:
    """A journalled receipt as it was signed. The journal keeps the payout (migration 5);
    a v4 receipt journalled before that comes back without it, and this node's `payout` is
    put back; receipts of older EIP-712 versions never had one."""
    if receipt.payout is not None or payout is None or domain_version in _NO_PAYOUT_VERSIONS:
        return receipt
    return msgspec.structs.replace(receipt, payout=payout)
