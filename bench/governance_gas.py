"""Governance gas: staking with vote checkpoints, and a proposal's propose/vote/queue/execute.

On the embedded EVM (py-evm, Cancun: the same gas as anvil). Staking figures: a first stake
by a fresh account (it self-delegates: one delegation slot and two checkpoints), a later
stake (new checkpoints at a later timestamp), an unstake request, a delegation to another
account. The "before" column is Staking without vote checkpoints (measured once, when they
were added, on the same sequence and compiler settings; that contract is gone). Governance: one
take-rate proposal (one call) through its whole life; ``castVote`` median of 3 voters.
Run: ``.venv/bin/python -m bench governance``.
"""

from __future__ import annotations

import statistics

SOGNI = 10**18
BEFORE = {"stake (first)": 106_527, "stake (again)": 55_227, "requestUnstake": 100_805}
"""Staking.sol with its `Votes` lines removed, same sequence and compiler settings."""


def measure() -> dict[str, int]:
    from sogni_chain import Deployment, connect, deploy_all
    from sogni_chain.governance import (
        DEV_SETTINGS,
        Governor,
        StakingVotes,
        deploy_governance,
        parameter_actions,
    )

    chain = connect()
    a = chain.accounts
    treasury, stakers, other = a[0], a[3:6], a[6]
    addrs = deploy_all(chain, treasury, coordinator=a[1])
    d = Deployment(chain, addrs, sender=treasury)
    out: dict[str, int] = {}
    for i, s in enumerate(stakers):
        d.token.transfer(s, 300_000 * SOGNI)
        d.token.approve(addrs.staking, 300_000 * SOGNI, sender=s)
        first = d.staking.stake(100_000 * SOGNI, sender=s)
        chain.advance_time(10)
        again = d.staking.stake(100_000 * SOGNI, sender=s)
        if i == 0:
            out["stake (first)"] = first.gas_used
            out["stake (again)"] = again.gas_used
    chain.advance_time(10)
    out["requestUnstake"] = d.staking.request_unstake(50_000 * SOGNI, sender=stakers[0]).gas_used
    out["delegate"] = StakingVotes(chain, addrs.staking).delegate(other, sender=stakers[0]).gas_used
    gov = deploy_governance(chain, addrs, treasury)
    chain.advance_time(5)
    g = Governor(chain, gov.governor, treasury)
    actions = parameter_actions(chain, addrs, gov, take_rates_bps=[2000, 1500, 1000, 500])
    ptx = g._send(
        "propose",
        [x.target for x in actions],
        [x.value for x in actions],
        [x.calldata for x in actions],
        "take rates",
        sender=stakers[1],
    )
    out["propose"] = ptx.gas_used
    pid = int(ptx.event("ProposalCreated")["proposalId"])
    chain.advance_time(DEV_SETTINGS.voting_delay + 2)
    votes = [g.cast_vote(pid, "for", sender=s).gas_used for s in stakers[1:]]
    votes.append(g.cast_vote(pid, "against", sender=other).gas_used)
    out["castVote"] = int(statistics.median(votes))
    chain.advance_time(DEV_SETTINGS.voting_period + 2)
    p = g.proposal(pid)
    out["queue"] = g.queue(p).gas_used
    chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    out["execute"] = g.execute(g.proposal(pid)).gas_used
    return out


def run(quick: bool = False) -> str:
    """Measure and return the markdown section (gas is deterministic: one run)."""
    del quick
    m = measure()
    staking_rows = "\n".join(
        f"| `{k}` | {BEFORE[k]:,} | {m[k]:,} | +{m[k] - BEFORE[k]:,} |" for k in BEFORE
    )
    gov_rows = "\n".join(
        f"| `{k}` | {m[k]:,} |" for k in ("delegate", "propose", "castVote", "queue", "execute")
    )
    return f"""## Governance gas

Embedded EVM (Cancun rules, same as anvil). `python -m bench governance`. Staking with vote
checkpoints (OZ `Votes`, timestamp clock) against the same calls before checkpoints; a first
stake also self-delegates. Vote checkpoints live in Staking, not on the token, so claims and
transfers pay nothing for governance.

| call | before | with checkpoints | cost of votes |
|---|---|---|---|
{staking_rows}

A take-rate proposal (one call to NetworkParameters) through its life; `castVote` is the
median of 3 voters; `execute` runs through the timelock.

| call | gas |
|---|---|
{gov_rows}
"""
