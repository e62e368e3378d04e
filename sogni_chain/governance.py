"""Stakers' governance: deploy the Governor, timelock and NetworkParameters, and talk to them.

Why a separate module and file: governance is optional on a local network (``deploy_all(...,
governed=True)``), and its three addresses live in a sibling file of the addresses file
(``addresses.json`` -> ``addresses.governance.json``) so the addresses file keeps its shape.

The handover: the deployer begins the admin transfer of Staking, the RewardDistributor,
Disputes and the WorkerLicense to the timelock; once their ``admin_transfer_delay`` has
passed (at once on dev chains), :func:`finish_handover` makes the timelock accept them, sets
its real delay, and drops the deployer's temporary timelock roles and its licence
``MINTER_ROLE``. From then on only a passed, queued and delayed proposal changes a parameter,
blacklists or burns a licence, or names who mints them (:func:`minter_action`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from sogni_protocol.atomic import atomic_write_text
from sogni_protocol.settings import DEV_CHAIN_IDS
from sogni_wallet.addresses import Addresses

from .chain import Chain, Signer, Tx
from .contracts import _EIP712_DOMAIN_TYPE, Distributor, License, Staking, _Bound

__all__ = [
    "DEV_SETTINGS",
    "LIVE_SETTINGS",
    "PROPOSAL_STATES",
    "Action",
    "GovernanceAddresses",
    "GovernanceSettings",
    "Governor",
    "NetworkParameters",
    "ParameterSnapshot",
    "Proposal",
    "StakingVotes",
    "Timelock",
    "deploy_governance",
    "finish_handover",
    "governance_path",
    "minter_action",
    "parameter_actions",
]

_SOGNI = 10**18
_ZERO = "0x0000000000000000000000000000000000000000"
STAKING_DOMAIN_NAME = "SogniStaking"
"""Staking's EIP-712 domain name (version "1"), for ``delegateBySig``."""

PROPOSAL_STATES = (
    "Pending",
    "Active",
    "Canceled",
    "Defeated",
    "Succeeded",
    "Queued",
    "Expired",
    "Executed",
)
"""OpenZeppelin's ``IGovernor.ProposalState``, by value."""

VOTE_SUPPORT = {"against": 0, "for": 1, "abstain": 2}


@dataclass(frozen=True)
class GovernanceSettings:
    """The windows and thresholds (seconds; the Governor's clock is block timestamps)."""

    voting_delay: int
    """From proposal to the vote's start; the voting-power snapshot is taken at the start."""
    voting_period: int
    proposal_threshold: int
    """Votes (base units of staked SOGNI) a proposer needs."""
    quorum_percent: int
    """Share of all active stake (at the snapshot) that must vote for or abstain."""
    timelock_delay: int
    """From queueing a passed proposal to the earliest execution."""


DEV_SETTINGS = GovernanceSettings(
    voting_delay=1,
    voting_period=300,
    proposal_threshold=1_000 * _SOGNI,
    quorum_percent=4,
    timelock_delay=60,
)
"""Local networks: a proposal can pass and execute within minutes."""
LIVE_SETTINGS = GovernanceSettings(
    voting_delay=24 * 3600,
    voting_period=7 * 24 * 3600,
    proposal_threshold=100_000 * _SOGNI,
    quorum_percent=4,
    timelock_delay=2 * 24 * 3600,
)
"""Production: a day to see a proposal coming, a week to vote, two days to react before it
executes (e.g. unstake, or pause claims through a counter-proposal)."""


def governance_path(addresses_path: str | Path) -> Path:
    """``addresses.json`` -> ``addresses.governance.json`` (same folder)."""
    p = Path(addresses_path)
    return p.with_name(f"{p.stem}.governance.json")


@dataclass(frozen=True)
class GovernanceAddresses:
    """Where governance lives on one chain."""

    chain_id: int
    governor: ChecksumAddress
    timelock: ChecksumAddress
    parameters: ChecksumAddress
    deployed_at_block: int = 0

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, chain_id: int | None = None) -> GovernanceAddresses:
        """Read a governance file; one-line ``ValueError`` if missing, bad or for another chain."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text("utf-8"))
            found = cls(
                chain_id=int(raw["chain_id"]),
                governor=Web3.to_checksum_address(raw["governor"]),
                timelock=Web3.to_checksum_address(raw["timelock"]),
                parameters=Web3.to_checksum_address(raw["parameters"]),
                deployed_at_block=int(raw.get("deployed_at_block", 0)),
            )
        except FileNotFoundError:
            raise ValueError(f"governance file {path} not found (no governance deployed)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"governance file {path} is malformed: {exc}") from None
        if chain_id is not None and found.chain_id != chain_id:
            raise ValueError(
                f"governance file {path} is for chain {found.chain_id}, connected to {chain_id}"
            )
        return found


@dataclass(frozen=True)
class Action:
    """One call a proposal makes: ``target.calldata`` with ``value`` wei."""

    target: ChecksumAddress
    calldata: bytes
    value: int = 0
    summary: str = ""


@dataclass(frozen=True)
class ParameterSnapshot:
    """NetworkParameters at one block. ``None``: never set by governance (use the config)."""

    version: int
    take_rates_bps: list[int] | None
    emission_budget_sogni: int | None
    verification_rate_bps: int | None


@dataclass(frozen=True)
class Proposal:
    """A proposal as its ``ProposalCreated`` event told it, plus its live state."""

    proposal_id: int
    proposer: ChecksumAddress
    targets: list[ChecksumAddress]
    values: list[int]
    calldatas: list[bytes]
    description: str
    vote_start: int
    vote_end: int
    state: str
    votes_against: int
    votes_for: int
    votes_abstain: int
    eta: int

    @property
    def description_hash(self) -> bytes:
        return bytes(Web3.keccak(text=self.description))


class StakingVotes(_Bound):
    """Staking's vote side (OZ ``Votes``): active stake is voting power, delegable."""

    NAME = "Staking"

    def delegate(self, delegatee: Signer, *, sender: Signer | None = None) -> Tx:
        return self._send("delegate", self._acct(delegatee), sender=sender)

    def delegates(self, account: Signer) -> ChecksumAddress:
        return Web3.to_checksum_address(self._call("delegates", self._acct(account)))

    def get_votes(self, account: Signer) -> int:
        return int(self._call("getVotes", self._acct(account)))

    def get_past_votes(self, account: Signer, timepoint: int) -> int:
        return int(self._call("getPastVotes", self._acct(account), timepoint))

    def cooldown(self) -> int:
        return int(self._call("cooldown"))

    def nonces(self, account: Signer) -> int:
        return int(self._call("nonces", self._acct(account)))

    def sign_delegation(
        self, owner: LocalAccount, delegatee: Signer, expiry: int
    ) -> tuple[int, bytes, bytes]:
        """``owner``'s EIP-712 ``Delegation`` signature ``(v, r, s)`` for ``delegateBySig``,
        so a staker without gas can delegate through anyone who submits it."""
        document = {
            "types": {
                "EIP712Domain": _EIP712_DOMAIN_TYPE,
                "Delegation": [
                    {"name": "delegatee", "type": "address"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "expiry", "type": "uint256"},
                ],
            },
            "primaryType": "Delegation",
            "domain": {
                "name": STAKING_DOMAIN_NAME,
                "version": "1",
                "chainId": self.chain.chain_id,
                "verifyingContract": self.address,
            },
            "message": {
                "delegatee": self._acct(delegatee),
                "nonce": self.nonces(owner),
                "expiry": expiry,
            },
        }
        signed = owner.sign_message(encode_typed_data(full_message=document))
        return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")

    def delegate_by_sig(
        self,
        delegatee: Signer,
        nonce: int,
        expiry: int,
        signature: tuple[int, bytes, bytes],
        *,
        sender: Signer | None = None,
    ) -> Tx:
        v, r, s = signature
        return self._send(
            "delegateBySig", self._acct(delegatee), nonce, expiry, v, r, s, sender=sender
        )


class NetworkParameters(_Bound):
    NAME = "NetworkParameters"

    def snapshot(self, block: int | str = "latest") -> ParameterSnapshot:
        version, mask, rates, emission, verification = self._call("snapshot", block=block)
        return ParameterSnapshot(
            version=int(version),
            take_rates_bps=[int(r) for r in rates] if mask & 1 else None,
            emission_budget_sogni=int(emission) if mask & 2 else None,
            verification_rate_bps=int(verification) if mask & 4 else None,
        )

    def owner(self) -> ChecksumAddress:
        return Web3.to_checksum_address(self._call("owner"))

    def set_take_rates(self, rates_bps: list[int], *, sender: Signer | None = None) -> Tx:
        """Only the owner (the timelock) may; anyone else's call reverts."""
        return self._send("setTakeRates", rates_bps, sender=sender)


class Timelock(_Bound):
    NAME = "SogniTimelock"

    def min_delay(self) -> int:
        return int(self._call("getMinDelay"))


class Governor(_Bound):
    NAME = "SogniGovernor"

    def propose(
        self, actions: list[Action], description: str, *, sender: Signer | None = None
    ) -> int:
        """Submit a proposal; returns its id. The sender needs ``proposal_threshold`` votes."""
        tx = self._send(
            "propose",
            [a.target for a in actions],
            [a.value for a in actions],
            [a.calldata for a in actions],
            description,
            sender=sender,
        )
        return int(tx.event("ProposalCreated")["proposalId"])

    def cast_vote(
        self, proposal_id: int, support: str, *, reason: str = "", sender: Signer | None = None
    ) -> Tx:
        """``support`` is ``for``, ``against`` or ``abstain``."""
        if support not in VOTE_SUPPORT:
            raise ValueError(f"vote must be for, against or abstain, not {support!r}")
        if reason:
            return self._send(
                "castVoteWithReason", proposal_id, VOTE_SUPPORT[support], reason, sender=sender
            )
        return self._send("castVote", proposal_id, VOTE_SUPPORT[support], sender=sender)

    def queue(self, p: Proposal, *, sender: Signer | None = None) -> Tx:
        return self._send(
            "queue", p.targets, p.values, p.calldatas, p.description_hash, sender=sender
        )

    def execute(self, p: Proposal, *, sender: Signer | None = None) -> Tx:
        return self._send(
            "execute", p.targets, p.values, p.calldatas, p.description_hash, sender=sender
        )

    def state(self, proposal_id: int) -> str:
        return PROPOSAL_STATES[int(self._call("state", proposal_id))]

    def has_voted(self, proposal_id: int, account: Signer) -> bool:
        return bool(self._call("hasVoted", proposal_id, self._acct(account)))

    def proposal_threshold(self) -> int:
        return int(self._call("proposalThreshold"))

    def quorum(self, timepoint: int) -> int:
        return int(self._call("quorum", timepoint))

    def proposals(self, from_block: int = 0) -> list[Proposal]:
        """Every proposal since ``from_block``, oldest first, with its state and votes now."""
        logs = self.contract.events.ProposalCreated.get_logs(from_block=from_block)
        return [self._proposal(dict(log["args"])) for log in logs]

    def proposal(self, proposal_id: int, from_block: int = 0) -> Proposal:
        """One proposal by id; ``KeyError`` if no such proposal was created."""
        for p in self.proposals(from_block):
            if p.proposal_id == proposal_id:
                return p
        raise KeyError(f"no proposal {proposal_id}")

    def _proposal(self, args: dict[str, Any]) -> Proposal:
        pid = int(args["proposalId"])
        against, for_, abstain = self._call("proposalVotes", pid)
        return Proposal(
            proposal_id=pid,
            proposer=Web3.to_checksum_address(args["proposer"]),
            targets=[Web3.to_checksum_address(t) for t in args["targets"]],
            values=[int(v) for v in args["values"]],
            calldatas=[bytes(c) for c in args["calldatas"]],
            description=str(args["description"]),
            vote_start=int(args["voteStart"]),
            vote_end=int(args["voteEnd"]),
            state=self.state(pid),
            votes_against=int(against),
            votes_for=int(for_),
            votes_abstain=int(abstain),
            eta=int(self._call("proposalEta", pid)),
        )


def _calldata(bound: _Bound, fn: str, *args: Any) -> bytes:
    return bytes.fromhex(bound.contract.encode_abi(fn, list(args))[2:])


def _action(bound: _Bound, summary: str, fn: str, *args: Any) -> Action:
    """One proposal call ``bound.fn(*args)``, described for the voter by ``summary``."""
    return Action(bound.address, _calldata(bound, fn, *args), summary=summary)


def minter_action(chain: Chain, addresses: Addresses, minter: str, *, grant: bool = True) -> Action:
    """A proposal call that lets `minter` mint worker licences (or, `grant=False`, stops it):
    after the handover nobody holds `MINTER_ROLE` until governance names someone."""
    lic = License(chain, addresses.license)
    fn, verb = ("grantRole", "may now") if grant else ("revokeRole", "may no longer")
    return _action(
        lic, f"{minter} {verb} mint worker licences", fn, lic._role("MINTER_ROLE"), minter
    )


def parameter_actions(
    chain: Chain,
    addresses: Addresses,
    gov: GovernanceAddresses,
    *,
    take_rates_bps: list[int] | None = None,
    emission_budget_sogni: int | None = None,
    verification_rate_bps: int | None = None,
    unstake_cooldown: int | None = None,
    claim_delay: int | None = None,
    max_total_growth_sogni: int | None = None,
    tier_minimums_sogni: dict[int, int] | None = None,
    juror_cap_bps: int | None = None,
) -> list[Action]:
    """The calls a proposal makes to set the given parameters (the rest stay as they are).

    Bounds are checked by the contracts when the proposal executes; values are whole SOGNI
    where the name says so.
    """
    params = NetworkParameters(chain, gov.parameters)
    staking = Staking(chain, addresses.staking)
    distributor = Distributor(chain, addresses.distributor)
    out: list[Action] = []
    if take_rates_bps is not None:
        rates = ",".join(map(str, take_rates_bps))
        out.append(_action(params, f"take rates {rates} bps", "setTakeRates", take_rates_bps))
    if emission_budget_sogni is not None:
        out.append(
            _action(
                params,
                f"emission budget {emission_budget_sogni} SOGNI per epoch",
                "setEmissionBudget",
                emission_budget_sogni,
            )
        )
    if verification_rate_bps is not None:
        out.append(
            _action(
                params,
                f"verification rate {verification_rate_bps} bps",
                "setVerificationRate",
                verification_rate_bps,
            )
        )
    if unstake_cooldown is not None:
        out.append(
            _action(
                staking, f"unstake cooldown {unstake_cooldown} s", "setCooldown", unstake_cooldown
            )
        )
    for tier, minimum in sorted((tier_minimums_sogni or {}).items()):
        out.append(
            _action(
                staking,
                f"tier {tier} minimum {minimum} SOGNI",
                "setTierMinimum",
                tier,
                minimum * _SOGNI,
            )
        )
    if claim_delay is not None:
        out.append(
            _action(distributor, f"claim delay {claim_delay} s", "setClaimDelay", claim_delay)
        )
    if max_total_growth_sogni is not None:
        out.append(
            _action(
                distributor,
                f"growth cap {max_total_growth_sogni} SOGNI per epoch",
                "setMaxTotalGrowth",
                max_total_growth_sogni * _SOGNI,
            )
        )
    if juror_cap_bps is not None:
        if addresses.disputes is None:
            raise ValueError("this deployment has no Disputes contract: no juror cap to set")
        disputes = _disputes(chain, addresses.disputes)
        out.append(
            _action(
                disputes,
                f"juror cap {juror_cap_bps} bps of all votes",
                "setJurorCap",
                juror_cap_bps,
            )
        )
    return out


def deploy_governance(
    chain: Chain,
    addresses: Addresses,
    admin: Signer,
    *,
    settings: GovernanceSettings | None = None,
    path: str | Path | None = None,
) -> GovernanceAddresses:
    """Deploy timelock, Governor and NetworkParameters and start the admin handover.

    ``admin`` must be the current DEFAULT_ADMIN of Staking and the RewardDistributor. When
    their transfer delay has already passed (0 on dev chains) the handover is finished here;
    otherwise call :func:`finish_handover` once it has. ``settings`` default to
    :data:`DEV_SETTINGS` on dev chains and :data:`LIVE_SETTINGS` elsewhere.
    """
    if settings is None:
        settings = DEV_SETTINGS if chain.chain_id in DEV_CHAIN_IDS else LIVE_SETTINGS
    admin_addr = chain.address_of(admin)
    # Delay 0 until the handover: the deployer is admin of everything anyway until then.
    tl_tx = chain.deploy("SogniTimelock", 0, [admin_addr], [_ZERO], admin_addr, sender=admin)
    timelock = tl_tx.contract_address
    governor = chain.deploy(
        "SogniGovernor",
        addresses.staking,
        timelock,
        settings.voting_delay,
        settings.voting_period,
        settings.proposal_threshold,
        settings.quorum_percent,
        sender=admin,
    ).contract_address
    parameters = chain.deploy("NetworkParameters", timelock, sender=admin).contract_address
    assert timelock and governor and parameters  # set by Chain.deploy
    tl = Timelock(chain, timelock, admin)
    tl.grant_role("PROPOSER_ROLE", governor)
    tl.grant_role("CANCELLER_ROLE", governor)
    Staking(chain, addresses.staking, admin).begin_default_admin_transfer(timelock)
    Distributor(chain, addresses.distributor, admin).begin_default_admin_transfer(timelock)
    License(chain, addresses.license, admin).begin_default_admin_transfer(timelock)
    if addresses.disputes is not None:  # bond, windows, juror cap: governed too
        _disputes(chain, addresses.disputes, admin).begin_default_admin_transfer(timelock)
    gov = GovernanceAddresses(
        chain_id=chain.chain_id,
        governor=governor,
        timelock=timelock,
        parameters=parameters,
        deployed_at_block=tl_tx.block_number,
    )
    if path is not None:
        gov.save(path)
    pending = [
        Staking(chain, addresses.staking).pending_default_admin()[1],
        Distributor(chain, addresses.distributor).pending_default_admin()[1],
        License(chain, addresses.license).pending_default_admin()[1],
    ]
    if addresses.disputes is not None:
        pending.append(_disputes(chain, addresses.disputes).pending_default_admin()[1])
    ready = max(pending)
    now = chain.timestamp()
    dev_now = chain.chain_id in DEV_CHAIN_IDS and ready <= now + 1  # a 0-second admin delay
    if ready < now or dev_now:
        if ready >= now:  # the accept must land in a later second than the transfer began
            chain.advance_time(ready - now + 1)
        finish_handover(chain, addresses, gov, admin, timelock_delay=settings.timelock_delay)
    return gov


def _disputes(chain: Chain, address: str, sender: Signer | None = None) -> Any:
    from .disputes import Disputes

    return Disputes(chain, address, sender)


def finish_handover(
    chain: Chain,
    addresses: Addresses,
    gov: GovernanceAddresses,
    admin: Signer,
    *,
    timelock_delay: int,
) -> Tx:
    """Timelock accepts the admin role of Staking, the distributor, the licence (and
    Disputes) and takes its real delay; the deployer then gives up its temporary proposer,
    canceller and timelock-admin roles, and minting licences (`minter_action`)."""
    tl = Timelock(chain, gov.timelock, admin)
    staking = Staking(chain, addresses.staking)
    distributor = Distributor(chain, addresses.distributor)
    lic = License(chain, addresses.license, admin)
    targets = [staking.address, distributor.address, lic.address]
    calldatas = [
        _calldata(staking, "acceptDefaultAdminTransfer"),
        _calldata(distributor, "acceptDefaultAdminTransfer"),
        _calldata(lic, "acceptDefaultAdminTransfer"),
    ]
    if addresses.disputes is not None:
        disputes = _disputes(chain, addresses.disputes)
        targets.append(disputes.address)
        calldatas.append(_calldata(disputes, "acceptDefaultAdminTransfer"))
    targets.append(tl.address)
    calldatas.append(_calldata(tl, "updateDelay", timelock_delay))
    args = (targets, [0] * len(targets), calldatas, bytes(32), bytes(32))
    tl._send("scheduleBatch", *args, 0)
    done = tl._send("executeBatch", *args)
    admin_addr = chain.address_of(admin)
    for role in ("PROPOSER_ROLE", "CANCELLER_ROLE"):
        tl._send("renounceRole", tl._role(role), admin_addr)
    tl._send("renounceRole", tl._role("DEFAULT_ADMIN_ROLE"), admin_addr)
    if lic.has_role("MINTER_ROLE", admin_addr):
        lic._send("renounceRole", lic._role("MINTER_ROLE"), admin_addr)
    return done
