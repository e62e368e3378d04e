"""The payer's signature on a content report (EIP-712 `ContentReport`).

Why signed: a libp2p stream proves a peer id, not a wallet, and only a request's payer may
report it (a stranger must not file reports on others' jobs, nor flood the operator with
them). The signature names the sending peer id and an expiry, like `BalanceQuery`, so a copied
report is useless to anyone else; the note is signed by its keccak hash (the document stays
small whatever the note).

The type is defined here rather than in `eip712`'s versioned tables: it is a new type under
the current domain version (the rule in `eip712`), read by coordinators only.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from sogni_protocol.eip712 import DOMAIN_VERSION, Domain
from sogni_protocol.messages import ContentReport, ReportReason

__all__ = ["check_report", "report_document", "sign_report"]

_EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_CONTENT_REPORT = [
    {"name": "payer", "type": "address"},
    {"name": "peerId", "type": "string"},
    {"name": "requestId", "type": "bytes32"},
    {"name": "imageIndex", "type": "int32"},
    {"name": "reason", "type": "string"},
    {"name": "noteHash", "type": "bytes32"},
    {"name": "expiry", "type": "uint64"},
]


def report_document(
    domain: Domain,
    *,
    payer: str,
    peer_id: str,
    request_id: bytes,
    image_index: int,
    reason: str,
    note: str,
    expiry: int,
) -> dict[str, Any]:
    """The full EIP-712 document a payer signs to report `request_id` from `peer_id`."""
    return {
        "domain": domain.as_dict(),
        "types": {"EIP712Domain": _EIP712_DOMAIN, "ContentReport": _CONTENT_REPORT},
        "primaryType": "ContentReport",
        "message": {
            "payer": to_checksum_address(payer),
            "peerId": peer_id,
            "requestId": request_id,
            "imageIndex": image_index,
            "reason": reason,
            "noteHash": keccak(note.encode("utf-8")),
            "expiry": expiry,
        },
    }


def _document_of(domain: Domain, report: ContentReport) -> dict[str, Any]:
    return report_document(
        domain,
        payer=report.payer,
        peer_id=report.peer_id,
        request_id=report.request_id,
        image_index=report.image_index,
        reason=report.reason,
        note=report.note,
        expiry=report.expiry,
    )


def sign_report(
    private_key: bytes,
    domain: Domain,
    *,
    peer_id: str,
    request_id: bytes,
    reason: ReportReason,
    image_index: int = -1,
    note: str = "",
    expiry: int,
) -> ContentReport:
    """The key's wallet reports `request_id` (one image, or all with -1) from `peer_id`."""
    if domain.version != DOMAIN_VERSION:
        raise ValueError(f"signing uses the current EIP-712 version {DOMAIN_VERSION!r}")
    payer = str(Account.from_key(private_key).address)
    unsigned = ContentReport(
        payer=payer,
        peer_id=peer_id,
        request_id=request_id,
        image_index=image_index,
        reason=reason,
        note=note,
        expiry=expiry,
        signature=bytes(65),
    )
    signed = Account.sign_message(
        encode_typed_data(full_message=_document_of(domain, unsigned)), private_key
    )
    unsigned.signature = bytes(signed.signature)
    return unsigned


def check_report(domain: Domain, report: ContentReport, peer_id: str, now: float) -> str | None:
    """Why the report is unacceptable from the authenticated `peer_id` at `now`, or None."""
    if report.peer_id != peer_id:
        return "the report was signed for another peer id than the sender's"
    if report.expiry < now:
        return "the report's signature has expired"
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=_document_of(domain, report)),
            signature=report.signature,
        )
    except Exception:  # eth-keys raises several types for malformed signatures
        return "the report's signature does not recover"
    if str(signer).lower() != report.payer.lower():
        return "the report is not signed by its payer"
    return None
