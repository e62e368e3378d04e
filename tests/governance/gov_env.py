"""Helpers for the governance tests: a deployed, governed embedded chain and its cast."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from sogni_chain import Chain, Deployment, deploy_all
from sogni_chain.governance import (
    DEV_SETTINGS,
    GovernanceAddresses,
    Governor,
    NetworkParameters,
    Proposal,
    StakingVotes,
    deploy_governance,
    parameter_actions,
)

SOGNI = 10**18
STAKE = 100_000 * SOGNI


@dataclass
class GovNet:
    chain: Chain
    d: Deployment
    gov: GovernanceAddresses
    treasury: LocalAccount  # deployer; gives up its admin roles to the timelock
    settler: LocalAccount  # SETTLEMENT_ROLE
    stakers: list[LocalAccount]  # each holds STAKE of active stake, self-delegated
    outsider: LocalAccount  # holds SOGNI, stakes nothing
    slasher: LocalAccount  # SLASHER_ROLE on staking

    @property
    def governor(self) -> Governor:
        return Governor(self.chain, self.gov.governor, self.outsider)

    @property
    def params(self) -> NetworkParameters:
        return NetworkParameters(self.chain, self.gov.parameters, self.outsider)

    @property
    def votes(self) -> StakingVotes:
        return StakingVotes(self.chain, self.d.addresses.staking, self.outsider)

    def propose_take_rates(self, rates: list[int], proposer: LocalAccount | None = None) -> int:
        actions = parameter_actions(self.chain, self.d.addresses, self.gov, take_rates_bps=rates)
        who = proposer if proposer is not None else self.stakers[0]
        return self.governor.propose(actions, f"take rates {rates}", sender=who)

    def to_voting(self) -> None:
        self.chain.advance_time(DEV_SETTINGS.voting_delay + 2)

    def to_end_of_vote(self) -> None:
        self.chain.advance_time(DEV_SETTINGS.voting_period + 2)

    def pass_and_queue(self, pid: int) -> Proposal:
        """Vote ``for`` with every staker, close the vote, queue; returns the queued proposal."""
        self.to_voting()
        for s in self.stakers:
            self.governor.cast_vote(pid, "for", sender=s)
        self.to_end_of_vote()
        self.governor.queue(self.governor.proposal(pid))
        return self.governor.proposal(pid)


def make_gov_net(chain: Chain) -> GovNet:
    accts = chain.accounts
    treasury, settler, outsider, slasher = accts[0], accts[1], accts[2], accts[6]
    stakers = accts[3:6]
    addresses = deploy_all(
        chain, treasury, coordinator=settler, slasher=slasher, distributor_funding=10**6 * SOGNI
    )
    d = Deployment(chain, addresses, sender=treasury)
    for s in [*stakers, outsider]:
        d.token.transfer(s, 2 * STAKE)
    for s in stakers:
        d.token.approve(addresses.staking, STAKE, sender=s)
        d.staking.stake(STAKE, sender=s)
    gov = deploy_governance(chain, addresses, treasury)
    chain.advance_time(2)  # the stakes are checkpointed before any proposal's snapshot
    return GovNet(chain, d, gov, treasury, settler, stakers, outsider, slasher)
