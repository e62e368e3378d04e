"""`sogni gov`: stakers propose, vote on, queue and execute changes to the network parameters.

Why checks before sending: the contracts refuse a bad call anyway, but with a revert name
(``GovernorUnexpectedProposalState``); each verb here first reads the proposal and says in one
line what is wrong and when it will be possible (voting not open yet, closed, too early to
execute). :class:`GovClient` holds the logic so tests drive it on the embedded chain; the
typer commands only connect and print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_app.chain_cli_common import SOGNI_WEI, format_sogni, format_when, keystore_signer
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable
from sogni_protocol.settings import READ_ONLY_SENDER

if TYPE_CHECKING:  # web3 loads only when a command runs: `sogni --help` stays light
    from sogni_chain import Chain, Signer
    from sogni_chain.governance import (
        GovernanceAddresses,
        Governor,
        Proposal,
        StakingVotes,
    )
    from sogni_wallet.addresses import Addresses

__all__ = ["GovClient", "gov_app", "parse_take_rates", "parse_tier_minimums"]

VOTE_SUPPORT = ("for", "against", "abstain")

gov_app = typer.Typer(
    help="Governance: stakers vote on the network's economic parameters.",
    no_args_is_help=True,
)

RpcOpt = Annotated[
    str, typer.Option("--rpc", envvar="SOGNI_CHAIN_URL", help="JSON-RPC url of the chain.")
]
AddressesOpt = Annotated[
    Path,
    typer.Option(
        "--addresses",
        envvar="SOGNI_ADDRESSES",
        help="Addresses file (governance is read from <name>.governance.json beside it).",
    ),
]
KeystoreOpt = Annotated[
    Path,
    typer.Option("--keystore", envvar="SOGNI_KEYSTORE", help="Staker wallet: a keystore v3 file."),
]
PasswordEnvOpt = Annotated[
    str,
    typer.Option("--password-env", help="Env var holding the keystore password (else a prompt)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DEFAULT_RPC = "http://127.0.0.1:8545"
DEFAULT_ADDRESSES = Path(".cache/addresses.json")
DEFAULT_KEYSTORE = Path("~/.sogni/client/payer.json")


def parse_take_rates(text: str) -> list[int]:
    """``"2000,1500,1000,500"`` -> bps per stake tier (tier 0 first)."""
    try:
        rates = [int(part) for part in text.split(",")]
    except ValueError:
        raise BadUsage(f"--take-rates must be comma-separated whole bps, not {text!r}") from None
    if not rates or any(not 0 <= r <= 10_000 for r in rates):
        raise BadUsage(f"--take-rates must each be 0..10000 bps, not {text!r}")
    return rates


def parse_tier_minimums(items: list[str]) -> dict[int, int]:
    """``["1:1000", "2:10000"]`` -> {tier: whole SOGNI}."""
    out: dict[int, int] = {}
    for item in items:
        tier, sep, amount = item.partition(":")
        if not sep or not tier.isdigit() or not amount.isdigit() or int(tier) > 255:
            raise BadUsage(f"--tier-minimum must be TIER:SOGNI (e.g. 1:1000), not {item!r}")
        out[int(tier)] = int(amount)
    return out


@dataclass
class GovClient:
    """One chain's governance, seen by one account."""

    chain: Chain
    addresses: Addresses
    gov: GovernanceAddresses
    account: Signer | None = None

    @property
    def governor(self) -> Governor:
        from sogni_chain.governance import Governor

        return Governor(self.chain, self.gov.governor, self._sender)

    @property
    def votes(self) -> StakingVotes:
        from sogni_chain.governance import StakingVotes

        return StakingVotes(self.chain, self.addresses.staking, self._sender)

    @property
    def _sender(self) -> Signer:
        """The wrappers' default sender: the account, else nobody (reads only)."""
        return READ_ONLY_SENDER if self.account is None else self.account

    def _me(self) -> Signer:
        if self.account is None:
            raise BadUsage("this command signs: give --keystore")
        return self.account

    def find(self, ident: str) -> Proposal:
        """A proposal by its id, or by a unique prefix of at least 4 digits."""
        if not ident.isdigit():
            raise BadUsage(f"a proposal id is a number, not {ident!r}")
        found = self.governor.proposals(self.gov.deployed_at_block)
        exact = [p for p in found if str(p.proposal_id) == ident]
        matches = exact or (
            [p for p in found if str(p.proposal_id).startswith(ident)] if len(ident) >= 4 else []
        )
        if not matches:
            raise BadUsage(f"no proposal {ident} (see `sogni gov list`)")
        if len(matches) > 1:
            raise BadUsage(f"proposal id prefix {ident} is ambiguous: give more digits")
        return matches[0]

    def propose(self, description: str, **changes: Any) -> Proposal:
        me = self._me()
        if not description.strip():
            raise BadUsage("--description must say what the proposal does and why")
        from sogni_chain.governance import parameter_actions

        try:
            actions = parameter_actions(self.chain, self.addresses, self.gov, **changes)
        except ValueError as exc:  # e.g. a juror cap without a Disputes contract
            raise BadUsage(str(exc)) from None
        if not actions:
            raise BadUsage("nothing to propose: give at least one parameter to change")
        needed = self.governor.proposal_threshold()
        have = self.votes.get_past_votes(me, self.chain.timestamp() - 1)
        if have < needed:
            raise Refused(
                f"not enough votes to propose: {self.chain.address_of(me)} has "
                f"{format_sogni(have)} SOGNI of votes, proposing needs {format_sogni(needed)}",
                "stake SOGNI (votes count from the next second) or ask a delegate to propose",
            )
        pid = self.governor.propose(actions, description, sender=me)
        return self.governor.proposal(pid, self.gov.deployed_at_block)

    def vote(self, ident: str, support: str, reason: str = "") -> Proposal:
        me = self._me()
        if support not in VOTE_SUPPORT:
            raise BadUsage(f"vote must be for, against or abstain, not {support!r}")
        p = self.find(ident)
        if p.state == "Pending":
            raise Refused(
                f"voting on {ident} has not started: it opens after {format_when(p.vote_start)}"
            )
        if p.state != "Active":
            raise Refused(f"voting on {ident} is closed: the proposal is {p.state}")
        if self.governor.has_voted(p.proposal_id, me):
            raise Refused(f"{self.chain.address_of(me)} already voted on {ident}")
        weight = self.votes.get_past_votes(me, p.vote_start)
        if weight == 0:
            raise Refused(
                f"not a staker at this proposal's snapshot ({format_when(p.vote_start)}): "
                f"{self.chain.address_of(me)} has no votes on it",
                "stake (and delegate to yourself) before the next proposal opens",
            )
        self.governor.cast_vote(p.proposal_id, support, reason=reason, sender=me)
        return self.governor.proposal(p.proposal_id, self.gov.deployed_at_block)

    def queue(self, ident: str) -> Proposal:
        p = self.find(ident)
        if p.state in ("Pending", "Active"):
            raise Refused(f"cannot queue {ident} yet: voting ends at {format_when(p.vote_end)}")
        if p.state != "Succeeded":
            raise Refused(f"cannot queue {ident}: the proposal is {p.state}")
        self.governor.queue(p, sender=self._me())
        return self.governor.proposal(p.proposal_id, self.gov.deployed_at_block)

    def execute(self, ident: str) -> Proposal:
        p = self.find(ident)
        if p.state == "Succeeded":
            raise Refused(f"cannot execute {ident}: queue it first (`sogni gov queue {ident}`)")
        if p.state != "Queued":
            raise Refused(f"cannot execute {ident}: the proposal is {p.state}")
        now = self.chain.timestamp()
        if now < p.eta:
            raise Refused(
                f"too early to execute {ident}: the timelock opens at {format_when(p.eta)} "
                f"(in {p.eta - now} s)"
            )
        self.governor.execute(p, sender=self._me())
        return self.governor.proposal(p.proposal_id, self.gov.deployed_at_block)

    def parameters(self) -> dict[str, Any]:
        from sogni_chain.contracts import Distributor
        from sogni_chain.governance import NetworkParameters, Timelock

        snap = NetworkParameters(self.chain, self.gov.parameters).snapshot()
        g = self.governor
        d = Distributor(self.chain, self.addresses.distributor)
        return {
            "version": snap.version,
            "take_rates_bps": snap.take_rates_bps,
            "emission_budget_sogni": snap.emission_budget_sogni,
            "verification_rate_bps": snap.verification_rate_bps,
            "unstake_cooldown_s": self.votes.cooldown(),
            "claim_delay_s": d.claim_delay(),
            "voting_delay_s": int(g._call("votingDelay")),
            "voting_period_s": int(g._call("votingPeriod")),
            "timelock_delay_s": Timelock(self.chain, self.gov.timelock).min_delay(),
            "proposal_threshold_sogni": g.proposal_threshold() / SOGNI_WEI,
        }


def proposal_dict(p: Proposal) -> dict[str, Any]:
    return {
        "id": str(p.proposal_id),
        "state": p.state,
        "description": p.description,
        "proposer": p.proposer,
        "votes": {
            "for": str(p.votes_for),
            "against": str(p.votes_against),
            "abstain": str(p.votes_abstain),
        },
        "vote_start": p.vote_start,
        "vote_end": p.vote_end,
        "eta": p.eta,
    }


def format_proposal(p: Proposal, *, long: bool = False) -> str:
    """One readable block (``long``) or one line for a proposal."""
    votes = (
        f"for {format_sogni(p.votes_for)} / against {format_sogni(p.votes_against)} / "
        f"abstain {format_sogni(p.votes_abstain)}"
    )
    if p.state == "Queued":
        when = f"eta {format_when(p.eta)}"
    elif p.state in ("Pending", "Active"):
        when = f"voting {format_when(p.vote_start)} .. {format_when(p.vote_end)}"
    else:
        when = f"vote ended {format_when(p.vote_end)}"
    short = str(p.proposal_id)[:12]
    if not long:
        return f"{short}  {p.state:<9} {votes}  {when}  {p.description.splitlines()[0][:60]}"
    return "\n".join(
        [
            f"proposal {p.proposal_id}",
            f"  state     {p.state}",
            f"  proposer  {p.proposer}",
            f"  votes     {votes} SOGNI",
            f"  voting    {format_when(p.vote_start)} .. {format_when(p.vote_end)}",
            f"  eta       {format_when(p.eta) if p.eta else '-'}",
            f"  calls     {len(p.targets)} ({', '.join(p.targets)})",
            f"  about     {p.description}",
        ]
    )


def _client(rpc: str, addresses_path: Path, keystore: Path | None, password_env: str) -> GovClient:
    from sogni_chain import connect
    from sogni_chain.governance import GovernanceAddresses, governance_path
    from sogni_wallet.addresses import Addresses

    try:
        chain = connect(rpc, keys=[])  # the keystore's key only (never anvil's dev keys)
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    addresses = Addresses.load(addresses_path, chain_id=chain.chain_id)
    try:
        gov = GovernanceAddresses.load(governance_path(addresses_path), chain_id=chain.chain_id)
    except ValueError as exc:
        raise Unavailable(str(exc), "deploy it: python -m sogni_chain deploy --governed") from None
    account = keystore_signer(chain, keystore, password_env)
    return GovClient(chain, addresses, gov, account)


def _print(p: Proposal, as_json: bool) -> None:
    typer.echo(json.dumps(proposal_dict(p)) if as_json else format_proposal(p, long=True))


@gov_app.command("list")
def list_cmd(
    rpc: RpcOpt = DEFAULT_RPC, addresses: AddressesOpt = DEFAULT_ADDRESSES, as_json: JsonOpt = False
) -> None:
    """Every proposal: id, state, votes, when."""
    c = _client(rpc, addresses, None, "")
    found = c.governor.proposals(c.gov.deployed_at_block)
    if as_json:
        typer.echo(json.dumps([proposal_dict(p) for p in found]))
    elif not found:
        typer.echo("no proposals yet")
    for p in [] if as_json else found:
        typer.echo(format_proposal(p))


@gov_app.command("show")
def show_cmd(
    proposal: Annotated[
        str | None, typer.Argument(help="Proposal id (or prefix); none: the parameters.")
    ] = None,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    as_json: JsonOpt = False,
) -> None:
    """One proposal, or the governed parameters and the windows now."""
    c = _client(rpc, addresses, None, "")
    if proposal is not None:
        _print(c.find(proposal), as_json)
        return
    params = c.parameters()
    if as_json:
        typer.echo(json.dumps(params))
        return
    for key, value in params.items():
        shown = "unset (coordinators use their config)" if value is None else value
        typer.echo(f"{key:<26} {shown}")


@gov_app.command("propose")
def propose_cmd(
    description: Annotated[str, typer.Option("--description", help="What and why.")],
    take_rates: Annotated[
        str | None, typer.Option(help="Take rate bps per stake tier, e.g. 2000,1500,1000,500.")
    ] = None,
    emission: Annotated[
        int | None, typer.Option(min=0, help="Free emission budget, whole SOGNI per epoch.")
    ] = None,
    verification_rate: Annotated[
        int | None, typer.Option(min=0, max=10_000, help="Share of jobs re-checked, bps.")
    ] = None,
    cooldown: Annotated[int | None, typer.Option(min=0, help="Unstake cooldown, seconds.")] = None,
    claim_delay: Annotated[
        int | None, typer.Option(min=0, help="Distributor claim delay, seconds.")
    ] = None,
    growth_cap: Annotated[
        int | None, typer.Option(min=0, help="Distributor growth cap, whole SOGNI per root.")
    ] = None,
    tier_minimum: Annotated[
        list[str] | None, typer.Option(help="TIER:SOGNI stake minimum (repeatable).")
    ] = None,
    juror_cap: Annotated[
        int | None,
        typer.Option(min=1, max=10_000, help="Most weight one dispute juror carries, bps."),
    ] = None,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    as_json: JsonOpt = False,
) -> None:
    """Propose new parameter values (needs the proposal threshold in staked votes)."""
    changes = {
        "take_rates_bps": None if take_rates is None else parse_take_rates(take_rates),
        "emission_budget_sogni": emission,
        "verification_rate_bps": verification_rate,
        "unstake_cooldown": cooldown,
        "claim_delay": claim_delay,
        "max_total_growth_sogni": growth_cap,
        "tier_minimums_sogni": parse_tier_minimums(tier_minimum or []) or None,
        "juror_cap_bps": juror_cap,
    }
    c = _client(rpc, addresses, keystore, password_env)
    _print(c.propose(description, **changes), as_json)


@gov_app.command("vote")
def vote_cmd(
    proposal: Annotated[str, typer.Argument(help="Proposal id (or prefix).")],
    support: Annotated[str, typer.Argument(help="for, against or abstain.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on chain).")] = "",
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    as_json: JsonOpt = False,
) -> None:
    """Vote with your stake as it was when the vote opened."""
    if support not in VOTE_SUPPORT:
        raise BadUsage(f"vote must be for, against or abstain, not {support!r}")
    c = _client(rpc, addresses, keystore, password_env)
    _print(c.vote(proposal, support, reason), as_json)


@gov_app.command("queue")
def queue_cmd(
    proposal: Annotated[str, typer.Argument(help="Proposal id (or prefix).")],
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    as_json: JsonOpt = False,
) -> None:
    """Queue a passed proposal in the timelock (anyone may)."""
    c = _client(rpc, addresses, keystore, password_env)
    _print(c.queue(proposal), as_json)


@gov_app.command("execute")
def execute_cmd(
    proposal: Annotated[str, typer.Argument(help="Proposal id (or prefix).")],
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    as_json: JsonOpt = False,
) -> None:
    """Execute a queued proposal once its timelock delay is over (anyone may)."""
    c = _client(rpc, addresses, keystore, password_env)
    _print(c.execute(proposal), as_json)
