"""The payer's signature on a referral query (EIP-712 `ReferralQuery`).

Why signed: a libp2p stream proves a peer id, not a wallet; only the account itself may read
its code or say who referred it. Like `BalanceQuery`, the signature names the sending peer id
and an expiry, so a copied query is useless to anyone else. A new type under the current
domain version (the rule in `eip712`), read by coordinators only.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address

from sogni_protocol.eip712 import DOMAIN_VERSION, Domain
from sogni_protocol.messages import ReferralQuery

__all__ = ["check_referral_query", "referral_document", "sign_referral_query"]

_EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_REFERRAL_QUERY = [
    {"name": "payer", "type": "address"},
    {"name": "peerId", "type": "string"},
    {"name": "code", "type": "string"},
    {"name": "expiry", "type": "uint64"},
]


def referral_document(
    domain: Domain, *, payer: str, peer_id: str, code: str, expiry: int
) -> dict[str, Any]:
    """The full EIP-712 document a payer signs to read its code / apply `code`."""
    return {
        "domain": domain.as_dict(),
        "types": {"EIP712Domain": _EIP712_DOMAIN, "ReferralQuery": _REFERRAL_QUERY},
        "primaryType": "ReferralQuery",
        "message": {
            "payer": to_checksum_address(payer),
            "peerId": peer_id,
            "code": code,
            "expiry": expiry,
        },
    }


def _document_of(domain: Domain, q: ReferralQuery) -> dict[str, Any]:
    return referral_document(domain, payer=q.payer, peer_id=q.peer_id, code=q.code, expiry=q.expiry)


def sign_referral_query(
    private_key: bytes, domain: Domain, *, peer_id: str, code: str = "", expiry: int
) -> ReferralQuery:
    if domain.version != DOMAIN_VERSION:
        raise ValueError(f"signing uses the current EIP-712 version {DOMAIN_VERSION!r}")
    payer = str(Account.from_key(private_key).address)
    q = ReferralQuery(payer=payer, peer_id=peer_id, code=code, expiry=expiry, signature=bytes(65))
    signed = Account.sign_message(
        encode_typed_data(full_message=_document_of(domain, q)), private_key
    )
    q.signature = bytes(signed.signature)
    return q


def check_referral_query(domain: Domain, q: ReferralQuery, peer_id: str, now: float) -> str | None:
    """Why the query is unacceptable from the authenticated `peer_id` at `now`, or None."""
    if q.peer_id != peer_id:
        return "the referral query was signed for another peer id than the sender's"
    if q.expiry < now:
        return "the referral query's signature has expired"
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=_document_of(domain, q)), signature=q.signature
        )
    except Exception:  # eth-keys raises several types for malformed signatures
        return "the referral query's signature does not recover"
    if str(signer).lower() != q.payer.lower():
        return "the referral query is not signed by its payer"
    return None
