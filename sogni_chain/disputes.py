"""The Disputes contract: a worker contests a refusal or a proposed slash, stakers judge.

A refusal is signed off chain by a coordinator key holding REPORTER_ROLE (EIP-191 over
:meth:`Disputes.refusal_digest`), so refusing a result costs no gas; the worker brings the
signature when it disputes. Slashes are proposed here by the settlement key (SLASHER_ROLE on
Disputes) and executed after their dispute window, never directly on Staking. Jurors commit
``keccak256(abi.encode(forWorker, salt, juror, caseId, disputes))`` and reveal it later.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_hash.auto import keccak
from eth_typing import ChecksumAddress
from eth_utils import to_checksum_address

from .chain import Chain, Signer, Tx
from .contracts import Staking, _b32, _Bound

__all__ = [
    "DEV_DISPUTE_PARAMS",
    "LIVE_DISPUTE_PARAMS",
    "Ballot",
    "Case",
    "CaseState",
    "DisputeParams",
    "Disputes",
    "Refusal",
    "deploy_disputes",
    "new_salt",
    "open_stalled_vote",
    "sign_refusal",
]

_SOGNI = 10**18


class CaseState(IntEnum):
    NONE = 0
    PROPOSED = 1
    DISPUTED = 2
    VOTING = 3
    WORKER_WON = 4
    WORKER_LOST = 5
    EXECUTED = 6

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


KINDS = {0: "none", 1: "refusal", 2: "slash"}


@dataclass(frozen=True)
class DisputeParams:
    """Bond (base units) and windows (seconds); ``juror_share_bps`` of a kept bond to jurors."""

    bond: int
    dispute_window: int
    evidence_window: int
    commit_window: int
    reveal_window: int
    juror_share_bps: int


DEV_DISPUTE_PARAMS = DisputeParams(10 * _SOGNI, 3600, 600, 1800, 1800, 9_000)
LIVE_DISPUTE_PARAMS = DisputeParams(100 * _SOGNI, 3 * 86400, 86400, 2 * 86400, 86400, 9_000)
"""Live: 3 days to dispute (a worker offline for a weekend still can), a day for the re-checks,
two days to commit and one to reveal."""


@dataclass(frozen=True)
class Case:
    case_id: bytes
    worker: ChecksumAddress
    kind: str
    state: CaseState
    window_end: int
    evidence_deadline: int
    commit_end: int
    reveal_end: int
    snapshot: int
    evidence_hash: bytes
    bundle_hash: bytes
    bond: int
    amount: int
    for_worker: int
    against_worker: int
    reward_pool: int
    execute_by: int = 0
    """A slash: `executeSlash` reverts `SlashExpired` from then on (after a lost vote, no
    earlier than its reveal end + `EXECUTE_GRACE`); 0 for a refusal."""
    vote_by: int = 0
    """A dispute's vote must be open by then (the evidence deadline plus one commit window):
    after it `resolve` upholds the refusal or slash and keeps the bond. 0 until disputed."""
    worker_delegate: str = ""
    """Whom the worker's stake voted through at the snapshot (fixed when the dispute opened):
    it may not judge the case. Empty until disputed."""

    def vote_stalled(self, now: int) -> bool:
        """Disputed, the coordinator's evidence window over, the vote not open: the worker (or
        anyone) may open it on the original evidence until `vote_by`."""
        return self.state is CaseState.DISPUTED and self.evidence_deadline <= now < self.vote_by

    def upheld_by_default(self, now: int) -> bool:
        """Disputed and `vote_by` passed with no vote: `resolve` upholds it (bond kept)."""
        return self.state is CaseState.DISPUTED and now >= self.vote_by > 0


@dataclass(frozen=True)
class Ballot:
    commitment: bytes
    weight: int
    revealed: bool
    for_worker: bool
    claimed: bool


@dataclass(frozen=True)
class Refusal:
    """What a worker needs to dispute a refused result on chain."""

    case_id: bytes
    worker: ChecksumAddress
    evidence_hash: bytes
    refused_at: int
    signature: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "caseId": "0x" + self.case_id.hex(),
            "worker": self.worker,
            "evidenceHash": "0x" + self.evidence_hash.hex(),
            "refusedAt": self.refused_at,
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Refusal:
        return cls(
            _b32(str(raw["caseId"])),
            to_checksum_address(str(raw["worker"])),
            _b32(str(raw["evidenceHash"])),
            int(raw["refusedAt"]),
            bytes.fromhex(str(raw["signature"]).removeprefix("0x")),
        )


def refusal_digest(
    chain_id: int, disputes: str, case_id: bytes, worker: str, evidence_hash: bytes, refused_at: int
) -> bytes:
    """Same bytes as ``Disputes.refusalDigest`` (checked against the contract in tests)."""
    return keccak(
        abi_encode(
            ["string", "uint256", "address", "bytes32", "address", "bytes32", "uint64"],
            [
                "sogni-refusal-v1",
                chain_id,
                to_checksum_address(disputes),
                case_id,
                to_checksum_address(worker),
                evidence_hash,
                refused_at,
            ],
        )
    )


def sign_refusal(
    key: bytes | str,
    *,
    chain_id: int,
    disputes: str,
    case_id: bytes,
    worker: str,
    evidence_hash: bytes,
    refused_at: int,
) -> Refusal:
    """A reporter key (coordinator) signs a refusal a worker may dispute; no gas spent."""
    digest = refusal_digest(chain_id, disputes, case_id, worker, evidence_hash, refused_at)
    sig = Account.sign_message(encode_defunct(primitive=digest), key)
    return Refusal(
        case_id, to_checksum_address(worker), evidence_hash, refused_at, bytes(sig.signature)
    )


def commitment_of(
    case_id: bytes, for_worker: bool, salt: bytes, juror: str, disputes: str
) -> bytes:
    """Same bytes as ``Disputes.commitmentOf``."""
    return keccak(
        abi_encode(
            ["bool", "bytes32", "address", "bytes32", "address"],
            [for_worker, salt, to_checksum_address(juror), case_id, to_checksum_address(disputes)],
        )
    )


def new_salt() -> bytes:
    return secrets.token_bytes(32)


class Disputes(_Bound):
    """Wrapper for ``Disputes.sol``; amounts in base units, ids as 32 bytes."""

    NAME = "Disputes"

    # -- parameters --

    def params(self) -> DisputeParams:
        return DisputeParams(
            int(self._call("bond")),
            int(self._call("disputeWindow")),
            int(self._call("evidenceWindow")),
            int(self._call("commitWindow")),
            int(self._call("revealWindow")),
            int(self._call("jurorShareBps")),
        )

    def juror_cap_bps(self) -> int:
        """Most weight one juror carries, in bps of all votes at a case's snapshot."""
        return int(self._call("jurorCapBps"))

    def set_juror_cap(self, bps: int, *, sender: Signer | None = None) -> Tx:
        return self._send("setJurorCap", bps, sender=sender)

    def set_params(self, p: DisputeParams, *, sender: Signer | None = None) -> Tx:
        return self._send(
            "setParameters",
            p.bond,
            p.dispute_window,
            p.evidence_window,
            p.commit_window,
            p.reveal_window,
            p.juror_share_bps,
            sender=sender,
        )

    def treasury(self) -> ChecksumAddress:
        return to_checksum_address(self._call("treasury"))

    # -- slashes --

    def propose_slash(
        self,
        worker: Signer,
        amount: int,
        reason: str,
        evidence_hash: bytes = bytes(32),
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """``tx.event("SlashProposed")["caseId"]`` is the new case."""
        return self._send(
            "proposeSlash", self._acct(worker), amount, reason, evidence_hash, sender=sender
        )

    def execute_slash(self, case_id: bytes, *, sender: Signer | None = None) -> Tx:
        return self._send("executeSlash", case_id, sender=sender)

    # -- disputes --

    def refusal_digest(
        self, case_id: bytes, worker: Signer, evidence_hash: bytes, refused_at: int
    ) -> bytes:
        return bytes(
            self._call("refusalDigest", case_id, self._acct(worker), evidence_hash, refused_at)
        )

    def dispute_refusal(self, refusal: Refusal, *, sender: Signer | None = None) -> Tx:
        """Sent by the worker after ``Token.approve(disputes, bond)``."""
        return self._send(
            "disputeRefusal",
            refusal.case_id,
            refusal.worker,
            refusal.evidence_hash,
            refusal.refused_at,
            refusal.signature,
            sender=sender,
        )

    def dispute_slash(self, case_id: bytes, *, sender: Signer | None = None) -> Tx:
        return self._send("disputeSlash", case_id, sender=sender)

    def open_voting(
        self, case_id: bytes, bundle_hash: bytes, bundle_uri: str, *, sender: Signer | None = None
    ) -> Tx:
        return self._send("openVoting", case_id, bundle_hash, bundle_uri, sender=sender)

    def commit_vote(self, case_id: bytes, for_worker: bool, salt: bytes, *, sender: Signer) -> Tx:
        commitment = commitment_of(case_id, for_worker, salt, self._acct(sender), self.address)
        return self._send("commitVote", case_id, commitment, sender=sender)

    def reveal_vote(self, case_id: bytes, for_worker: bool, salt: bytes, *, sender: Signer) -> Tx:
        return self._send("revealVote", case_id, for_worker, salt, sender=sender)

    def resolve(self, case_id: bytes, *, sender: Signer | None = None) -> Tx:
        return self._send("resolve", case_id, sender=sender)

    def claim_reward(self, case_id: bytes, *, sender: Signer) -> Tx:
        return self._send("claimReward", case_id, sender=sender)

    # -- views --

    def case(self, case_id: bytes) -> Case:
        raw = list(self._call("caseOf", case_id))
        if len(raw) == 17:  # a Disputes deployed before `voteBy`: no such field
            raw.insert(7, 0)
        n = [int(v) for v in raw[3:7]] + [int(raw[8])] + [int(v) for v in raw[11:16]]
        delegate = "" if int(str(raw[16]), 16) == 0 else to_checksum_address(raw[16])
        return Case(
            case_id=case_id,
            worker=to_checksum_address(raw[0]),
            kind=KINDS.get(int(raw[1]), "?"),
            state=CaseState(int(raw[2])),
            window_end=n[0],
            evidence_deadline=n[1],
            commit_end=n[2],
            reveal_end=n[3],
            snapshot=n[4],
            evidence_hash=bytes(raw[9]),
            bundle_hash=bytes(raw[10]),
            bond=n[5],
            amount=n[6],
            for_worker=n[7],
            against_worker=n[8],
            reward_pool=n[9],
            execute_by=int(raw[17]),
            vote_by=int(raw[7]),
            worker_delegate=delegate,
        )

    def ballot(self, case_id: bytes, juror: Signer) -> Ballot:
        raw = self._call("ballotOf", case_id, self._acct(juror))
        return Ballot(bytes(raw[0]), int(raw[1]), bool(raw[2]), bool(raw[3]), bool(raw[4]))

    def reward_of(self, case_id: bytes, juror: Signer) -> int:
        return int(self._call("rewardOf", case_id, self._acct(juror)))

    def voting_weight(self, juror: Signer, timepoint: int) -> int:
        return int(self._call("votingWeight", self._acct(juror), timepoint))

    def juror_weight(self, juror: Signer, timepoint: int) -> int:
        """What a vote of `juror` weighs on a case with this snapshot (votes, capped)."""
        return int(self._call("jurorWeight", self._acct(juror), timepoint))

    def slash_reason(self, case_id: bytes) -> str:
        return str(self._call("slashReason", case_id))

    def case_ids(self, from_block: int = 0) -> list[bytes]:
        """Every case that was disputed or proposed, oldest first (from the logs)."""
        seen: dict[bytes, None] = {}
        for name in ("SlashProposed", "DisputeOpened"):
            event = getattr(self.contract.events, name)
            for log in event.get_logs(from_block=from_block):
                seen.setdefault(bytes(log["args"]["caseId"]), None)
        return list(seen)

    def bundle_uri(self, case_id: bytes, from_block: int = 0) -> str | None:
        """Where the reporter published the case's evidence bundle (its `VotingOpened`
        event; the contract stores only the bundle's hash)."""
        event = self.contract.events.VotingOpened
        found = event.get_logs(from_block=from_block)
        for log in reversed(found):
            if bytes(log["args"]["caseId"]) == case_id:
                return str(log["args"]["bundleUri"])
        return None

    def events_of(self, name: str, from_block: int = 0) -> list[dict[str, Any]]:
        """Decoded ``name`` events (args plus ``blockNumber``)."""
        event = getattr(self.contract.events, name)
        return [
            {**dict(log["args"]), "blockNumber": int(log["blockNumber"])}
            for log in event.get_logs(from_block=from_block)
        ]


def deploy_disputes(
    chain: Chain,
    *,
    token: str,
    staking: str,
    governance: Signer,
    treasury: Signer,
    slasher: Signer | None = None,
    reporters: tuple[Signer, ...] = (),
    params: DisputeParams = DEV_DISPUTE_PARAMS,
    admin_transfer_delay: int = 0,
) -> ChecksumAddress:
    """Deploy Disputes, give it SLASHER_ROLE on Staking (governance must be Staking's admin),
    make ``slasher`` its slash proposer and ``reporters`` the keys that sign refusals and
    publish evidence. A slasher key holding SLASHER_ROLE on Staking directly keeps it: revoke
    it (``Staking.revoke_role``) so slashes can only go through the dispute window."""
    tx = chain.deploy(
        "Disputes",
        token,
        staking,
        chain.address_of(governance),
        chain.address_of(treasury),
        admin_transfer_delay,
        params.bond,
        [params.dispute_window, params.evidence_window, params.commit_window, params.reveal_window],
        params.juror_share_bps,
        sender=governance,
    )
    address = tx.contract_address
    assert address is not None
    Staking(chain, staking, governance).grant_role("SLASHER_ROLE", address)
    disputes = Disputes(chain, address, governance)
    if slasher is not None:
        disputes.grant_role("SLASHER_ROLE", slasher)
    for reporter in reporters:
        disputes.grant_role("REPORTER_ROLE", reporter)
    return address


class DisputeRefused(Exception):
    """A dispute action the contract would refuse, said in one sentence before sending."""


def find_case(disputes: Disputes, ident: str, from_block: int = 0) -> bytes:
    """A case id from its full hex or a unique prefix (as `sogni dispute list` shows it)."""
    text = ident.lower().removeprefix("0x")
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise DisputeRefused(f"{ident!r} is not a case id") from None
    found = [c for c in disputes.case_ids(from_block) if c.hex().startswith(text)] if text else []
    if len(found) != 1:
        what = "no case" if not found else f"{len(found)} cases"
        raise DisputeRefused(f"{what} with id starting {ident!r} (see `sogni dispute list`)")
    return found[0]


def _when(ts: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def delegation_changed_at(disputes: Disputes, account: str) -> int:
    """When `account`'s vote delegation last changed on the Staking contract Disputes reads
    (0: never, or a Staking without `delegationOf`)."""
    try:
        staking = Staking(disputes.chain, str(disputes._call("staking")), account)
        return staking.delegation_of(account)[1]
    except Exception:  # a read that fails must not stop a dispute: the contract checks
        return 0


def open_dispute(
    disputes: Disputes,
    token_address: str,
    *,
    worker: Signer,
    refusal: Refusal | None = None,
    case_id: bytes | None = None,
) -> Tx:
    """Approve the bond and dispute a signed refusal, or a proposed slash (`case_id`),
    after checking what the contract would refuse (window, owner, balance, already open)."""
    from .contracts import Token

    chain = disputes.chain
    me = chain.address_of(worker)
    now = chain.timestamp()
    params = disputes.params()
    cid = refusal.case_id if refusal is not None else case_id
    if cid is None:
        raise DisputeRefused("name a refusal or a slash case to dispute")
    case = disputes.case(cid)
    if refusal is not None:
        if case.state is not CaseState.NONE:
            raise DisputeRefused(
                f"case 0x{cid.hex()[:16]} is already disputed ({case.state.label})"
            )
        if refusal.worker.lower() != me.lower():
            raise DisputeRefused(f"the refusal is for {refusal.worker}, not this wallet {me}")
        window_end = refusal.refused_at + params.dispute_window
    else:
        if case.state is CaseState.NONE:
            raise DisputeRefused(f"no slash case 0x{cid.hex()[:16]} on chain")
        if case.state is not CaseState.PROPOSED:
            raise DisputeRefused(f"case 0x{cid.hex()[:16]} is {case.state.label}, not open")
        if case.worker.lower() != me.lower():
            raise DisputeRefused(f"the slash is against {case.worker}, not this wallet {me}")
        window_end = case.window_end
    if now + 1 >= window_end:
        raise DisputeRefused(f"the dispute window closed at {_when(window_end)}")
    changed_at = delegation_changed_at(disputes, me)
    if changed_at >= now:  # the next block may still be in that second
        raise DisputeRefused(
            f"this wallet's vote delegation changed at {_when(changed_at)}: a dispute in that "
            "same second is refused (DelegationJustChanged); try again in a second"
        )
    token = Token(chain, token_address, worker)
    if token.balance_of(me) < params.bond:
        raise DisputeRefused(
            f"the bond is {params.bond / _SOGNI:g} SOGNI and this wallet holds "
            f"{token.balance_of(me) / _SOGNI:g}"
        )
    if token.allowance(me, disputes.address) < params.bond:
        token.approve(disputes.address, params.bond, sender=worker)
    if refusal is not None:
        return disputes.dispute_refusal(refusal, sender=worker)
    return disputes.dispute_slash(cid, sender=worker)


def open_stalled_vote(disputes: Disputes, case_id: bytes, *, worker: Signer) -> Tx:
    """Open the vote of `worker`'s own dispute on the original evidence, when the coordinator
    did not open it within the evidence window; possible until the case's `vote_by`, after
    which the dispute is lost (`resolve` upholds it). Checks what the contract would refuse."""
    chain = disputes.chain
    me = chain.address_of(worker)
    now = chain.timestamp()
    case = disputes.case(case_id)
    short = "0x" + case_id.hex()[:16]
    if case.state is CaseState.NONE:
        raise DisputeRefused(f"no case {short} on chain")
    if case.worker.lower() != me.lower():
        raise DisputeRefused(f"case {short} is {case.worker}'s dispute, not this wallet {me}'s")
    if case.state is CaseState.VOTING:
        raise DisputeRefused(f"voting on {short} is already open (until {_when(case.commit_end)})")
    if case.state is not CaseState.DISPUTED:
        raise DisputeRefused(f"case {short} is {case.state.label}: no vote to open")
    if now + 1 >= case.vote_by:
        raise DisputeRefused(
            f"the vote on {short} had to be open by {_when(case.vote_by)}: the dispute is lost"
            " (anyone may resolve it)"
        )
    if now + 1 < case.evidence_deadline:
        raise DisputeRefused(
            f"the coordinator has until {_when(case.evidence_deadline)} to publish its "
            f"re-checks; open the vote yourself after that (before {_when(case.vote_by)})"
        )
    return disputes.open_voting(case_id, case.evidence_hash, "", sender=worker)


def check_commit(disputes: Disputes, case_id: bytes, juror: Signer) -> Case:
    """The case, if `juror` may commit a vote on it now; else a one-line refusal."""
    case = disputes.case(case_id)
    me = disputes.chain.address_of(juror)
    now = disputes.chain.timestamp()
    short = "0x" + case_id.hex()[:16]
    if case.state is CaseState.NONE:
        raise DisputeRefused(f"no case {short}")
    if case.state is CaseState.DISPUTED:
        raise DisputeRefused(
            f"voting on {short} is not open yet (waiting for the re-checks until "
            f"{_when(case.evidence_deadline)}; it opens by {_when(case.vote_by)} or the "
            "dispute is lost)"
        )
    if case.state is not CaseState.VOTING:
        raise DisputeRefused(f"case {short} is {case.state.label}: no vote")
    if now + 1 >= case.commit_end:
        raise DisputeRefused(f"the voting window of {short} closed at {_when(case.commit_end)}")
    if case.worker.lower() == me.lower():
        raise DisputeRefused("the worker cannot vote on its own dispute")
    if disputes.ballot(case_id, me).commitment != bytes(32):
        raise DisputeRefused(f"{me} already voted on {short}")
    if case.worker_delegate and case.worker_delegate.lower() == me.lower():
        raise DisputeRefused(
            f"{me} carried the worker's votes when the dispute opened: it cannot judge {short}"
        )
    if disputes.voting_weight(me, case.snapshot) == 0:
        raise DisputeRefused(
            f"{me} is not a staker: it had no staked SOGNI (votes) when the dispute on {short}"
            " opened"
        )
    return case


def check_reveal(disputes: Disputes, case_id: bytes, juror: Signer) -> Case:
    case = disputes.case(case_id)
    me = disputes.chain.address_of(juror)
    now = disputes.chain.timestamp()
    short = "0x" + case_id.hex()[:16]
    ballot = disputes.ballot(case_id, me)
    if ballot.commitment == bytes(32):
        raise DisputeRefused(f"nothing to reveal: {me} did not vote on {short}")
    if ballot.revealed:
        raise DisputeRefused(f"nothing to reveal: {me} already revealed its vote on {short}")
    if case.state is not CaseState.VOTING:
        raise DisputeRefused(f"case {short} is {case.state.label}: too late to reveal")
    if now + 1 < case.commit_end:
        raise DisputeRefused(f"reveal opens at {_when(case.commit_end)}, when voting closes")
    if now + 1 >= case.reveal_end:
        raise DisputeRefused(f"the reveal window of {short} closed at {_when(case.reveal_end)}")
    return case


def dispute_params(chain_id: int) -> DisputeParams:
    """The dev parameters on local dev chains (short windows, for tests and demos), else live."""
    from sogni_protocol.settings import DEV_CHAIN_IDS

    return DEV_DISPUTE_PARAMS if chain_id in DEV_CHAIN_IDS else LIVE_DISPUTE_PARAMS
