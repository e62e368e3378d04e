"""The coordinator's desk follows its own slash cases as it does refusals: a disputed slash
gets its bundle (the failed checks) and its vote opened by the coordinator, and is then
resolved and executed; one the coordinator was away for is upheld after `voteBy` and still
executed. Before, the desk opened votes for refusals only, and a disputed slash sat there
until the worker's freeze ran out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eth_hash.auto import keccak

from sogni_chain.disputes import CaseState, open_dispute
from sogni_coordinator.disputes import DisputeBook, DisputeDesk, slash_evidence_hash
from sogni_coordinator.settlement import slashes
from sogni_coordinator.store import SlashProposal, Store

from .dispute_env import SOGNI, Env, refused_job

JOB = b"\x07" * 32


class _Store:
    """The coordinator's store, with one failed receipt of the worker on record."""

    def __init__(self, store: Store, worker: str, coordinator: str) -> None:
        self.store = store
        self.receipt, _ = refused_job(JOB, worker, coordinator, "a secret prompt")
        self.worker = worker

    def slash_proposals(self, state: str | None = None) -> list[SlashProposal]:
        return self.store.slash_proposals(state)

    def failed_receipts(self, job_id: bytes | None = None) -> list[tuple[bytes, str, Any, str]]:
        return [(JOB, self.worker.lower(), self.receipt, "step 2 off by 0.4 (tolerance 0.05)")]


def _submitted_slash(env: Env, store: Store, tmp_path: Path) -> bytes:
    pid = store.propose_slash(env.worker.address, "5 failed result checks", [JOB])
    assert pid is not None
    prepared = slashes.prepare(store, env.d, pid, env.settlement.address, tmp_path, share_bps=4_000)
    signed = slashes.sign_offline(
        json.loads(Path(str(prepared.path)).read_text()), bytes(env.settlement.key)
    )
    done = slashes.submit(store, env.d, signed, tmp_path)
    assert done.case_id is not None
    return bytes.fromhex(done.case_id[2:])


def _desk(env: Env, tmp_path: Path) -> tuple[DisputeDesk, DisputeBook, Store]:
    store = Store(tmp_path / "coordinator.db")
    book = DisputeBook(tmp_path / "coordinator.db")
    desk = DisputeDesk(
        book,
        env.disputes,
        reporter=env.reporter,
        publish_dir=tmp_path / "pub",
        store=_Store(store, env.worker.address, env.reporter.address),  # type: ignore[arg-type]
    )
    return desk, book, store


async def test_the_desk_opens_resolves_and_executes_a_disputed_slash(
    env: Env, tmp_path: Path
) -> None:
    d, staking = env.disputes, env.d.staking
    desk, book, store = _desk(env, tmp_path)
    case_id = _submitted_slash(env, store, tmp_path)
    await desk.poll()
    (sc,) = book.slash_cases()
    assert sc.case_id == case_id and sc.job_ids == [JOB]
    assert sc.evidence_hash == slash_evidence_hash([JOB]) and sc.amount == 400 * SOGNI

    open_dispute(d, env.d.token.address, worker=env.worker, case_id=case_id)
    assert await desk.poll() == 1  # the DisputeOpened; the desk opens the vote on its bundle
    case = d.case(case_id)
    assert case.state is CaseState.VOTING
    sc = book.slash_case(case_id)  # type: ignore[assignment]
    assert sc is not None and sc.bundle_path is not None and sc.vote_by == case.vote_by
    body = Path(sc.bundle_path).read_bytes()
    assert case.bundle_hash == keccak(body) == sc.bundle_hash
    bundle = json.loads(body)
    assert bundle["kind"] == "slash" and bundle["amount"] == str(400 * SOGNI)
    assert [f["jobId"] for f in bundle["failures"]] == ["0x" + JOB.hex()]
    assert "secret" not in body.decode()

    for i, juror in enumerate(env.jurors):
        d.commit_vote(case_id, False, bytes([i + 1]) * 32, sender=juror)
    env.chain.advance_time(d.params().commit_window)
    for i, juror in enumerate(env.jurors):
        d.reveal_vote(case_id, False, bytes([i + 1]) * 32, sender=juror)
    env.chain.advance_time(d.params().reveal_window)
    await desk.poll()  # resolves (lost)
    assert d.case(case_id).state is CaseState.WORKER_LOST
    await desk.poll()  # records the outcome, executes
    assert d.case(case_id).state is CaseState.EXECUTED
    assert staking.active_stake(env.worker.address) == 600 * SOGNI
    (sc,) = book.slash_cases()
    assert sc.outcome == "executed" and sc.finished
    await desk.poll()  # nothing left to do
    # the operator's listing (`sogni-coordinator slash list/show`) shows the case
    from types import SimpleNamespace

    from sogni_coordinator import slash_cli

    listed = slash_cli._disputes_of(SimpleNamespace(database=tmp_path / "coordinator.db"))  # type: ignore[arg-type]
    (dispute,) = listed.values()
    assert dispute["caseId"] == "0x" + case_id.hex() and dispute["voteBy"] == case.vote_by
    assert [f["jobId"] for f in dispute["failures"]] == ["0x" + JOB.hex()]
    assert "vote by" in slash_cli._dispute_line(dispute) and "executed" in slash_cli._dispute_line(
        dispute
    )
    store.close()
    book.close()


async def test_a_slash_disputed_while_the_coordinator_was_away_is_upheld_after_vote_by(
    env: Env, tmp_path: Path
) -> None:
    d, staking, token = env.disputes, env.d.staking, env.d.token
    desk, book, store = _desk(env, tmp_path)
    case_id = _submitted_slash(env, store, tmp_path)
    open_dispute(d, token.address, worker=env.worker, case_id=case_id)
    env.chain.advance_time(d.case(case_id).vote_by - env.chain.timestamp())
    treasury = token.balance_of(env.treasury.address)
    await desk.poll()  # too late to open the vote: upheld by default
    case = d.case(case_id)
    assert case.state is CaseState.WORKER_LOST and case.bundle_hash == bytes(32)
    assert token.balance_of(env.treasury.address) == treasury + d.params().bond
    await desk.poll()
    assert d.case(case_id).state is CaseState.EXECUTED
    assert staking.active_stake(env.worker.address) == 600 * SOGNI
    (sc,) = book.slash_cases()
    assert sc.outcome == "executed" and sc.finished
    store.close()
    book.close()


async def test_an_undisputed_slash_is_executed_after_its_window(env: Env, tmp_path: Path) -> None:
    desk, book, store = _desk(env, tmp_path)
    case_id = _submitted_slash(env, store, tmp_path)
    await desk.poll()
    assert env.disputes.case(case_id).state is CaseState.PROPOSED  # its window is open
    env.chain.advance_time(env.disputes.params().dispute_window)
    await desk.poll()
    assert env.disputes.case(case_id).state is CaseState.EXECUTED
    assert env.d.staking.active_stake(env.worker.address) == 600 * SOGNI
    store.close()
    book.close()
