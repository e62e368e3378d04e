"""EIP-712 typed data for job offers, receipts, node bindings and payer authorizations.

The typed data built here is exactly what is signed, so any standard EIP-712 library
(eth-account, ethers) verifies it as is. `receipt_digest` is a hand-written digest of the
fixed `Receipt` type: it is what the coordinator uses on its hot path (several times faster
than `encode_typed_data`), and a test checks it against eth-account byte for byte.

Versions. The domain's `version` names the layout of every type below. The rule:
- new signatures always use `DOMAIN_VERSION` (the current one): signing under another
  version is refused;
- a change to any type (a field added, renamed, retyped) gets a new `DOMAIN_VERSION`, and the
  old one stays in `KNOWN_VERSIONS` (with its old type layouts) for as long as signatures made
  under it must verify: receipts are evidence for payouts long after they were signed;
- verification accepts exactly `KNOWN_VERSIONS`: `recover_*` use the version the `Domain`
  names (record it next to what was signed: `Domain.as_dict()`, `Domain.from_dict`), the
  `check_*` functions and `verify_receipt` (which know the expected signer) try the domain's
  version first and then every other known one; an unknown version is refused with a
  `SignatureError` that names it and the known ones.
Version "1" is byte-identical to the digests and signatures made before versions existed.
Version "2" adds `priceFactorBps` to `JobOffer` and `Receipt` (the tier's price factor, so
relaxed work is paid what the payer paid; a v1 offer or receipt is only valid at full price)
and `networkId` to `RenderAuthorization` and `DailyBoostClaim` (the ledger's network: with the
distributor in the domain, an authorization is good on one network only, and spent once there).
Version "3" adds `trajectoryRoot` to `Receipt`: the commitment to every step of the render
(docs/TRAJECTORY.md); a v1 or v2 receipt can only carry none (zero).
Version "4" adds `payout` to `Receipt`: the account its rewards go to (the worker's own when
the node names none), so a container's signing key can be thrown away; a v1..v3 receipt pays
its worker only.

A new type is not a change to a type: it keeps `DOMAIN_VERSION`, joins the current layout
(and every later one), and its documents verify under the versions that have it
(`_versions_with`). No existing digest changes. `KeyRotation` (a coordinator's offer key
handing over to a new one, signed by the old key) was added this way under version "4".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import coincurve
import msgspec
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak as _eth_keccak
from eth_utils import to_checksum_address

from sogni_protocol.errors import SignatureError
from sogni_protocol.messages import (
    DEFAULT_NETWORK_ID,
    FULL_PRICE_BPS,
    NO_TRAJECTORY,
    BalanceQuery,
    Capabilities,
    DailyBoostClaim,
    JobOffer,
    JobParams,
    KeyRotation,
    Receipt,
    RenderRequest,
    SignedKeyRotation,
    encode,
)


def _fastest_keccak() -> Callable[[bytes], bytes]:
    """Keccak-256 through safe-pysha3 when installed (~1.5 us a call, checked against
    eth_hash first), else eth_hash's pycryptodome backend (~11 us: a cffi state built and
    freed per call). A job costs the coordinator about eight (offer, params, receipt, signer
    address), so this is a tenth of its in-process work (bench "dispatch")."""
    try:
        from sha3 import keccak_256  # type: ignore[import-not-found]
    except ImportError:
        return _eth_keccak

    def keccak_pysha3(data: bytes) -> bytes:
        return keccak_256(data).digest()  # type: ignore[no-any-return]

    probe = b"sogni" * 30
    return keccak_pysha3 if keccak_pysha3(probe) == _eth_keccak(probe) else _eth_keccak


keccak = _fastest_keccak()


@functools.lru_cache(maxsize=4096)
def _checksum_of(raw: bytes) -> str:
    """EIP-55 address of 20 raw bytes; remembered, as a coordinator sees the same few
    hundred signers over and over (eth_utils' checksum costs ~40 us a call)."""
    text = raw.hex()
    flags = keccak(text.encode()).hex()
    return "0x" + "".join(
        c.upper() if f in "89abcdef" else c for c, f in zip(text, flags[:40], strict=True)
    )


DOMAIN_NAME = "SogniSupernet"
DOMAIN_VERSION = "4"
"""The version new signatures use."""
KNOWN_VERSIONS: tuple[str, ...] = ("1", "2", "3", "4")
"""Every version whose signatures still verify, the current one included (see the rule above)."""

_EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_TYPES_V1: dict[str, list[dict[str, str]]] = {
    "JobOffer": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "coordinator", "type": "address"},
        {"name": "modelId", "type": "string"},
        {"name": "paramsHash", "type": "bytes32"},
        {"name": "steps", "type": "uint32"},
        {"name": "width", "type": "uint32"},
        {"name": "height", "type": "uint32"},
        {"name": "seed", "type": "uint32"},
        {"name": "workUnits", "type": "uint256"},
        {"name": "deadline", "type": "uint64"},
    ],
    "Receipt": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "offerHash", "type": "bytes32"},
        {"name": "worker", "type": "address"},
        {"name": "coordinator", "type": "address"},
        {"name": "modelId", "type": "string"},
        {"name": "resultHash", "type": "bytes32"},
        {"name": "stepsDone", "type": "uint32"},
        {"name": "workUnits", "type": "uint256"},
        {"name": "completedAt", "type": "uint64"},
    ],
    "RenderAuthorization": [
        {"name": "payer", "type": "address"},
        {"name": "requestHash", "type": "bytes32"},
        {"name": "expiry", "type": "uint64"},
    ],
    "DailyBoostClaim": [
        {"name": "payer", "type": "address"},
        {"name": "day", "type": "string"},
    ],
    "BalanceQuery": [
        {"name": "payer", "type": "address"},
        {"name": "peerId", "type": "string"},
        {"name": "expiry", "type": "uint64"},
    ],
    "NodeBinding": [
        {"name": "peerId", "type": "string"},
        {"name": "wallet", "type": "address"},
        {"name": "expiry", "type": "uint64"},
        {"name": "capabilitiesHash", "type": "bytes32"},
    ],
}

_PRICE_FACTOR = {"name": "priceFactorBps", "type": "uint32"}
_NETWORK = {"name": "networkId", "type": "string"}
_TYPES: dict[str, list[dict[str, str]]] = {
    **_TYPES_V1,
    "JobOffer": [*_TYPES_V1["JobOffer"], _PRICE_FACTOR],
    "Receipt": [*_TYPES_V1["Receipt"], _PRICE_FACTOR],
    "RenderAuthorization": [*_TYPES_V1["RenderAuthorization"], _NETWORK],
    "DailyBoostClaim": [*_TYPES_V1["DailyBoostClaim"], _NETWORK],
}
_TYPES_V2 = _TYPES
_TRAJECTORY = {"name": "trajectoryRoot", "type": "bytes32"}
_TYPES_V3 = {**_TYPES_V2, "Receipt": [*_TYPES_V2["Receipt"], _TRAJECTORY]}
_PAYOUT = {"name": "payout", "type": "address"}
_KEY_ROTATION = [  # a new type, added under version "4" (no version change: see the rule)
    {"name": "oldKey", "type": "address"},
    {"name": "newKey", "type": "address"},
    {"name": "notBefore", "type": "uint64"},
]
_TYPES = {
    **_TYPES_V3,
    "Receipt": [*_TYPES_V3["Receipt"], _PAYOUT],
    "KeyRotation": _KEY_ROTATION,
}
"""The current layouts (`DOMAIN_VERSION`)."""
_TYPES_BY_VERSION: dict[str, dict[str, list[dict[str, str]]]] = {
    "1": _TYPES_V1,
    "2": _TYPES_V2,
    "3": _TYPES_V3,
    "4": _TYPES,
}


def _types_of(version: str) -> dict[str, list[dict[str, str]]]:
    return _TYPES_BY_VERSION[version]


def _versions_with(primary_type: str) -> tuple[str, ...]:
    """The known versions whose layout has `primary_type` (a type added later is absent
    from the versions before it)."""
    return tuple(v for v in KNOWN_VERSIONS if primary_type in _TYPES_BY_VERSION[v])


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain: binds every signature to one chain and one reward distributor.

    `version` defaults to the current `DOMAIN_VERSION`; name an older one to verify what was
    signed under it.
    """

    chain_id: int
    verifying_contract: str
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:  # resolved now, so a Domain always says which version it is
            object.__setattr__(self, "version", DOMAIN_VERSION)

    def at(self, version: str) -> Domain:
        """The same chain and distributor under another version."""
        return dataclasses.replace(self, version=version)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Domain:
        """The domain of a recorded typed-data document (e.g. a receipts.jsonl line)."""
        if data.get("name") != DOMAIN_NAME:
            raise SignatureError(f"EIP-712 domain name {data.get('name')!r} is not {DOMAIN_NAME!r}")
        domain = cls(int(data["chainId"]), str(data["verifyingContract"]), str(data["version"]))
        check_version(domain)
        return domain

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }

    @functools.cached_property
    def separator(self) -> bytes:
        return keccak(
            _type_hash("EIP712Domain", _EIP712_DOMAIN)
            + keccak(DOMAIN_NAME.encode())
            + keccak(self.version.encode())
            + self.chain_id.to_bytes(32, "big")
            + bytes(12)
            + bytes.fromhex(self.verifying_contract[2:])
        )


def check_version(domain: Domain) -> None:
    """Refuse a domain whose version this code does not know (`SignatureError`)."""
    if domain.version not in KNOWN_VERSIONS:
        raise SignatureError(
            f"EIP-712 domain version {domain.version!r} is unknown: this code verifies versions "
            f"{', '.join(map(repr, KNOWN_VERSIONS))} and signs {DOMAIN_VERSION!r}"
        )


def _for_signing(domain: Domain) -> Domain:
    if domain.version != DOMAIN_VERSION:
        raise ValueError(
            f"signing uses the current EIP-712 version {DOMAIN_VERSION!r}, not "
            f"{domain.version!r}: older versions only verify"
        )
    return domain


def _known_versions(domain: Domain) -> list[Domain]:
    """`domain`, then the same domain at every other known version."""
    check_version(domain)
    return [domain] + [domain.at(v) for v in KNOWN_VERSIONS if v != domain.version]


def _type_hash(name: str, fields: list[dict[str, str]]) -> bytes:
    return keccak(f"{name}({','.join(f['type'] + ' ' + f['name'] for f in fields)})".encode())


_RECEIPT_TYPEHASH = {v: _type_hash("Receipt", t["Receipt"]) for v, t in _TYPES_BY_VERSION.items()}
_OFFER_TYPEHASH = {v: _type_hash("JobOffer", t["JobOffer"]) for v, t in _TYPES_BY_VERSION.items()}


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def offer_message(offer: JobOffer) -> dict[str, Any]:
    return {
        "jobId": _hex(offer.job_id),
        "coordinator": to_checksum_address(offer.coordinator),
        "modelId": offer.model_id,
        "paramsHash": _hex(offer.params_hash),
        "steps": offer.steps,
        "width": offer.width,
        "height": offer.height,
        "seed": offer.seed,
        "workUnits": offer.work_units,
        "deadline": offer.deadline,
        "priceFactorBps": offer.price_factor_bps,
    }


def receipt_message(receipt: Receipt) -> dict[str, Any]:
    return {
        "jobId": _hex(receipt.job_id),
        "offerHash": _hex(receipt.offer_hash),
        "worker": to_checksum_address(receipt.worker),
        "coordinator": to_checksum_address(receipt.coordinator),
        "modelId": receipt.model_id,
        "resultHash": _hex(receipt.result_hash),
        "stepsDone": receipt.steps_done,
        "workUnits": receipt.work_units,
        "completedAt": receipt.completed_at,
        "priceFactorBps": receipt.price_factor_bps,
        "trajectoryRoot": _hex(receipt.trajectory_root),
        "payout": to_checksum_address(receipt.payee),
    }


def typed_data(domain: Domain, primary_type: str, message: dict[str, Any]) -> dict[str, Any]:
    """The full EIP-712 document (`domain`, `types`, `primaryType`, `message`), in the
    layout of the domain's version (fields that version lacks are left out)."""
    check_version(domain)
    fields = _types_of(domain.version)[primary_type]
    names = {f["name"] for f in fields}
    return {
        "domain": domain.as_dict(),
        "types": {"EIP712Domain": _EIP712_DOMAIN, primary_type: fields},
        "primaryType": primary_type,
        "message": {k: v for k, v in message.items() if k in names},
    }


def _sign(private_key: bytes, document: dict[str, Any]) -> bytes:
    return bytes(
        Account.sign_message(encode_typed_data(full_message=document), private_key).signature
    )


def _recover(document: dict[str, Any], signature: bytes) -> str:
    try:
        return str(
            Account.recover_message(encode_typed_data(full_message=document), signature=signature)
        )
    except Exception as exc:  # eth-keys raises several types for malformed signatures
        raise SignatureError(f"signature does not recover: {type(exc).__name__}") from None


# --- hashes --------------------------------------------------------------------------------
def params_hash(params: JobParams) -> bytes:
    """keccak256 of the canonical encoding: binds prompt and settings into the signed offer."""
    return keccak(encode(params))


def capabilities_hash(caps: Capabilities) -> bytes:
    return keccak(encode(caps))


def offer_hash(domain: Domain, offer: JobOffer) -> bytes:
    """The EIP-712 digest of an offer; receipts point at it."""
    tail = _price_factor_tail(domain, offer.price_factor_bps)
    struct = keccak(
        _OFFER_TYPEHASH[domain.version]
        + offer.job_id
        + bytes(12)
        + bytes.fromhex(offer.coordinator[2:])
        + keccak(offer.model_id.encode())
        + offer.params_hash
        + offer.steps.to_bytes(32, "big")
        + offer.width.to_bytes(32, "big")
        + offer.height.to_bytes(32, "big")
        + offer.seed.to_bytes(32, "big")
        + offer.work_units.to_bytes(32, "big")
        + offer.deadline.to_bytes(32, "big")
        + tail
    )
    return keccak(b"\x19\x01" + domain.separator + struct)


def _price_factor_tail(domain: Domain, price_factor_bps: int) -> bytes:
    """The encoded `priceFactorBps` (v2 on); v1 has no such field, so only full price."""
    if domain.version == "1":
        if price_factor_bps != FULL_PRICE_BPS:
            raise SignatureError("EIP-712 version '1' has no price factor: only full price")
        return b""
    return price_factor_bps.to_bytes(32, "big")


def _trajectory_tail(domain: Domain, root: bytes) -> bytes:
    """The encoded `trajectoryRoot` (v3 on); earlier versions have none, so only zero."""
    if domain.version in ("1", "2"):
        if root != NO_TRAJECTORY:
            raise SignatureError(
                f"EIP-712 version {domain.version!r} has no trajectory root: only none"
            )
        return b""
    return root


def _payout_tail(domain: Domain, receipt: Receipt) -> bytes:
    """The encoded `payout` (v4 on: the payee); earlier versions pay the worker only."""
    if domain.version in ("1", "2", "3"):
        if not same_address(receipt.payee, receipt.worker):
            raise SignatureError(
                f"EIP-712 version {domain.version!r} has no payout address: only the worker"
            )
        return b""
    return bytes(12) + bytes.fromhex(receipt.payee[2:])


def receipt_digest(domain: Domain, receipt: Receipt) -> bytes:
    tail = (
        _price_factor_tail(domain, receipt.price_factor_bps)
        + _trajectory_tail(domain, receipt.trajectory_root)
        + _payout_tail(domain, receipt)
    )
    struct = keccak(
        _RECEIPT_TYPEHASH[domain.version]
        + receipt.job_id
        + receipt.offer_hash
        + bytes(12)
        + bytes.fromhex(receipt.worker[2:])
        + bytes(12)
        + bytes.fromhex(receipt.coordinator[2:])
        + keccak(receipt.model_id.encode())
        + receipt.result_hash
        + receipt.steps_done.to_bytes(32, "big")
        + receipt.work_units.to_bytes(32, "big")
        + receipt.completed_at.to_bytes(32, "big")
        + tail
    )
    return keccak(b"\x19\x01" + domain.separator + struct)


# --- sign / verify -------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _signing_key(private_key: bytes) -> coincurve.PrivateKey:
    """Building a key derives its public key (~100 us): once per key, not per signature
    (a benchmark or test process may hold dozens of node wallets)."""
    return coincurve.PrivateKey(private_key)


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """65-byte r||s||v signature (v = 27/28), as eth-account produces."""
    sig = _signing_key(bytes(private_key)).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def recover_digest(digest: bytes, signature: bytes) -> str:
    """Checksummed address that signed `digest`, or `SignatureError`."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise SignatureError("signature must be 65 bytes with v of 27 or 28")
    s = int.from_bytes(signature[32:64], "big")
    if s == 0 or s > _SECP256K1_HALF_N:
        raise SignatureError("signature s value is not canonical")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes([signature[64] - 27]), digest, hasher=None
        )
    except Exception:
        raise SignatureError("signature does not recover to a public key") from None
    return _checksum_of(keccak(pub.format(compressed=False)[1:])[-20:])


_SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def sign_offer(private_key: bytes, domain: Domain, offer: JobOffer) -> bytes:
    return sign_digest(private_key, offer_hash(_for_signing(domain), offer))


def sign_receipt(private_key: bytes, domain: Domain, receipt: Receipt) -> bytes:
    return sign_digest(private_key, receipt_digest(_for_signing(domain), receipt))


def recover_offer_signer(domain: Domain, offer: JobOffer, signature: bytes) -> str:
    """Who signed `offer` under `domain` (its version included); `SignatureError` if none."""
    check_version(domain)
    return recover_digest(offer_hash(domain, offer), signature)


def recover_receipt_signer(domain: Domain, receipt: Receipt, signature: bytes) -> str:
    """Who signed `receipt` under `domain` (its version included); `SignatureError` if none."""
    check_version(domain)
    return recover_digest(receipt_digest(domain, receipt), signature)


def verify_receipt(domain: Domain, receipt: Receipt, signature: bytes, worker: str) -> str:
    """The known version under which `worker` signed `receipt`, else `SignatureError`.

    For receipts stored without their version: the domain's version is tried first, then
    every other known one, so a receipt signed before a version change still verifies.
    """
    first: SignatureError | None = None
    for candidate in _known_versions(domain):
        try:
            if same_address(recover_receipt_signer(candidate, receipt, signature), worker):
                return candidate.version
            fault = SignatureError(
                "receipt is not signed by its worker (or is for another chain or distributor)"
            )
        except SignatureError as exc:
            fault = exc
        first = first or fault
    assert first is not None  # _known_versions is never empty
    raise first


def binding_document(domain: Domain, caps: Capabilities) -> dict[str, Any]:
    message = {
        "peerId": caps.peer_id,
        "wallet": to_checksum_address(caps.wallet),
        "expiry": caps.expiry,
        "capabilitiesHash": _hex(capabilities_hash(caps)),
    }
    return typed_data(domain, "NodeBinding", message)


def sign_binding(private_key: bytes, domain: Domain, caps: Capabilities) -> bytes:
    """The wallet vouches for the libp2p peer id (and the capabilities) until `expiry`."""
    return _sign(private_key, binding_document(_for_signing(domain), caps))


def recover_binding_signer(domain: Domain, caps: Capabilities, signature: bytes) -> str:
    check_version(domain)
    return _recover(binding_document(domain, caps), signature)


def receipt_document(domain: Domain, receipt: Receipt) -> dict[str, Any]:
    return typed_data(domain, "Receipt", receipt_message(receipt))


def offer_document(domain: Domain, offer: JobOffer) -> dict[str, Any]:
    return typed_data(domain, "JobOffer", offer_message(offer))


def same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def check_binding(
    domain: Domain, caps: Capabilities, signature: bytes, peer_id: str, now: float
) -> str | None:
    """Why a signed capability advert is unacceptable from `peer_id`, or None if it is fine.

    The authenticated peer id must be the bound one, the binding unexpired, and the
    signature the wallet's own for this chain and distributor.
    """
    if caps.peer_id != peer_id:
        return "capabilities name another peer id than the sender's"
    if caps.expiry < now:
        return "capability binding has expired"
    return _fault(
        lambda d: binding_document(d, caps),
        domain,
        signature,
        caps.wallet,
        "binding is not signed by its wallet (or is for another chain or distributor)",
    )


def _fault(
    document: Callable[[Domain], dict[str, Any]],
    domain: Domain,
    signature: bytes,
    signer: str,
    not_signer: str,
) -> str | None:
    """None when `signer` signed `document` under the domain's or another known version;
    else why not, as it reads under the domain's own version (`not_signer` for someone else)."""
    try:
        candidates = _known_versions(domain)
    except SignatureError as exc:
        return str(exc)
    first: str | None = None
    for candidate in candidates:
        got = _recover_or_fault(document(candidate), signature)
        if not isinstance(got, SignatureError) and same_address(got, signer):
            return None
        first = first or (str(got) if isinstance(got, SignatureError) else not_signer)
    return first


# --- payer authorization ----------------------------------------------------------------
def request_hash(request: RenderRequest) -> bytes:
    """keccak of the request's canonical encoding without its signature (binds every field)."""
    return keccak(encode(msgspec.structs.replace(request, payer_signature=None)))


def authorization_document(domain: Domain, request: RenderRequest) -> dict[str, Any]:
    if request.payer is None:
        raise SignatureError("request names no payer")
    return _authorization(
        domain, request.payer, request_hash(request), request.expiry, request.network_id
    )


def _authorization(
    domain: Domain, payer: str, request_digest: bytes, expiry: int, network_id: str
) -> dict[str, Any]:
    message = {
        "payer": to_checksum_address(payer),
        "requestHash": _hex(request_digest),
        "expiry": expiry,
        "networkId": network_id,
    }
    return typed_data(domain, "RenderAuthorization", message)


def recover_authorization_signer(
    domain: Domain,
    payer: str,
    request_digest: bytes,
    expiry: int,
    network_id: str,
    signature: bytes,
) -> str:
    """Who signed the `RenderAuthorization` of a request known only by its hash (an epoch's
    published evidence carries no prompt); `SignatureError` if none. The domain's version is
    tried first, then every other known one."""
    for candidate in _known_versions(domain):
        doc = _authorization(candidate, payer, request_digest, expiry, network_id)
        signer = _recover_or_fault(doc, signature)
        if isinstance(signer, str) and same_address(signer, payer):
            return signer
    raise SignatureError(_NOT_PAYER)


def job_id_of(request_digest: bytes, index: int) -> bytes:
    """The job id of image `index` of a paid request: derived from the hash its payer signed,
    so a published receipt proves which authorization paid for it."""
    return keccak(b"sogni-job" + request_digest + index.to_bytes(4, "big"))


def sign_request(private_key: bytes, domain: Domain, request: RenderRequest) -> RenderRequest:
    """The request with `payer_signature` set: the payer's wallet authorizes this exact request."""
    sig = _sign(private_key, authorization_document(_for_signing(domain), request))
    return msgspec.structs.replace(request, payer_signature=sig)


def check_payer(domain: Domain, request: RenderRequest, now: float) -> str | None:
    """Why the request's payer authorization is unacceptable, or None if it is valid."""
    if request.payer is None or request.payer_signature is None:
        return "request has no payer and payer signature"
    if request.expiry < now:
        return "payer authorization has expired"
    return _fault(
        lambda d: authorization_document(d, request),
        domain,
        request.payer_signature,
        request.payer,
        "payer signature is not from the payer (or is for another chain or distributor)",
    )


_NOT_PAYER = "signature is not from the payer (or is for another chain or distributor)"


def _recover_or_fault(document: dict[str, Any], signature: bytes) -> str | SignatureError:
    try:
        return _recover(document, signature)
    except SignatureError as exc:
        return exc


# --- Daily Boost and balances ---------------------------------------------------------------
def boost_claim_document(
    domain: Domain, payer: str, day: str, network_id: str = DEFAULT_NETWORK_ID
) -> dict[str, Any]:
    message = {"payer": to_checksum_address(payer), "day": day, "networkId": network_id}
    return typed_data(domain, "DailyBoostClaim", message)


def sign_boost_claim(
    private_key: bytes, domain: Domain, day: str, network_id: str = DEFAULT_NETWORK_ID
) -> DailyBoostClaim:
    """The key's wallet claims the Daily Boost for `day` (UTC `YYYY-MM-DD`) on `network_id`."""
    payer = str(Account.from_key(private_key).address)
    doc = boost_claim_document(_for_signing(domain), payer, day, network_id)
    return DailyBoostClaim(
        payer=payer, day=day, signature=_sign(private_key, doc), network_id=network_id
    )


def check_boost_claim(domain: Domain, claim: DailyBoostClaim) -> str | None:
    """Why the claim's signature is unacceptable, or None. (The day is checked by the caller,
    against its clock.)"""
    return _fault(
        lambda d: boost_claim_document(d, claim.payer, claim.day, claim.network_id),
        domain,
        claim.signature,
        claim.payer,
        _NOT_PAYER,
    )


def balance_query_document(domain: Domain, payer: str, peer_id: str, expiry: int) -> dict[str, Any]:
    message = {"payer": to_checksum_address(payer), "peerId": peer_id, "expiry": expiry}
    return typed_data(domain, "BalanceQuery", message)


def sign_balance_query(
    private_key: bytes, domain: Domain, peer_id: str, expiry: int
) -> BalanceQuery:
    """The key's wallet asks for its balances from libp2p peer `peer_id`, until `expiry`."""
    payer = str(Account.from_key(private_key).address)
    sig = _sign(private_key, balance_query_document(_for_signing(domain), payer, peer_id, expiry))
    return BalanceQuery(payer=payer, peer_id=peer_id, expiry=expiry, signature=sig)


def check_balance_query(
    domain: Domain, query: BalanceQuery, peer_id: str, now: float
) -> str | None:
    """Why the query is unacceptable from the authenticated `peer_id` at `now`, or None."""
    if query.peer_id != peer_id:
        return "balance query was signed for another peer id than the sender's"
    if query.expiry < now:
        return "balance query has expired"
    return _fault(
        lambda d: balance_query_document(d, query.payer, query.peer_id, query.expiry),
        domain,
        query.signature,
        query.payer,
        _NOT_PAYER,
    )


# --- offer-key rotation ---------------------------------------------------------------------
def key_rotation_document(domain: Domain, rotation: KeyRotation) -> dict[str, Any]:
    message = {
        "oldKey": to_checksum_address(rotation.old_key),
        "newKey": to_checksum_address(rotation.new_key),
        "notBefore": rotation.not_before,
    }
    return typed_data(domain, "KeyRotation", message)


def sign_key_rotation(
    private_key: bytes, domain: Domain, rotation: KeyRotation
) -> SignedKeyRotation:
    """The old offer key hands over to `rotation.new_key` (it must be the key signing)."""
    signer = str(Account.from_key(private_key).address)
    if not same_address(signer, rotation.old_key):
        raise ValueError(
            f"a key rotation is signed by its old key {rotation.old_key}, not {signer}"
        )
    doc = key_rotation_document(_for_signing(domain), rotation)
    return SignedKeyRotation(rotation=rotation, signature=_sign(private_key, doc))


def check_key_rotation(domain: Domain, signed: SignedKeyRotation) -> str | None:
    """Why the link is not signed by its old key under this chain and distributor, or None.
    Tried under the domain's version, then the other known versions that have the type."""
    try:
        check_version(domain)
    except SignatureError as exc:
        return str(exc)
    versions = [domain.version, *(v for v in _versions_with("KeyRotation") if v != domain.version)]
    first: str | None = None
    for version in versions:
        if "KeyRotation" not in _types_of(version):
            continue
        got = _recover_or_fault(
            key_rotation_document(domain.at(version), signed.rotation), signed.signature
        )
        if isinstance(got, str) and same_address(got, signed.rotation.old_key):
            return None
        first = first or (str(got) if isinstance(got, SignatureError) else _NOT_OLD_KEY)
    return first or _NOT_OLD_KEY


_NOT_OLD_KEY = (
    "key rotation is not signed by the key it replaces (or is for another chain or distributor)"
)
