"""One exception for every revert, whichever chain raised it.

eth-tester raises ``TransactionFailed`` whose message embeds the raw revert bytes as a Python
``repr``; anvil (through web3) raises ``ContractLogicError`` with the revert data as hex. Callers
should not care: both become :class:`ChainRevert`, with custom errors decoded against the ABIs
of all our artifacts (including OpenZeppelin's errors), ``Error(string)`` and ``Panic(uint256)``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from eth_abi import decode as abi_decode
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

__all__ = ["FRIENDLY", "ChainRevert", "ErrorDecoder", "friendly_message"]

_PANIC_CODES = {
    0x01: "assertion failed",
    0x11: "arithmetic overflow or underflow",
    0x12: "division or modulo by zero",
    0x21: "invalid enum value",
    0x22: "invalid storage byte array",
    0x31: "pop on empty array",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to a zero-initialized internal function",
}
_ERROR_STRING = keccak(b"Error(string)")[:4]
_PANIC = keccak(b"Panic(uint256)")[:4]
_PREFIX = re.compile(r"^(?:execution reverted:?\s*)", re.IGNORECASE)


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return str(ts)


def _sogni(wei: Any) -> str:
    value = int(wei)
    whole, frac = divmod(value, 10**18)
    return f"{whole}.{frac:018d}".rstrip("0").rstrip(".") + " SOGNI" if frac else f"{whole} SOGNI"


def _case(case_id: Any) -> str:
    return "0x" + bytes(case_id).hex()[:16] if isinstance(case_id, bytes) else str(case_id)


_CASE_STATES = ("none", "proposed", "disputed", "voting", "worker won", "worker lost", "executed")
"""Disputes.State, as `sogni dispute list` names them (sogni_chain.disputes.CaseState)."""


def _case_state(state: Any) -> str:
    n = int(state)
    return _CASE_STATES[n] if 0 <= n < len(_CASE_STATES) else f"in state {n}"


_Friendly = Callable[[Mapping[str, Any]], str]

FRIENDLY: dict[str, _Friendly] = {
    # RewardDistributor
    "ZeroRoot": lambda a: "a Merkle root of zero cannot be posted",
    "RootAlreadyPosted": lambda a: f"epoch {a['epoch']} already has a root on chain",
    "EpochNotNext": lambda a: (
        f"epoch {a['epoch']} cannot be posted: the next epoch is {a['expected']} "
        "(epochs are 1, 2, 3, ... with no gaps)"
    ),
    "TotalDecreased": lambda a: (
        f"the root's total {_sogni(a['total'])} is below the previous root's "
        f"{_sogni(a['previous'])}: cumulative payouts never go down"
    ),
    "GrowthCapExceeded": lambda a: (
        f"the root adds {_sogni(a['growth'])} to the total, more than the cap of "
        f"{_sogni(a['cap'])} per epoch (governance can raise maxTotalGrowth)"
    ),
    "AirdropCapExceeded": lambda a: (
        f"season {a['season']}'s airdrop adds {_sogni(a['growth'])}, more than its cap of "
        f"{_sogni(a['cap'])} (governance sets it: setAirdropCap)"
    ),
    "AirdropAlreadyPosted": lambda a: (
        f"season {a['season']}'s airdrop was already posted, as epoch {a['epoch']}"
    ),
    "ZeroSeason": lambda a: "season 0 has no airdrop: seasons are numbered from 1",
    "Underfunded": lambda a: (
        f"the distributor holds {_sogni(a['balance'])} but the root needs "
        f"{_sogni(a['owed'])}: fund it first"
    ),
    "ClaimDelayTooLong": lambda a: (
        f"a claim delay of {a['claimDelay']} s is over the maximum of {a['maximum']} s"
    ),
    "NoRoot": lambda a: "no reward root has been posted yet: nothing to claim",
    "NotMatured": lambda a: f"no reward root has matured yet: claims open at {_when(a['opensAt'])}",
    "InvalidProof": lambda a: (
        "the amount and proof do not match the claimable (newest matured) root: "
        "use the tree of that epoch"
    ),
    "NothingToClaim": lambda a: (
        f"nothing to claim: {a['account']} already claimed {_sogni(a['alreadyClaimed'])} "
        f"of its {_sogni(a['cumulativeAmount'])}"
    ),
    "NotDistributor": lambda a: (
        f"{a['caller']} is not the distributor bound to the token's claimed amounts "
        "(a replaced distributor, or the token not bound yet: setDistributor)"
    ),
    "InvalidSuccessor": lambda a: (
        f"{a['next']} is not a reward distributor of this token: the claimed amounts stay here"
    ),
    "ClaimedOverflow": lambda a: (
        f"a cumulative amount of {_sogni(a['cumulativeAmount'])} is over 2^128 - 1 and cannot "
        "be booked: the root is not an honest tree"
    ),
    "ClaimExceedsRootTotal": lambda a: (
        f"paying this would bring all claims to {_sogni(a['totalClaimedAfter'])}, over the "
        f"root's total of {_sogni(a['rootTotal'])}: the root moved earnings between accounts"
    ),
    "StakeBpsTooHigh": lambda a: (
        f"cannot stake {a['stakeBps']} basis points of a claim: at most {a['maximum']}"
    ),
    "AuthorizationExpired": lambda a: (
        f"the stake authorization expired at {_when(a['deadline'])}: sign a new one"
    ),
    "InvalidStakeAuthorization": lambda a: (
        f"the stake authorization is not signed by {a['account']} for exactly these values"
    ),
    "EnforcedPause": lambda a: "claims are paused by governance",
    # Staking
    "ZeroAddress": lambda a: "the zero address is not allowed here",
    "ZeroAmount": lambda a: "the amount must be more than zero",
    "InsufficientActiveStake": lambda a: (
        f"only {_sogni(a['active'])} is staked, cannot unstake {_sogni(a['requested'])}"
    ),
    "NothingToWithdraw": lambda a: "nothing is waiting to be withdrawn",
    "CooldownActive": lambda a: f"the unstaked tokens unlock at {_when(a['unlockAt'])}",
    "StakeFrozen": lambda a: (
        f"a slash was proposed against this stake: it cannot be withdrawn before "
        f"{_when(a['until'])} (docs/SLASHING.md)"
    ),
    "NothingToSlash": lambda a: f"{a['account']} has no stake to slash",
    "NotSlasher": lambda a: f"{a['caller']} may not slash (needs SLASHER_ROLE or governance)",
    # Disputes (the CLIs refuse the expected cases in their own words before sending:
    # sogni_chain.disputes; these are for what only the chain can tell)
    "BadParameters": lambda a: (
        "dispute parameters out of bounds (bond, windows or juror share): governance sets them"
    ),
    "UnknownCase": lambda a: f"no dispute case {_case(a['caseId'])} on the Disputes contract",
    "CaseExists": lambda a: f"case {_case(a['caseId'])} already exists: it was disputed before",
    "NotReporter": lambda a: (
        f"{a['signer']} holds no REPORTER_ROLE on Disputes: the refusal was not signed by a "
        "coordinator (forged or edited), or this key may not publish evidence"
    ),
    "NotYourCase": lambda a: f"{a['caller']} is not the worker of this case ({a['worker']})",
    "WindowClosed": lambda a: f"the dispute window closed at {_when(a['windowEnd'])}",
    "WindowOpen": lambda a: (
        f"the slash's dispute window is open until {_when(a['windowEnd'])}: "
        "it cannot execute before"
    ),
    "SlashExpired": lambda a: (
        f"the slash expired at {_when(a['executeBy'])}: it can no longer execute"
    ),
    "WrongState": lambda a: f"the case is {_case_state(a['state'])}: not possible now",
    "EvidencePending": lambda a: (
        f"the coordinator has until {_when(a['evidenceDeadline'])} to publish its re-checks: "
        "only it may open the vote before then"
    ),
    "CommitClosed": lambda a: f"voting on this case closed at {_when(a['commitEnd'])}",
    "NotRevealTime": lambda a: (
        f"votes are revealed from {_when(a['commitEnd'])} to {_when(a['revealEnd'])}"
    ),
    "VotingNotOver": lambda a: (
        f"the vote runs until {_when(a['revealEnd'])}: it can be resolved after that"
    ),
    "NotAStaker": lambda a: (
        f"{a['juror']} had no votes (staked SOGNI) when the dispute opened: it cannot judge it"
    ),
    "WorkerCannotVote": lambda a: (
        "the worker, and the account its stake voted through when the dispute opened, "
        "cannot judge its own case"
    ),
    "AlreadyCommitted": lambda a: f"{a['juror']} already voted on this case",
    "NothingToReveal": lambda a: f"nothing to reveal: {a['juror']} did not vote on this case",
    "BadReveal": lambda a: f"{a['juror']}'s reveal does not match its vote (another salt or side)",
    "NoReward": lambda a: f"no reward for {a['juror']} on this case",
    "DelegationJustChanged": lambda a: (
        f"{a['worker']}'s vote delegation changed at {_when(a['changedAt'])}, this same "
        "second: a dispute is refused then (the jury is read from the votes a second "
        "before); send it again a second later"
    ),
    "VotePending": lambda a: (
        f"the vote on this dispute may still be opened until {_when(a['voteBy'])}: "
        "it cannot be resolved before then"
    ),
    "VoteDeadlinePassed": lambda a: (
        f"the vote had to be open by {_when(a['voteBy'])}: the dispute is lost (anyone may "
        "resolve it; the refusal or slash is upheld)"
    ),
    # WorkerLicense
    "EmptyBatch": lambda a: "no addresses to mint licences to",
    "LicenseBlacklisted": lambda a: f"licence {a['tokenId']} is blacklisted and cannot move",
    "TransferCooldown": lambda a: (
        f"licence {a['tokenId']} changed hands recently: it can move again at {_when(a['until'])}"
    ),
    # OpenZeppelin access control
    "AccessControlUnauthorizedAccount": lambda a: (
        f"{a['account']} lacks the role this needs (0x{bytes(a['neededRole']).hex()})"
    ),
    "AccessControlEnforcedDefaultAdminRules": lambda a: (
        "the admin role is handed over in two steps (beginDefaultAdminTransfer, then "
        "acceptDefaultAdminTransfer), never granted or revoked directly"
    ),
    "AccessControlEnforcedDefaultAdminDelay": lambda a: (
        f"the admin handover is not due yet: it can be accepted after {_when(a['schedule'])}"
        if a.get("schedule")
        else "no admin handover is scheduled"
    ),
    "AccessControlInvalidDefaultAdmin": lambda a: (
        f"{a['defaultAdmin']} is not the pending admin of this contract"
    ),
}
"""One-line explanations of the project's custom errors, by error name (see
:func:`friendly_message`)."""


def friendly_message(error: str | None, args: Mapping[str, Any]) -> str | None:
    """The one-line explanation of custom error ``error`` with decoded ``args``, if known."""
    make = FRIENDLY.get(error or "")
    if make is None:
        return None
    try:
        return make(args)
    except (KeyError, TypeError, ValueError):  # an error of the same name, other arguments
        return None


class ChainRevert(Exception):
    """A call or transaction reverted.

    ``reason`` is the decoded error (``"NothingToClaim(account=0x…, …)"``, a ``require``
    string, or ``"Panic(0x11: arithmetic overflow or underflow)"``); ``error`` is the custom
    error's name (or ``"Error"``/``"Panic"``), ``args`` its decoded arguments, ``data`` the raw
    bytes; ``hint`` a one-line explanation of a known custom error (:data:`FRIENDLY`).
    ``str()`` is the hint followed by the reason, what a CLI prints.
    """

    def __init__(
        self,
        reason: str,
        *,
        error: str | None = None,
        args: Mapping[str, Any] | None = None,
        data: bytes | None = None,
    ) -> None:
        self.reason = reason
        self.error = error
        self.args_by_name: dict[str, Any] = dict(args or {})
        self.data = data
        self.hint = friendly_message(error, self.args_by_name)
        super().__init__(f"{self.hint} [{reason}]" if self.hint else reason)

    def __repr__(self) -> str:
        return f"ChainRevert({self.reason!r})"


def _canonical_type(param: Mapping[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_canonical_type(c) for c in param.get("components", []))
        return f"({inner}){kind[len('tuple') :]}"
    return kind


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


class ErrorDecoder:
    """Maps 4-byte selectors to the custom errors declared in a set of ABIs."""

    def __init__(self, abis: Iterable[Sequence[Mapping[str, Any]]] = ()) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            self.add_abi(abi)

    def add_abi(self, abi: Sequence[Mapping[str, Any]]) -> None:
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [_canonical_type(p) for p in item.get("inputs", [])]
            names = [str(p.get("name") or f"arg{i}") for i, p in enumerate(item.get("inputs", []))]
            selector = keccak(f"{item['name']}({','.join(types)})".encode())[:4]
            self._errors[selector] = (str(item["name"]), types, names)

    def decode(self, data: bytes) -> ChainRevert:
        """Turn raw revert data into a :class:`ChainRevert`."""
        if not data:
            return ChainRevert("reverted without a reason", data=data)
        selector, body = data[:4], data[4:]
        try:
            if selector == _ERROR_STRING:
                (message,) = abi_decode(["string"], body)
                return ChainRevert(
                    str(message), error="Error", args={"message": message}, data=data
                )
            if selector == _PANIC:
                (code,) = abi_decode(["uint256"], body)
                text = _PANIC_CODES.get(code, "unknown panic")
                return ChainRevert(
                    f"Panic(0x{code:02x}: {text})", error="Panic", args={"code": code}, data=data
                )
            if selector in self._errors:
                name, types, names = self._errors[selector]
                values = [
                    to_checksum_address(v) if t == "address" else v
                    for t, v in zip(types, abi_decode(types, body), strict=True)
                ]
                shown = ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, values, strict=True))
                return ChainRevert(
                    f"{name}({shown})",
                    error=name,
                    args=dict(zip(names, values, strict=True)),
                    data=data,
                )
        except Exception:  # malformed payload: fall through to the raw form
            pass
        return ChainRevert(f"unknown error 0x{data.hex()}", data=data)

    def from_exception(self, exc: BaseException) -> ChainRevert:
        """Convert eth-tester's ``TransactionFailed`` or web3's ``ContractLogicError``."""
        data = _revert_data(exc)
        if data is not None:
            return self.decode(data)
        message = str(exc.args[0]) if exc.args else str(exc)
        reason = _PREFIX.sub("", message).strip() or "reverted without a reason"
        return ChainRevert(reason, data=None)


def _revert_data(exc: BaseException) -> bytes | None:
    """Raw revert bytes from either chain's exception, when they can be recovered."""
    data = getattr(exc, "data", None)
    if isinstance(data, Mapping):  # some nodes nest it: {"data": "0x…"}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, bytes):
        return data
    # eth-tester: "execution reverted: b'\\x…'" (the bytes' repr) or a decoded string
    first = exc.args[0] if exc.args else ""
    if isinstance(first, BaseException) and first.args:
        first = first.args[0]
    if isinstance(first, bytes):
        return first
    text = _PREFIX.sub("", str(first)).strip()
    if text.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None
