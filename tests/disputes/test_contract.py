"""Disputes.sol on the embedded EVM: every path that moves a bond, a reward or a stake, and
the ways to cheat them (early slash, late dispute, double vote, wrong salt, no reveal)."""

from __future__ import annotations

import pytest

from sogni_chain import ChainRevert
from sogni_chain.disputes import CaseState, Refusal, refusal_digest, sign_refusal

from .dispute_env import SOGNI, Env

CASE = bytes.fromhex("11" * 32)
EVIDENCE = bytes.fromhex("22" * 32)
BUNDLE = bytes.fromhex("33" * 32)


def _refusal(env: Env, *, key: bytes | None = None, refused_at: int | None = None) -> Refusal:
    return sign_refusal(
        key if key is not None else env.reporter.key,
        chain_id=env.chain.chain_id,
        disputes=env.disputes.address,
        case_id=CASE,
        worker=env.worker.address,
        evidence_hash=EVIDENCE,
        refused_at=env.chain.timestamp() if refused_at is None else refused_at,
    )


def _open_refusal_vote(env: Env) -> None:
    env.approve_bond()
    env.disputes.dispute_refusal(_refusal(env), sender=env.worker)
    env.disputes.open_voting(CASE, BUNDLE, "file:///bundle.json", sender=env.reporter)


def _vote(env: Env, votes: dict[int, bool], reveal: set[int] | None = None) -> dict[int, bytes]:
    """Jurors by index commit `votes`; those in `reveal` (default all) reveal after commitEnd."""
    salts = {i: bytes([i + 1]) * 32 for i in votes}
    for i, v in votes.items():
        env.disputes.commit_vote(CASE, v, salts[i], sender=env.jurors[i])
    env.chain.advance_time(env.disputes.params().commit_window)
    for i, v in votes.items():
        if reveal is None or i in reveal:
            env.disputes.reveal_vote(CASE, v, salts[i], sender=env.jurors[i])
    return salts


def test_digest_matches_contract(env: Env) -> None:
    ts = env.chain.timestamp()
    ours = refusal_digest(
        env.chain.chain_id, env.disputes.address, CASE, env.worker.address, EVIDENCE, ts
    )
    assert ours == env.disputes.refusal_digest(CASE, env.worker.address, EVIDENCE, ts)


def test_honest_worker_wins_bond_back(env: Env) -> None:
    token, bond = env.d.token, env.disputes.params().bond
    before = token.balance_of(env.worker.address)
    _open_refusal_vote(env)
    assert token.balance_of(env.worker.address) == before - bond
    _vote(env, {0: True, 1: False, 2: True})  # 300 + 100 for, 200 against
    env.chain.advance_time(env.disputes.params().reveal_window)
    tx = env.disputes.resolve(CASE, sender=env.outsider)
    ev = tx.event("DisputeResolved")
    assert ev["workerWon"] and ev["forWorker"] == 400 * SOGNI and ev["againstWorker"] == 200 * SOGNI
    assert token.balance_of(env.worker.address) == before
    assert env.disputes.case(CASE).state is CaseState.WORKER_WON
    for j in env.jurors:  # nobody is paid from a returned bond
        assert env.disputes.reward_of(CASE, j.address) == 0
    with pytest.raises(ChainRevert):
        env.disputes.claim_reward(CASE, sender=env.jurors[1])


def test_cheater_loses_bond_to_majority_and_treasury(env: Env) -> None:
    token, p = env.d.token, env.disputes.params()
    _open_refusal_vote(env)
    treasury_before = token.balance_of(env.treasury.address)
    j = [token.balance_of(x.address) for x in env.jurors]
    _vote(env, {0: False, 1: False, 2: True})  # 500 against, 100 for
    env.chain.advance_time(p.reveal_window)
    env.disputes.resolve(CASE, sender=env.outsider)
    pool = p.bond * p.juror_share_bps // 10_000
    assert token.balance_of(env.treasury.address) == treasury_before + p.bond - pool
    got0 = env.disputes.claim_reward(CASE, sender=env.jurors[0]).event("RewardClaimed")["amount"]
    got1 = env.disputes.claim_reward(CASE, sender=env.jurors[1]).event("RewardClaimed")["amount"]
    assert (got0, got1) == (pool * 300 // 500, pool * 200 // 500)
    assert token.balance_of(env.jurors[0].address) == j[0] + got0
    # the minority juror and a second claim get nothing
    for who in (env.jurors[2], env.jurors[0]):
        with pytest.raises(ChainRevert, match="NoReward"):
            env.disputes.claim_reward(CASE, sender=who)
    assert token.balance_of(env.jurors[2].address) == j[2]


def test_unrevealed_vote_not_counted_nor_rewarded(env: Env) -> None:
    p = env.disputes.params()
    _open_refusal_vote(env)
    # j1 (300) would swing it for the worker but never reveals
    _vote(env, {0: True, 1: False}, reveal={1})
    env.chain.advance_time(p.reveal_window)
    with pytest.raises(ChainRevert, match="NotRevealTime"):
        env.disputes.reveal_vote(CASE, True, bytes([1]) * 32, sender=env.jurors[0])
    ev = env.disputes.resolve(CASE).event("DisputeResolved")
    assert not ev["workerWon"] and ev["forWorker"] == 0 and ev["againstWorker"] == 200 * SOGNI
    assert env.disputes.reward_of(CASE, env.jurors[0].address) == 0
    assert (
        env.disputes.reward_of(CASE, env.jurors[1].address) == p.bond * p.juror_share_bps // 10_000
    )


def test_double_vote_wrong_salt_and_outsiders(env: Env) -> None:
    _open_refusal_vote(env)
    d, j0 = env.disputes, env.jurors[0]
    d.commit_vote(CASE, True, b"\x01" * 32, sender=j0)
    with pytest.raises(ChainRevert, match="AlreadyCommitted"):
        d.commit_vote(CASE, False, b"\x02" * 32, sender=j0)
    with pytest.raises(ChainRevert, match="NotAStaker"):
        d.commit_vote(CASE, True, b"\x01" * 32, sender=env.outsider)
    with pytest.raises(ChainRevert, match="WorkerCannotVote"):
        d.commit_vote(CASE, True, b"\x01" * 32, sender=env.worker)
    with pytest.raises(ChainRevert, match="NotRevealTime"):  # no reveal during the commit phase
        d.reveal_vote(CASE, True, b"\x01" * 32, sender=j0)
    env.chain.advance_time(d.params().commit_window)
    with pytest.raises(ChainRevert, match="CommitClosed"):
        d.commit_vote(CASE, True, b"\x01" * 32, sender=env.jurors[1])
    with pytest.raises(ChainRevert, match="BadReveal"):
        d.reveal_vote(CASE, True, b"\x02" * 32, sender=j0)
    with pytest.raises(ChainRevert, match="BadReveal"):  # the other vote with the same salt
        d.reveal_vote(CASE, False, b"\x01" * 32, sender=j0)
    with pytest.raises(ChainRevert, match="NothingToReveal"):
        d.reveal_vote(CASE, True, b"\x01" * 32, sender=env.jurors[1])
    d.reveal_vote(CASE, True, b"\x01" * 32, sender=j0)
    with pytest.raises(ChainRevert, match="NothingToReveal"):
        d.reveal_vote(CASE, True, b"\x01" * 32, sender=j0)


def test_stake_after_snapshot_does_not_vote(env: Env) -> None:
    _open_refusal_vote(env)
    env.d.token.approve(env.d.staking.address, 50 * SOGNI, sender=env.outsider)
    env.d.staking.stake(50 * SOGNI, sender=env.outsider)
    env.chain.advance_time(5)
    with pytest.raises(ChainRevert, match="NotAStaker"):
        env.disputes.commit_vote(CASE, True, b"\x01" * 32, sender=env.outsider)


def test_refusal_dispute_window_and_forgeries(env: Env) -> None:
    d, p = env.disputes, env.disputes.params()
    env.approve_bond()
    old = _refusal(env, refused_at=env.chain.timestamp() - p.dispute_window - 1)
    with pytest.raises(ChainRevert, match="WindowClosed"):
        d.dispute_refusal(old, sender=env.worker)
    forged = _refusal(env, key=env.outsider.key)  # not a reporter
    with pytest.raises(ChainRevert, match="NotReporter"):
        d.dispute_refusal(forged, sender=env.worker)
    edited = Refusal(CASE, env.worker.address, BUNDLE, forged.refused_at, _refusal(env).signature)
    with pytest.raises(ChainRevert, match="NotReporter"):  # another evidence hash
        d.dispute_refusal(edited, sender=env.worker)
    with pytest.raises(ChainRevert, match="NotYourCase"):
        d.dispute_refusal(_refusal(env), sender=env.outsider)
    good = _refusal(env)
    d.dispute_refusal(good, sender=env.worker)
    env.approve_bond()
    with pytest.raises(ChainRevert, match="CaseExists"):
        d.dispute_refusal(good, sender=env.worker)


def test_evidence_deadline_then_anyone_opens_on_original(env: Env) -> None:
    d = env.disputes
    env.approve_bond()
    d.dispute_refusal(_refusal(env), sender=env.worker)
    with pytest.raises(ChainRevert, match="EvidencePending"):
        d.open_voting(CASE, BUNDLE, "x", sender=env.outsider)
    env.chain.advance_time(d.params().evidence_window)
    d.open_voting(CASE, BUNDLE, "x", sender=env.outsider)
    assert d.case(CASE).bundle_hash == EVIDENCE  # not the outsider's bundle


def _propose(env: Env, amount: int = 400 * SOGNI) -> bytes:
    tx = env.disputes.propose_slash(
        env.worker.address, amount, "sogni: 5 failed result checks", EVIDENCE, sender=env.settlement
    )
    return bytes(tx.event("SlashProposed")["caseId"])


def test_slash_waits_for_window_then_executes(env: Env) -> None:
    d, staking = env.disputes, env.d.staking
    with pytest.raises(ChainRevert, match="AccessControl"):
        d.propose_slash(env.worker.address, SOGNI, "x", sender=env.outsider)
    case = _propose(env)
    with pytest.raises(ChainRevert, match="WindowOpen"):
        d.execute_slash(case, sender=env.outsider)
    assert staking.active_stake(env.worker.address) == 1_000 * SOGNI
    env.chain.advance_time(d.params().dispute_window)
    env.approve_bond()
    with pytest.raises(ChainRevert, match="WindowClosed"):  # too late to dispute
        d.dispute_slash(case, sender=env.worker)
    before = env.d.token.balance_of(env.treasury.address)
    assert (
        d.execute_slash(case, sender=env.outsider).event("SlashExecuted")["slashed"] == 400 * SOGNI
    )
    assert staking.active_stake(env.worker.address) == 600 * SOGNI
    assert env.d.token.balance_of(env.treasury.address) == before + 400 * SOGNI
    with pytest.raises(ChainRevert, match="WrongState"):
        d.execute_slash(case, sender=env.outsider)


def test_lost_slash_dispute_executes_won_one_never(env: Env) -> None:
    d, p = env.disputes, env.disputes.params()
    lost, won = _propose(env, 100 * SOGNI), _propose(env, 200 * SOGNI)
    for case, for_worker in ((lost, False), (won, True)):
        env.approve_bond()
        d.dispute_slash(case, sender=env.worker)
        with pytest.raises(ChainRevert, match="WrongState"):  # disputed: not before the vote
            d.execute_slash(case)
        d.open_voting(case, BUNDLE, "u", sender=env.reporter)
        d.commit_vote(case, for_worker, b"\x05" * 32, sender=env.jurors[0])
    env.chain.advance_time(p.commit_window)
    for case, for_worker in ((lost, False), (won, True)):
        d.reveal_vote(case, for_worker, b"\x05" * 32, sender=env.jurors[0])
    env.chain.advance_time(p.reveal_window)
    for case in (lost, won):
        d.resolve(case)
    d.execute_slash(lost)
    assert env.d.staking.active_stake(env.worker.address) == 900 * SOGNI
    assert d.reward_of(lost, env.jurors[0].address) == p.bond * p.juror_share_bps // 10_000
    with pytest.raises(ChainRevert, match="WrongState"):
        d.execute_slash(won)
    assert env.d.staking.active_stake(env.worker.address) == 900 * SOGNI


def test_an_old_slash_case_never_takes_stake_put_up_after_its_freeze(env: Env) -> None:
    """An undisputed slash left unexecuted could be executed by anyone at any later time:
    the worker's freeze ran out, it withdrew, staked again months later, and the old case
    took the new stake. A case now executes only until the freeze it set ends
    (`executeBy`); after a lost vote opened late (by `voteBy`), until its reveal end +
    EXECUTE_GRACE."""
    d, p = env.disputes, env.disputes.params()
    case = _propose(env, 400 * SOGNI)
    execute_by = d.case(case).execute_by
    assert execute_by == env.d.staking.frozen_until(env.worker.address)
    env.chain.advance_time(execute_by - env.chain.timestamp())
    with pytest.raises(ChainRevert, match="SlashExpired"):
        d.execute_slash(case, sender=env.outsider)
    assert env.d.staking.active_stake(env.worker.address) == 1_000 * SOGNI

    late = _propose(env, 100 * SOGNI)  # disputed; nobody opens the vote until the last second
    env.approve_bond()
    d.dispute_slash(late, sender=env.worker)
    env.chain.advance_time(d.case(late).vote_by - 2 - env.chain.timestamp())
    d.open_voting(late, BUNDLE, "u", sender=env.outsider)
    # the vote opened late: the stake stays frozen until the slash can no longer execute
    execute_grace = 7 * 86400  # Disputes.EXECUTE_GRACE
    frozen = env.d.staking.frozen_until(env.worker.address)
    assert frozen >= d.case(late).reveal_end + execute_grace
    d.commit_vote(late, False, b"\x05" * 32, sender=env.jurors[0])
    env.chain.advance_time(p.commit_window)
    d.reveal_vote(late, False, b"\x05" * 32, sender=env.jurors[0])
    env.chain.advance_time(p.reveal_window)
    d.resolve(late)
    assert d.execute_slash(late).event("SlashExecuted")["slashed"] == 100 * SOGNI


def test_resolve_not_before_reveal_end(env: Env) -> None:
    _open_refusal_vote(env)
    with pytest.raises(ChainRevert, match="VotingNotOver"):
        env.disputes.resolve(CASE)


def test_a_worker_cannot_outrun_a_proposed_slash_by_unstaking(env: Env) -> None:
    """The worker unstakes everything right after cheating; the slash is proposed and
    disputed slowly. Withdrawal waited only for the unstake cooldown, so the worker left
    with its stake and `executeSlash` found nothing. A proposed slash now freezes
    withdrawals for the case's whole course (`Staking.freeze`), and the slash takes the
    pending bucket."""
    d, staking, p = env.disputes, env.d.staking, env.disputes.params()
    staking.request_unstake(1_000 * SOGNI, sender=env.worker)
    case = _propose(env, 400 * SOGNI)
    frozen = staking.frozen_until(env.worker.address)
    last_window = p.dispute_window + p.evidence_window + p.commit_window + p.reveal_window
    assert frozen >= env.chain.timestamp() + last_window
    env.chain.advance_time(staking.cooldown())  # the cooldown alone has passed
    with pytest.raises(ChainRevert, match="StakeFrozen"):
        staking.withdraw(sender=env.worker)
    env.chain.advance_time(p.dispute_window)
    assert d.execute_slash(case).event("SlashExecuted")["slashed"] == 400 * SOGNI
    with pytest.raises(ChainRevert, match="StakeFrozen"):  # the freeze runs its course
        staking.withdraw(sender=env.worker)
    env.chain.advance_time(frozen - env.chain.timestamp() + 1)
    staking.withdraw(sender=env.worker)  # what is left after the slash
    assert staking.pending_stake(env.worker.address)[0] == 0
    with pytest.raises(ChainRevert, match="NotSlasher"):  # nobody else freezes anyone
        staking.freeze(env.worker.address, 2**63, sender=env.outsider)


def test_a_shorter_cooldown_never_pulls_an_unlock_time_in(env: Env) -> None:
    """A bucket unlocking at t keeps t when governance shortens the cooldown and its owner
    adds 1 wei: the new request restarts the cooldown for all of it, never earlier."""
    staking = env.d.staking
    staking.request_unstake(500 * SOGNI, sender=env.worker)
    _, unlock = staking.pending_stake(env.worker.address)
    staking.set_cooldown(24 * 3600, sender=env.treasury)
    staking.request_unstake(1, sender=env.worker)
    assert staking.pending_stake(env.worker.address)[1] == unlock


def test_the_worker_cannot_judge_its_own_case_through_a_delegate(env: Env) -> None:
    """The worker delegates its stake's votes to an ally before disputing: the ally's weight
    at the snapshot carries the worker's stake, so it may not commit a vote on the worker's
    case (before, only the worker's own address was refused). The jury is fixed when the
    dispute opens: delegating again afterwards moves no weight and frees no one."""
    from sogni_chain.governance import StakingVotes

    d = env.disputes
    case = _propose(env, 100 * SOGNI)
    ally, other = env.jurors[0], env.jurors[1]
    votes = StakingVotes(env.chain, env.d.staking.address)
    votes.delegate(ally.address, sender=env.worker)
    env.chain.advance_time(2)  # the delegation lies before the snapshot
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    assert d.case(case).worker_delegate == ally.address
    votes.delegate(other.address, sender=env.worker)  # after the dispute opened
    env.chain.advance_time(2)
    d.open_voting(case, BUNDLE, "u", sender=env.reporter)
    with pytest.raises(ChainRevert, match="WorkerCannotVote"):
        d.commit_vote(case, True, b"\x05" * 32, sender=ally)
    tx = d.commit_vote(case, True, b"\x06" * 32, sender=other)  # any other staker may,
    assert tx.event("VoteCommitted")["weight"] == 200 * SOGNI  # with its own stake only
