"""Two ways a worker kept money it should lose, each tried here (docs/GOVERNANCE.md, "Disputes").

1. Dispute a proposed slash and wait: nothing opened the vote of a slash case (the
   coordinator's desk opened refusal votes only, and a worker never opens a vote it expects
   to lose), `executeSlash` refused a disputed case, and the freeze ran out. Now every dispute
   has a `voteBy`; after it, `resolve` upholds the case (bond to the treasury) and the slash
   executes; before it, the worker may open its own stalled vote.
2. Redelegate in the block of `openVoting`: the barred delegate was read at vote time and the
   snapshot was the second before, so the account that held the worker's stake at the
   snapshot was not barred and judged the worker's case with it. Now the snapshot and the
   barred delegate are fixed when the dispute opens, and a dispute in the second of a
   delegation change is refused (`DelegationJustChanged`).
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from sogni_chain import ChainRevert
from sogni_chain.disputes import CaseState, DisputeRefused, open_stalled_vote, sign_refusal
from sogni_chain.governance import StakingVotes

from .dispute_env import SOGNI, Env

EVIDENCE = bytes.fromhex("22" * 32)
BUNDLE = bytes.fromhex("33" * 32)


def _propose(env: Env, amount: int) -> bytes:
    tx = env.disputes.propose_slash(
        env.worker.address, amount, "sogni: 5 failed checks", EVIDENCE, sender=env.settlement
    )
    return bytes(tx.event("SlashProposed")["caseId"])


def _same_block(env: Env, calls: list[tuple[Any, LocalAccount]]) -> list[Any]:
    """Send `calls` (contract function, sender) in one block, in order; their receipts."""
    chain, tester = env.chain, env.chain._tester
    assert tester is not None  # the embedded chain
    tester.disable_auto_mine_transactions()
    try:
        hashes = []
        nonces: dict[str, int] = {}  # eth-tester's "pending" count ignores unmined ones
        for fn, who in calls:
            nonce = nonces.get(who.address, chain.w3.eth.get_transaction_count(who.address))
            nonces[who.address] = nonce + 1
            tx = fn.build_transaction({"from": who.address, "gas": 1_500_000, "nonce": nonce})
            signed = who.sign_transaction(tx)
            hashes.append(chain.w3.eth.send_raw_transaction(signed.raw_transaction))
        tester.mine_blocks()
    finally:
        tester.enable_auto_mine_transactions()
    receipts = [chain.w3.eth.get_transaction_receipt(h) for h in hashes]
    assert len({r["blockNumber"] for r in receipts}) == 1
    return receipts


def test_a_disputed_slash_nobody_votes_on_is_upheld_after_vote_by(env: Env) -> None:
    d, staking, token, p = env.disputes, env.d.staking, env.d.token, env.disputes.params()
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    staking.request_unstake(1_000 * SOGNI, sender=env.worker)  # and tries to leave
    c = d.case(case)
    assert c.state is CaseState.DISPUTED
    with pytest.raises(ChainRevert, match="WrongState"):  # disputed: not executable
        d.execute_slash(case, sender=env.outsider)
    with pytest.raises(ChainRevert, match="VotePending"):  # the vote may still open
        d.resolve(case, sender=env.outsider)
    # nobody opens the vote: the evidence window and one commit window go by
    env.chain.advance_time(p.evidence_window + p.commit_window + 1)
    treasury = token.balance_of(env.treasury.address)
    ev = d.resolve(case, sender=env.outsider).event("DisputeResolved")
    assert not ev["workerWon"] and ev["toTreasury"] == p.bond and ev["rewardPool"] == 0
    assert token.balance_of(env.treasury.address) == treasury + p.bond
    assert d.case(case).state is CaseState.WORKER_LOST
    c = d.case(case)
    assert c.vote_by == c.evidence_deadline + p.commit_window
    assert staking.frozen_until(env.worker.address) >= c.vote_by + 7 * 86400
    env.chain.advance_time(staking.cooldown())  # the unstake cooldown is over, the freeze not
    with pytest.raises(ChainRevert, match="StakeFrozen"):
        staking.withdraw(sender=env.worker)
    assert d.execute_slash(case).event("SlashExecuted")["slashed"] == 400 * SOGNI
    assert staking.pending_stake(env.worker.address)[0] == 600 * SOGNI


def test_a_disputed_refusal_nobody_votes_on_is_upheld_too(env: Env) -> None:
    d, p = env.disputes, env.disputes.params()
    case = bytes.fromhex("44" * 32)
    refusal = sign_refusal(
        env.reporter.key,
        chain_id=env.chain.chain_id,
        disputes=d.address,
        case_id=case,
        worker=env.worker.address,
        evidence_hash=EVIDENCE,
        refused_at=env.chain.timestamp(),
    )
    env.approve_bond()
    d.dispute_refusal(refusal, sender=env.worker)
    env.chain.advance_time(d.case(case).vote_by - env.chain.timestamp())
    ev = d.resolve(case, sender=env.outsider).event("DisputeResolved")
    assert not ev["workerWon"] and ev["toTreasury"] == p.bond


def test_the_worker_opens_its_own_stalled_vote_before_vote_by(env: Env) -> None:
    d = env.disputes
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    c = d.case(case)
    with pytest.raises(DisputeRefused, match="to publish its re-checks"):
        open_stalled_vote(d, case, worker=env.worker)
    with pytest.raises(ChainRevert, match="EvidencePending"):  # the coordinator's time first
        d.open_voting(case, BUNDLE, "u", sender=env.worker)
    with pytest.raises(DisputeRefused, match="not this wallet"):
        open_stalled_vote(d, case, worker=env.outsider)
    env.chain.advance_time(c.evidence_deadline - env.chain.timestamp() + 1)
    assert d.case(case).vote_stalled(env.chain.timestamp())
    ev = open_stalled_vote(d, case, worker=env.worker).event("VotingOpened")
    assert ev["bundleHash"] == EVIDENCE  # the original evidence: none of its own
    assert ev["snapshot"] == c.snapshot  # the jury fixed when the dispute opened
    assert d.case(case).state is CaseState.VOTING
    with pytest.raises(DisputeRefused, match="already open"):
        open_stalled_vote(d, case, worker=env.worker)


def test_no_vote_opens_after_vote_by(env: Env) -> None:
    d = env.disputes
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    env.chain.advance_time(d.case(case).vote_by - env.chain.timestamp())
    with pytest.raises(DisputeRefused, match="the dispute is lost"):
        open_stalled_vote(d, case, worker=env.worker)
    for who in (env.reporter, env.worker):  # too late for anyone, the coordinator too
        with pytest.raises(ChainRevert, match="VoteDeadlinePassed"):
            d.open_voting(case, BUNDLE, "u", sender=who)


def test_redelegating_in_the_block_of_open_voting_does_not_count(env: Env) -> None:
    """The worker's votes lie with an ally F; in the block that opens the vote it delegates
    back to itself. Before, the barred delegate was read then (the worker) while the snapshot
    (the second before) still gave F the worker's 1,000 SOGNI: F judged the case with them."""
    d = env.disputes
    ally = env.jurors[0]
    votes = StakingVotes(env.chain, env.d.staking.address)
    votes.delegate(ally.address, sender=env.worker)
    env.chain.advance_time(2)
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    env.chain.advance_time(2)
    back = votes.contract.functions.delegate(env.worker.address)
    opening = d.contract.functions.openVoting(case, BUNDLE, "u")
    receipts = _same_block(env, [(back, env.worker), (opening, env.reporter)])
    assert [r["status"] for r in receipts] == [1, 1]
    assert d.case(case).state is CaseState.VOTING
    # the ally held the worker's stake at the snapshot: barred, whatever happened since
    with pytest.raises(ChainRevert, match="WorkerCannotVote"):
        d.commit_vote(case, True, b"\x05" * 32, sender=ally)
    with pytest.raises(ChainRevert, match="WorkerCannotVote"):
        d.commit_vote(case, True, b"\x06" * 32, sender=env.worker)
    tx = d.commit_vote(case, False, b"\x07" * 32, sender=env.jurors[1])
    assert tx.event("VoteCommitted")["weight"] == 200 * SOGNI


def test_a_dispute_in_the_second_of_a_delegation_change_is_refused(env: Env) -> None:
    """Redelegate and dispute in one block (the delegation signed off chain and sent by a
    friend, `delegateBySig`): the votes of that second are not final, so the contract cannot
    know who holds the worker's stake at the snapshot; it refuses."""
    d, staking = env.disputes, env.d.staking
    ally = env.jurors[0]
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    votes = StakingVotes(env.chain, staking.address)

    def by_sig(delegatee: str) -> Any:
        nonce = votes.nonces(env.worker)
        v, r, s_ = votes.sign_delegation(env.worker, delegatee, 2**40)
        return votes.contract.functions.delegateBySig(delegatee, nonce, 2**40, v, r, s_)

    dispute = d.contract.functions.disputeSlash(case)
    receipts = _same_block(env, [(by_sig(ally.address), env.outsider), (dispute, env.worker)])
    assert [r["status"] for r in receipts] == [1, 0]
    block = env.chain.w3.eth.get_block(receipts[0]["blockNumber"])
    assert staking.delegation_of(env.worker.address) == (ally.address, block["timestamp"])
    assert d.case(case).state is CaseState.PROPOSED
    # the refusal is DelegationJustChanged (what the contract checks between the window and
    # the bond); the worker's bond did not move
    assert env.d.token.balance_of(d.address) == 0
    env.chain.advance_time(1)  # a second later the delegation is final: the dispute opens
    d.dispute_slash(case, sender=env.worker)
    assert d.case(case).worker_delegate == ally.address  # barred


def test_staking_records_when_a_delegation_changes(env: Env) -> None:
    staking = env.d.staking
    votes = StakingVotes(env.chain, staking.address)
    who, since = staking.delegation_of(env.worker.address)
    assert who == env.worker.address and since > 0  # its first stake delegated it to itself
    env.chain.advance_time(5)
    votes.delegate(env.worker.address, sender=env.worker)  # the same delegate: no change
    assert staking.delegation_of(env.worker.address) == (who, since)
    tx = votes.delegate(env.jurors[0].address, sender=env.worker)
    stamp = env.chain.w3.eth.get_block(tx.block_number)["timestamp"]
    assert staking.delegation_of(env.worker.address) == (env.jurors[0].address, stamp)
    assert staking.delegation_of(env.outsider.address)[1] == 0  # never delegated


def test_sogni_node_dispute_open_vote(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sogni-node dispute open-vote CASE`: one line when too early or too late, else the
    vote opens on the original evidence."""
    from typer.testing import CliRunner

    from sogni_node import dispute_cli, rewards_cli

    monkeypatch.setattr(dispute_cli, "_config", lambda _path: None)
    monkeypatch.setattr(rewards_cli, "_required_deployment", lambda _cfg, _url: env.d)
    monkeypatch.setattr(rewards_cli, "_wallet", lambda _cfg, _d: env.worker)
    d = env.disputes
    case = _propose(env, 400 * SOGNI)
    env.approve_bond()
    d.dispute_slash(case, sender=env.worker)
    run = CliRunner()
    early = run.invoke(dispute_cli.app, ["open-vote", "0x" + case.hex()])
    assert "to publish its re-checks" in str(early.exception)
    env.chain.advance_time(d.case(case).evidence_deadline - env.chain.timestamp() + 1)
    done = run.invoke(dispute_cli.app, ["open-vote", "0x" + case.hex()])
    assert done.exit_code == 0, (done.output, done.exception)
    assert done.output.startswith(f"vote opened on case 0x{case.hex()}")
    assert d.case(case).state is CaseState.VOTING
    again = run.invoke(dispute_cli.app, ["open-vote", "0x" + case.hex()])
    assert "already open" in str(again.exception)
