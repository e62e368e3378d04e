"""A network's signer set: the coordinator offer keys of one network, signed by its operator.

Why: a network runs several coordinators, each signing its own offers with its own key. A
node should not need every coordinator key in its `trusted_coordinators`, nor trust a key
just because a coordinator says it belongs to the network. The network's operator signs one
document (EIP-712 `NetworkSignerSet`: network id, serial, signers, issued time) under the
same domain as offers and receipts (chain and distributor); a node configured with the
operator's address (`network_operators`) accepts offers from every signer of a valid set.

Rules a checker applies (`check_signer_set`):
- signed by one of the configured operator keys, under the node's domain;
- for the node's network (a set of another network is refused);
- 1..`MAX_SIGNERS` distinct signers; the file at most `MAX_FILE_BYTES`;
- a newer serial replaces an older one and an older serial is never taken back (the node
  keeps the highest it accepted: `sogni_node.trust.NetworkSigners`), so a replayed old set
  cannot bring back a key the operator removed. Two different sets under one serial: the
  one already held stays.

The file is JSON (`encode_signer_set`), written by `sogni-coordinator network signers sign`
and served by coordinators at `GET /v1/network/signers` and in the libp2p `Welcome`
(`messages.Welcome.signer_set`, to nodes that say they read it).
"""

from __future__ import annotations

from typing import Any

import msgspec
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address

from sogni_protocol.eip712 import DOMAIN_VERSION, Domain, same_address
from sogni_protocol.errors import DECODE_ERRORS
from sogni_protocol.messages import MAX_SET_SIGNERS as MAX_SIGNERS
from sogni_protocol.messages import NetworkSignerSet, SignedSignerSet

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_SIGNERS",
    "NetworkSignerSet",
    "SignedSignerSet",
    "SignerSetError",
    "check_signer_set",
    "decode_signer_set",
    "encode_signer_set",
    "replaces",
    "sign_signer_set",
    "signer_set_document",
]

MAX_FILE_BYTES = 64 * 1024
"""A set of `MAX_SIGNERS` is about 12 KiB of JSON."""

_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "NetworkSignerSet": [
        {"name": "networkId", "type": "string"},
        {"name": "serial", "type": "uint64"},
        {"name": "signers", "type": "address[]"},
        {"name": "issuedAt", "type": "uint64"},
    ],
}


class SignerSetError(ValueError):
    """A signer-set file that cannot be read or decoded (one line, names the problem)."""


# The set's structs live in `messages` (a `Welcome` carries one) and are re-exported here.


def signer_set_document(domain: Domain, signer_set: NetworkSignerSet) -> dict[str, Any]:
    """The EIP-712 document as signed (any standard library verifies it as is)."""
    return {
        "domain": domain.as_dict(),
        "types": _TYPES,
        "primaryType": "NetworkSignerSet",
        "message": {
            "networkId": signer_set.network_id,
            "serial": signer_set.serial,
            "signers": [to_checksum_address(s) for s in signer_set.signers],
            "issuedAt": signer_set.issued_at,
        },
    }


def sign_signer_set(
    operator_key: bytes, domain: Domain, signer_set: NetworkSignerSet
) -> SignedSignerSet:
    """Sign `signer_set` with the operator's key under the current domain version."""
    if domain.version != DOMAIN_VERSION:
        raise ValueError(f"signing uses the current EIP-712 version {DOMAIN_VERSION!r}")
    lowered = [s.lower() for s in signer_set.signers]
    if len(set(lowered)) != len(lowered):
        raise ValueError("a signer set names each signer once")
    doc = encode_typed_data(full_message=signer_set_document(domain, signer_set))
    signed = Account.sign_message(doc, operator_key)
    return SignedSignerSet(
        set=signer_set,
        operator=str(Account.from_key(operator_key).address),
        signature="0x" + bytes(signed.signature).hex(),
    )


def check_signer_set(
    domain: Domain, signed: SignedSignerSet, operators: list[str], network_id: str
) -> str | None:
    """Why `signed` is not a valid set of `network_id` signed by one of `operators` under
    `domain`, or None."""
    s = signed.set
    if s.network_id != network_id:
        return f"signer set is for network {s.network_id!r}, not {network_id!r}"
    if not any(same_address(signed.operator, op) for op in operators):
        return f"signer set signed by {signed.operator}, not a configured network operator"
    lowered = [a.lower() for a in s.signers]
    if len(set(lowered)) != len(lowered):
        return "signer set names a signer twice"
    try:
        doc = encode_typed_data(full_message=signer_set_document(domain, s))
        got = str(Account.recover_message(doc, signature=bytes.fromhex(signed.signature[2:])))
    except Exception as exc:  # eth-keys raises several types for malformed signatures
        return f"signer set signature does not recover ({type(exc).__name__})"
    if not same_address(got, signed.operator):
        return "signer set is not signed by its operator (or is for another chain or distributor)"
    return None


def replaces(held: SignedSignerSet | None, candidate: SignedSignerSet) -> bool:
    """Whether a checked `candidate` replaces the `held` set: a strictly higher serial."""
    return held is None or candidate.set.serial > held.set.serial


def encode_signer_set(signed: SignedSignerSet) -> bytes:
    return msgspec.json.format(msgspec.json.encode(signed), indent=2) + b"\n"


def decode_signer_set(data: bytes) -> SignedSignerSet:
    """Decode a set file's bytes (size-limited, strict); `SignerSetError` names the problem."""
    if len(data) > MAX_FILE_BYTES:
        raise SignerSetError(f"signer set is {len(data)} bytes, more than {MAX_FILE_BYTES}")
    try:
        return msgspec.json.decode(data, type=SignedSignerSet)
    except DECODE_ERRORS as exc:
        raise SignerSetError(f"not a signer set: {exc}") from None
