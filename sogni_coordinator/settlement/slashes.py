"""Slashing a worker's stake after failed result checks, signed by the settlement key.

Why a separate, offline flow: a slash takes a worker's money, so the online offer key (which
signs every job and could be stolen from the coordinator host) never slashes. The coordinator
only *proposes* (`Store.propose_slash`, when failed checks blacklist a wallet); the operator
reviews the evidence, then `prepare` writes the unsigned `Staking.slash(wallet, amount,
reason)` from the settlement key's address, `sign_offline` signs it on the key's machine, and
`submit` broadcasts it and marks the proposal `submitted`. Slashed tokens go to the
contract's `slashRecipient`, never to the coordinator.

Every document carries a *binding*: keccak256 over (proposal id, wallet, amount, reason, chain
id, staking address, sender). Signing recomputes it and decodes the transaction's calldata,
refusing a file whose transaction was edited (another account, another amount); submitting
compares the signed transaction with the unsigned file the coordinator wrote, so a file edited
consistently on its way to the offline machine is still refused before anything is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from sogni_protocol import eip712
from sogni_protocol.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from sogni_chain import Deployment
    from sogni_coordinator.store import SlashProposal, Store

__all__ = [
    "DEFAULT_SHARE_BPS",
    "SIGNED_FORMAT",
    "UNSIGNED_FORMAT",
    "Prepared",
    "SlashError",
    "Submitted",
    "binding_of",
    "can_slash",
    "chain_reason",
    "dismiss",
    "open_proposal",
    "prepare",
    "sign_offline",
    "slash_amount",
    "submit",
    "unsigned_path",
]

UNSIGNED_FORMAT = "sogni-unsigned-slash-v1"
SIGNED_FORMAT = "sogni-signed-slash-v1"
DEFAULT_SHARE_BPS = 10_000
"""Slash all of it by default: the proposal exists because the wallet failed 5 checks within an
hour (deliberate cheating, not bad luck), and the operator reviews each one before signing."""
MAX_BPS = 10_000
_SELECTOR = keccak(b"slash(address,uint256,string)")[:4]
_PROPOSE_SELECTOR = keccak(b"proposeSlash(address,uint256,string,bytes32)")[:4]
"""With a Disputes contract deployed the settlement key proposes there instead: the slash
executes only after its dispute window (docs/DISPUTES.md)."""
_ROLES = ("SLASHER_ROLE", "DEFAULT_ADMIN_ROLE")
_PINNED = ("nonce", "gas", "maxFeePerGas", "maxPriorityFeePerGas")
"""Fields a submitted slash must share with the prepared one (an edited fee could spend the
settlement key's ETH)."""


class SlashError(Exception):
    """An expected refusal (the CLI prints it as one line, exit 3)."""


@dataclass(frozen=True)
class Prepared:
    """What `prepare` did: dismissed an unstaked wallet's proposal, or wrote the unsigned tx."""

    proposal_id: int
    wallet: str
    staked: int
    amount: int
    path: Path | None
    """None when the proposal was dismissed (nothing staked)."""


@dataclass(frozen=True)
class Submitted:
    proposal_id: int
    wallet: str
    tx_hash: str
    slashed: int
    """What the contract actually took (it caps at what the wallet holds)."""
    recipient: str
    resumed: bool
    """The transaction was already mined (a crash after sending): only recorded now."""
    case_id: str | None = None
    """Sent to Disputes: the case that executes after its window (nothing slashed yet)."""


def unsigned_path(data_dir: Path, proposal_id: int) -> Path:
    """Where `prepare` writes a proposal's unsigned transaction (beside epoch roots')."""
    return data_dir / "unsigned" / f"slash-{proposal_id:06d}.json"


def chain_reason(proposal: SlashProposal) -> str:
    """The public reason put on chain: a count and one job id, no prompt, no image."""
    n = len(proposal.job_ids)
    evidence = f"; evidence job 0x{proposal.job_ids[-1].hex()}" if proposal.job_ids else ""
    return f"sogni: {n} failed result check{'s' if n != 1 else ''}{evidence}"


def binding_of(
    proposal_id: int,
    wallet: str,
    amount: int,
    reason: str,
    chain_id: int,
    staking: str,
    sender: str,
) -> str:
    """keccak256 of the canonical JSON of what a slash document is about (hex, 0x...)."""
    body = {
        "proposal": proposal_id,
        "wallet": wallet.lower(),
        "amount": str(amount),
        "reason": reason,
        "chainId": chain_id,
        "staking": staking.lower(),
        "from": sender.lower(),
    }
    return "0x" + keccak(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hex()


def _calldata(wallet: str, amount: int, reason: str, evidence: str | None = None) -> str:
    if evidence is not None:  # Disputes.proposeSlash
        args = abi_encode(
            ["address", "uint256", "string", "bytes32"],
            [to_checksum_address(wallet), amount, reason, bytes.fromhex(evidence[2:])],
        )
        return "0x" + (_PROPOSE_SELECTOR + args).hex()
    args = abi_encode(
        ["address", "uint256", "string"], [to_checksum_address(wallet), amount, reason]
    )
    return "0x" + (_SELECTOR + args).hex()


def _evidence_of(proposal: SlashProposal) -> str:
    """bytes32 naming the proposal's evidence on chain: keccak of its failed job ids."""
    return "0x" + keccak(b"".join(proposal.job_ids)).hex()


def open_proposal(store: Store, proposal_id: int) -> SlashProposal:
    """The proposal, if it is still open (`proposed`); else a one-line `SlashError`."""
    for p in store.slash_proposals():
        if p.id == proposal_id:
            if p.state != "proposed":
                why = f" ({p.note})" if p.note else ""
                raise SlashError(f"slash proposal {proposal_id} is already {p.state}{why}")
            return p
    raise SlashError(f"no slash proposal {proposal_id}")


def can_slash(deployment: Deployment, address: str) -> bool:
    """Whether `address` holds SLASHER_ROLE (or is the admin) on Disputes when deployed, else
    on Staking."""
    target = deployment.disputes or deployment.staking
    return any(target.has_role(role, address) for role in _ROLES)


def slash_amount(staked: int, *, amount: int | None = None, share_bps: int | None = None) -> int:
    """An explicit `amount` (base units, at most `staked`), else `share_bps` of `staked`."""
    if amount is not None:
        if amount <= 0:
            raise SlashError("the amount to slash must be more than zero")
        if amount > staked:
            raise SlashError(f"cannot slash {amount}: the wallet has only {staked} staked")
        return amount
    bps = DEFAULT_SHARE_BPS if share_bps is None else share_bps
    if not 0 < bps <= MAX_BPS:
        raise SlashError(f"--share-bps must be 1..{MAX_BPS}, not {bps}")
    taken = staked * bps // MAX_BPS
    if taken == 0:
        raise SlashError(f"{bps} bps of {staked} rounds to nothing; give --amount")
    return taken


def _pardoned(store: Store, proposal: SlashProposal) -> set[bytes]:
    """The proposal's failed jobs whose strike a won dispute took back (the coordinator's
    dispute desk, `DisputeBook.pardoned`): no evidence against the wallet any more."""
    from sogni_coordinator.disputes import DisputeBook

    book = DisputeBook(store.location)
    try:
        return book.pardoned(proposal.wallet, proposal.job_ids)
    finally:
        book.close()


def prepare(
    store: Store,
    deployment: Deployment,
    proposal_id: int,
    sender: str,
    data_dir: Path,
    *,
    offer_address: str | None = None,
    amount: int | None = None,
    share_bps: int | None = None,
) -> Prepared:
    """Write the unsigned `slash` for an open proposal from `sender` (the settlement key's
    address), or dismiss the proposal when the wallet has nothing staked (active + pending)."""
    from sogni_chain import ChainRevert

    proposal = open_proposal(store, proposal_id)
    if offer_address is not None and eip712.same_address(sender, offer_address):
        raise SlashError(f"{sender} is the offer-signing key, which never slashes")
    if deployment.disputes is not None:
        pardoned = _pardoned(store, proposal)
        if pardoned and len(pardoned) == len(set(proposal.job_ids)):
            store.mark_slash(
                proposal_id, "dismissed", "its failed checks were pardoned: the worker won"
            )
            return Prepared(proposal_id, proposal.wallet, 0, 0, None)
        if pardoned:
            raise SlashError(
                f"{len(pardoned)} of the {len(set(proposal.job_ids))} failed checks behind "
                f"slash proposal {proposal_id} were pardoned (the worker won their dispute): "
                "review it, then `sogni-coordinator slash dismiss`"
            )
    staking = deployment.staking
    active = staking.active_stake(proposal.wallet)
    pending, _unlock = staking.pending_stake(proposal.wallet)
    staked = active + pending
    if staked == 0:
        store.mark_slash(proposal_id, "dismissed", "nothing staked")
        return Prepared(proposal_id, proposal.wallet, 0, 0, None)
    if not can_slash(deployment, sender):
        raise SlashError(
            f"the settlement key {sender} lacks SLASHER_ROLE on Staking {staking.address}"
        )
    taken = slash_amount(staked, amount=amount, share_bps=share_bps)
    reason = chain_reason(proposal)
    wallet = to_checksum_address(proposal.wallet)
    disputes = deployment.disputes
    evidence = _evidence_of(proposal) if disputes is not None else None
    if disputes is not None and evidence is not None:
        fn = disputes.contract.functions.proposeSlash(
            wallet, taken, reason, bytes.fromhex(evidence[2:])
        )
    else:
        fn = staking.contract.functions.slash(wallet, taken, reason)
    try:
        tx = deployment.chain.build_unsigned(fn, sender=sender)
    except ChainRevert as exc:
        raise SlashError(f"the slash would be refused: {exc}") from None
    chain_id = deployment.chain.chain_id
    document = {
        "format": UNSIGNED_FORMAT,
        "proposal": proposal_id,
        "wallet": wallet,
        "amount": str(taken),
        "staked": str(staked),
        "reason": reason,
        "chainId": chain_id,
        "staking": staking.address,
        "from": to_checksum_address(sender),
        "offerKey": None if offer_address is None else to_checksum_address(offer_address),
        "binding": binding_of(
            proposal_id, wallet, taken, reason, chain_id, staking.address, sender
        ),
        "tx": tx,
    }
    if disputes is not None:
        document["disputes"] = disputes.address
        document["evidence"] = evidence
    path = unsigned_path(data_dir, proposal_id)
    atomic_write_bytes(path, json.dumps(document, indent=2).encode())
    return Prepared(proposal_id, wallet, staked, taken, path)


def _check_document(doc: dict[str, Any]) -> None:
    """The transaction is exactly `slash(wallet, amount, reason)` on `staking`, and the
    binding matches the fields (an edited file fails here)."""
    try:
        proposal, wallet, amount = int(doc["proposal"]), str(doc["wallet"]), int(doc["amount"])
        reason, chain_id = str(doc["reason"]), int(doc["chainId"])
        staking, sender, tx = str(doc["staking"]), str(doc["from"]), doc["tx"]
        binding = binding_of(proposal, wallet, amount, reason, chain_id, staking, sender)
        data, to, tx_chain = str(tx["data"]).lower(), str(tx["to"]), int(tx["chainId"])
        evidence = doc.get("evidence")
        expected = _calldata(wallet, amount, reason, None if evidence is None else str(evidence))
        target = str(doc.get("disputes") or staking)
    except (KeyError, TypeError, ValueError) as exc:
        raise SlashError(f"not an unsigned slash transaction: {exc!r}") from None
    if binding != doc.get("binding"):
        raise SlashError("the file does not match its binding: it was edited after it was written")
    if data != expected or not eip712.same_address(to, target) or tx_chain != chain_id:
        raise SlashError(
            "the transaction is not the slash the file describes (another account, amount or "
            "contract): it was edited after it was written"
        )
    if int(tx.get("value", 0)) != 0:
        raise SlashError("a slash transaction sends no ETH")


def sign_offline(unsigned: dict[str, Any], private_key: bytes) -> dict[str, Any]:
    """Sign `prepare`'s document with the settlement key, without any chain access."""
    from eth_account import Account

    if unsigned.get("format") != UNSIGNED_FORMAT:
        raise SlashError(f"not an unsigned slash transaction ({UNSIGNED_FORMAT})")
    _check_document(unsigned)
    account = Account.from_key(private_key)
    offer = unsigned.get("offerKey")
    if isinstance(offer, str) and eip712.same_address(account.address, offer):
        raise SlashError(f"{account.address} is the offer-signing key, which never slashes")
    if not eip712.same_address(account.address, str(unsigned["from"])):
        raise SlashError(
            f"the transaction is to be sent from {unsigned['from']}, not from this key's "
            f"{account.address}"
        )
    signed = account.sign_transaction(unsigned["tx"])
    return {
        "format": SIGNED_FORMAT,
        "proposal": unsigned["proposal"],
        "wallet": unsigned["wallet"],
        "amount": unsigned["amount"],
        "binding": unsigned["binding"],
        "from": account.address,
        "raw": "0x" + bytes(signed.raw_transaction).hex(),
        "hash": "0x" + bytes(signed.hash).hex(),
    }


def _signed_matches(signed: dict[str, Any], reference: dict[str, Any]) -> str:
    """The signed raw transaction is the reference's, from its sender; returns that sender."""
    from eth_account import Account
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes

    try:
        raw = HexBytes(str(signed["raw"]))
        tx = TypedTransaction.from_bytes(raw).as_dict()
        sender = str(Account.recover_transaction(raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise SlashError(f"not a signed slash transaction: {exc!r}") from None
    ref = reference["tx"]
    same = (
        HexBytes(tx["data"]) == HexBytes(ref["data"])
        and eip712.same_address(HexBytes(tx["to"]).to_0x_hex(), str(ref["to"]))
        and int(tx["chainId"]) == int(ref["chainId"])
        and int(tx["value"]) == 0
        and all(int(tx[k]) == int(ref[k]) for k in _PINNED)
        and eip712.same_address(sender, str(reference["from"]))
        and signed.get("binding") == reference.get("binding")
    )
    if not same:
        raise SlashError(
            "the signed transaction is not the slash this coordinator prepared for the "
            "proposal (another account, amount, fee or key): not sent"
        )
    return sender


def submit(
    store: Store,
    deployment: Deployment,
    signed: dict[str, Any],
    data_dir: Path,
    *,
    offer_address: str | None = None,
) -> Submitted:
    """Broadcast a signed slash after checking it against the proposal (still open) and the
    unsigned file written for it, then mark the proposal `submitted` with the tx hash."""
    from eth_utils.exceptions import ValidationError as EthValidationError
    from hexbytes import HexBytes
    from web3.exceptions import TransactionNotFound, Web3Exception

    from sogni_chain import ChainRevert

    if signed.get("format") != SIGNED_FORMAT:
        raise SlashError(f"not a signed slash transaction ({SIGNED_FORMAT})")
    try:
        proposal_id = int(signed["proposal"])
    except (KeyError, TypeError, ValueError):
        raise SlashError("the signed file names no proposal") from None
    proposal = open_proposal(store, proposal_id)
    ref_path = unsigned_path(data_dir, proposal_id)
    try:
        reference = json.loads(ref_path.read_text())
    except (OSError, ValueError):
        raise SlashError(
            f"no unsigned slash for proposal {proposal_id} at {ref_path}: prepare it again"
        ) from None
    _check_document(reference)
    if not eip712.same_address(str(reference["wallet"]), proposal.wallet):
        raise SlashError(f"{ref_path} is not for proposal {proposal_id}'s wallet")
    if int(reference["chainId"]) != deployment.chain.chain_id or not eip712.same_address(
        str(reference["staking"]), deployment.staking.address
    ):
        raise SlashError(f"{ref_path} is for another chain or Staking contract")
    sender = _signed_matches(signed, reference)
    if offer_address is not None and eip712.same_address(sender, offer_address):
        raise SlashError(f"{sender} is the offer-signing key, which never slashes")
    tx_hash = str(signed.get("hash") or "")
    case_id: str | None = None
    mined: Any = None
    if tx_hash:
        try:
            mined = deployment.chain.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            mined = None
    if mined is not None and mined["status"] == 1:  # sent before a crash: record it
        slashed = _slashed_in(deployment, mined)
        resumed = True
    else:
        if not can_slash(deployment, sender):
            raise SlashError(
                f"{sender} lacks SLASHER_ROLE on Staking {deployment.staking.address}: not sent"
            )
        try:
            tx = deployment.chain.send_raw(str(signed["raw"]))
        except ChainRevert as exc:
            raise SlashError(f"the slash was refused: {exc}") from None
        except (ValueError, Web3Exception, EthValidationError) as exc:  # e.g. a used nonce
            raise SlashError(
                f"the chain did not take the transaction: {exc} (if the settlement key sent "
                "another transaction since propose-tx, run propose-tx and sign again)"
            ) from None
        tx_hash = tx.hash
        resumed = False
        if reference.get("disputes"):
            slashed = 0
            case_id = "0x" + bytes(tx.event("SlashProposed")["caseId"]).hex()
        else:
            event = tx.event("Slashed")
            slashed = int(event["fromActive"]) + int(event["fromPending"])
    recipient = str(deployment.staking.contract.functions.slashRecipient().call())
    note = f"tx {tx_hash}; slashed {slashed} to {recipient}"
    if reference.get("disputes"):
        if resumed:
            case_id = _case_in(deployment, mined)
        note = f"tx {tx_hash}; proposed as dispute case {case_id}, executes after its window"
    if not store.mark_slash(proposal_id, "submitted", note):
        raise SlashError(f"slash proposal {proposal_id} was closed meanwhile (tx {tx_hash})")
    return Submitted(proposal_id, proposal.wallet, tx_hash, slashed, recipient, resumed, case_id)


def _case_in(deployment: Deployment, receipt: Any) -> str | None:
    from web3.logs import DISCARD

    if deployment.disputes is None:
        return None
    events = deployment.disputes.contract.events.SlashProposed().process_receipt(
        receipt, errors=DISCARD
    )
    return "0x" + bytes(events[0]["args"]["caseId"]).hex() if events else None


def _slashed_in(deployment: Deployment, receipt: Any) -> int:
    from web3.logs import DISCARD

    events = deployment.staking.contract.events.Slashed().process_receipt(receipt, errors=DISCARD)
    return sum(int(e["args"]["fromActive"]) + int(e["args"]["fromPending"]) for e in events)


def dismiss(store: Store, proposal_id: int, reason: str) -> None:
    """Close an open proposal without slashing (the operator's judgement, e.g. a dispute)."""
    open_proposal(store, proposal_id)
    if not reason.strip():
        raise SlashError("say why the proposal is dismissed (--reason)")
    if not store.mark_slash(proposal_id, "dismissed", reason.strip()[:500]):
        raise SlashError(f"slash proposal {proposal_id} was closed meanwhile")
