"""Dispute gas: opening a dispute, the commit-reveal vote, resolving, rewards and slashes.

On the embedded EVM (py-evm, Cancun: the same gas as anvil), against Staking with vote
checkpoints (a juror's weight is `getPastVotes` at the snapshot). Commit and reveal are the
median of 3 jurors; `resolve` is a lost dispute (the treasury's share is transferred);
`disputeRefusal` includes checking the coordinator's signature and pulling the bond (the
`approve` before it is separate). Run: ``.venv/bin/python -m bench disputes``.
"""

from __future__ import annotations

import statistics

SOGNI = 10**18


def measure() -> dict[str, int]:
    from sogni_chain import Deployment, connect, deploy_all
    from sogni_chain.disputes import DEV_DISPUTE_PARAMS, sign_refusal

    chain = connect()
    gov, coord, worker, *jurors = chain.accounts[:6]
    addrs = deploy_all(chain, gov, coordinator=coord, slasher=coord, disputes=DEV_DISPUTE_PARAMS)
    d = Deployment(chain, addrs, gov)
    disputes = d.disputes
    assert disputes is not None
    for who in (worker, *jurors):
        d.token.transfer(who.address, 1_000 * SOGNI)
        d.token.approve(addrs.staking, 500 * SOGNI, sender=who)
        d.staking.stake(500 * SOGNI, sender=who)
    chain.advance_time(10)
    out: dict[str, int] = {}
    case = b"\x42" * 32
    refusal = sign_refusal(
        coord.key,
        chain_id=chain.chain_id,
        disputes=disputes.address,
        case_id=case,
        worker=worker.address,
        evidence_hash=b"\x01" * 32,
        refused_at=chain.timestamp(),
    )
    out["approve (bond)"] = d.token.approve(
        disputes.address, DEV_DISPUTE_PARAMS.bond, sender=worker
    ).gas_used
    out["disputeRefusal"] = disputes.dispute_refusal(refusal, sender=worker).gas_used
    out["openVoting"] = disputes.open_voting(
        case, b"\x02" * 32, "file:///b.json", sender=coord
    ).gas_used
    salts = [bytes([i + 1]) * 32 for i in range(3)]
    commits = [
        disputes.commit_vote(case, False, s, sender=j).gas_used
        for s, j in zip(salts, jurors, strict=True)
    ]
    chain.advance_time(DEV_DISPUTE_PARAMS.commit_window)
    reveals = [
        disputes.reveal_vote(case, False, s, sender=j).gas_used
        for s, j in zip(salts, jurors, strict=True)
    ]
    out["commitVote"] = int(statistics.median(commits))
    out["revealVote"] = int(statistics.median(reveals))
    chain.advance_time(DEV_DISPUTE_PARAMS.reveal_window)
    out["resolve"] = disputes.resolve(case, sender=coord).gas_used
    out["claimReward"] = disputes.claim_reward(case, sender=jurors[0]).gas_used
    ptx = disputes.propose_slash(
        worker.address, 100 * SOGNI, "sogni: 5 failed result checks", sender=coord
    )
    out["proposeSlash"] = ptx.gas_used
    chain.advance_time(DEV_DISPUTE_PARAMS.dispute_window)
    out["executeSlash"] = disputes.execute_slash(
        bytes(ptx.event("SlashProposed")["caseId"]), sender=coord
    ).gas_used
    # a disputed slash nobody opens the vote of: upheld by `resolve` after its voteBy
    stalled = bytes(
        disputes.propose_slash(worker.address, 100 * SOGNI, "sogni: 5", sender=coord).event(
            "SlashProposed"
        )["caseId"]
    )
    d.token.approve(disputes.address, DEV_DISPUTE_PARAMS.bond, sender=worker)
    out["disputeSlash"] = disputes.dispute_slash(stalled, sender=worker).gas_used
    chain.advance_time(disputes.case(stalled).vote_by - chain.timestamp())
    out["resolve (no vote by voteBy)"] = disputes.resolve(stalled, sender=coord).gas_used
    return out


def run(quick: bool = False) -> str:
    del quick  # gas does not vary with batch size
    m = measure()
    rows = "\n".join(f"| `{k}` | {v:,} |" for k, v in m.items())
    return f"""## Dispute gas

Embedded EVM (Cancun rules, same as anvil). `python -m bench disputes`. A worker disputes a
signed refusal (coordinator signature checked on chain, bond pulled), the coordinator opens
the vote on the re-checked bundle, 3 stakers commit and reveal (median), `resolve` keeps the
bond (treasury share sent), a majority juror claims; a slash proposed and executed after its
window (`executeSlash` calls `Staking.slash`); a slash disputed (`disputeSlash`: the jury is
fixed then, from the votes of the second before, and the worker's delegate read with
`Staking.delegationOf`) whose vote nobody opened by its `voteBy`, upheld by `resolve`.
Since the jury is fixed when a dispute opens, its snapshot and barred delegate are written
by `disputeRefusal`/`disputeSlash` (about +54,000) and no longer by `openVoting` (about
-49,000); before: `disputeRefusal` 162,918, `openVoting` 115,523 (same bench, same machine).

| call | gas |
|---|---|
{rows}
"""


if __name__ == "__main__":
    print(run())
