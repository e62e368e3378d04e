"""The whale defence: one juror's weight is capped at `jurorCapBps` (default 10 %) of all votes
at the case's snapshot, so a single large staker cannot outvote the other jurors alone; only
governance (the Disputes admin) moves the cap, within bounds."""

from __future__ import annotations

import pytest

from sogni_chain import ChainRevert
from sogni_chain.disputes import sign_refusal

from .dispute_env import SOGNI, STAKES, Env

CASE = bytes.fromhex("44" * 32)
WHALE = 2_000  # SOGNI staked by one juror: more than all the others together


def _whale_vs_small_jurors(env: Env) -> dict[str, int]:
    """The whale votes against the worker, j1 and j2 for; returns the resolved tally."""
    whale = env.gov  # holds the treasury's SOGNI: stakes like anyone else
    env.d.token.approve(env.d.addresses.staking, WHALE * SOGNI, sender=whale)
    env.d.staking.stake(WHALE * SOGNI, sender=whale)
    env.chain.advance_time(5)
    env.approve_bond()
    refusal = sign_refusal(
        env.reporter.key,
        chain_id=env.chain.chain_id,
        disputes=env.disputes.address,
        case_id=CASE,
        worker=env.worker.address,
        evidence_hash=b"\x01" * 32,
        refused_at=env.chain.timestamp(),
    )
    env.disputes.dispute_refusal(refusal, sender=env.worker)
    env.disputes.open_voting(CASE, b"\x02" * 32, "u", sender=env.reporter)
    votes = {whale: False, env.jurors[0]: True, env.jurors[1]: True}
    for who, side in votes.items():
        env.disputes.commit_vote(CASE, side, b"\x07" * 32, sender=who)
    env.chain.advance_time(env.disputes.params().commit_window)
    for who, side in votes.items():
        env.disputes.reveal_vote(CASE, side, b"\x07" * 32, sender=who)
    env.chain.advance_time(env.disputes.params().reveal_window)
    ev = env.disputes.resolve(CASE, sender=env.outsider).event("DisputeResolved")
    return {
        "for": int(ev["forWorker"]),
        "against": int(ev["againstWorker"]),
        "won": ev["workerWon"],
    }


def test_default_cap_stops_one_whale_deciding_alone(env: Env) -> None:
    env.disputes.set_juror_cap(1_000, sender=env.gov)  # the contract's default
    total = (sum(STAKES.values()) + WHALE) * SOGNI  # every vote at the snapshot: 3,600 SOGNI
    tally = _whale_vs_small_jurors(env)
    cap = total // 10
    assert tally == {"for": 500 * SOGNI, "against": cap, "won": True}
    snapshot = env.disputes.case(CASE).snapshot
    assert env.disputes.juror_weight(env.gov, snapshot) == cap
    assert env.disputes.juror_weight(env.jurors[2], snapshot) == 100 * SOGNI  # under it: as is


def test_without_the_cap_the_whale_decides(env: Env) -> None:
    env.disputes.set_juror_cap(10_000, sender=env.gov)
    tally = _whale_vs_small_jurors(env)
    assert tally == {"for": 500 * SOGNI, "against": WHALE * SOGNI, "won": False}


def test_only_governance_sets_the_cap_within_bounds(env: Env) -> None:
    d = env.disputes
    with pytest.raises(ChainRevert, match="AccessControlUnauthorizedAccount"):
        d.set_juror_cap(10_000, sender=env.jurors[0])
    for bad in (0, 10_001):
        with pytest.raises(ChainRevert, match="BadParameters"):
            d.set_juror_cap(bad, sender=env.gov)
    tx = d.set_juror_cap(2_500, sender=env.gov)
    assert tx.event("JurorCapSet")["jurorCapBps"] == 2_500 and d.juror_cap_bps() == 2_500
