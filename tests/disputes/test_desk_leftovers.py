"""The dispute desk's leftovers: a won dispute takes back exactly the strikes of its jobs
(a slash's too, persisted, once); one failing case does not stop the others; re-checks name
their job; a slash bundle says which jobs could not be re-checked, and the jobs a slash names
keep their parameters while it may be disputed; Disputes' newer errors in one line."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from sogni_chain import ChainRevert
from sogni_chain.disputes import CaseState, Refusal, open_dispute
from sogni_chain.errors import ErrorDecoder
from sogni_coordinator.disputes import (
    PROPOSAL_KEEP,
    DisputeBook,
    DisputeDesk,
    Reporter,
    SlashCase,
)
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.settlement import slashes
from sogni_coordinator.store import SlashProposal, Store
from tests.coordinator.conftest import Harness
from tests.coordinator.test_checks import _paid_request, answer_challenge
from tests.coordinator.test_checks import until as until_true
from tests.coordinator.test_verifier_standing import POLICY, _held

from .dispute_env import Env, refused_job
from .test_flow import _faulty

J = [bytes([i]) * 32 for i in range(1, 8)]
PROMPT = "a secret prompt"


class _Store:
    """The coordinator's store: proposals are real, the worker's failed receipts faked."""

    def __init__(self, store: Store, worker: str, coordinator: str) -> None:
        self.store, self.worker, self.coordinator = store, worker.lower(), coordinator

    def slash_proposals(self, state: str | None = None) -> list[SlashProposal]:
        return self.store.slash_proposals(state)

    def failed_receipts(self, job_id: bytes | None = None) -> list[tuple[bytes, str, Any, str]]:
        assert job_id is not None
        receipt, _ = refused_job(job_id, self.worker, self.coordinator, PROMPT)
        return [(job_id, self.worker, receipt, "step 2 off by 0.4 (tolerance 0.05)")]


class _World:
    def __init__(self, env: Env, tmp_path: Path, *, now: float = 1_000.0) -> None:
        self.env, self.tmp, self.db = env, tmp_path, tmp_path / "coordinator.db"
        self.now = now
        self.rep = Reputation(self.db, clock=lambda: self.now)
        self.store = Store(self.db)
        self.book = DisputeBook(self.db)
        self.fake = _Store(self.store, env.worker.address, env.reporter.address)
        self.desk = self.new_desk()
        self.reporter = Reporter(
            self.book,
            bytes(env.reporter.key),
            chain_id=env.chain.chain_id,
            disputes=env.disputes.address,
            clock=lambda: float(env.chain.timestamp()),
        )
        self.w = env.worker.address

    def new_desk(self) -> DisputeDesk:
        return DisputeDesk(
            self.book,
            self.env.disputes,
            reporter=self.env.reporter,
            publish_dir=self.tmp / "pub",
            reputation=self.rep,
            store=self.fake,  # type: ignore[arg-type]
        )

    def refuse(self, job: bytes, at: float | None = None) -> bytes:
        """A failed check of `job`: the refusal signed, then the strike (at `at`)."""
        receipt, params = refused_job(job, self.w, self.env.reporter.address, PROMPT)
        record = self.reporter.refused(receipt, params, "float32", "step 2 off", None)
        if at is not None:
            self.rep.strike(self.w, now=at, job=job)
        return record.case_id

    def submit_slash(self, jobs: list[bytes]) -> bytes:
        pid = self.store.propose_slash(self.w, "5 failed result checks", jobs)
        assert pid is not None
        prepared = slashes.prepare(
            self.store, self.env.d, pid, self.env.settlement.address, self.tmp, share_bps=2_000
        )
        assert prepared.path is not None
        signed = slashes.sign_offline(
            json.loads(Path(str(prepared.path)).read_text()), bytes(self.env.settlement.key)
        )
        done = slashes.submit(self.store, self.env.d, signed, self.tmp)
        assert done.case_id is not None
        return bytes.fromhex(done.case_id[2:])

    def vote(self, case_id: bytes, for_worker: bool) -> None:
        d = self.env.disputes
        for i, juror in enumerate(self.env.jurors):
            d.commit_vote(case_id, for_worker, bytes([i + 1]) * 32, sender=juror)
        self.env.chain.advance_time(d.params().commit_window)
        for i, juror in enumerate(self.env.jurors):
            d.reveal_vote(case_id, for_worker, bytes([i + 1]) * 32, sender=juror)
        self.env.chain.advance_time(d.params().reveal_window)

    def close(self) -> None:
        self.rep.close()
        self.store.close()
        self.book.close()


# -- 1. a won dispute takes back exactly the strikes of its jobs -------------------------


async def test_a_won_slash_pardons_exactly_the_strikes_of_its_jobs_once_and_for_good(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path)
    slashed = J[:5]
    for i, job in enumerate(slashed):  # five failed checks in a minute: blacklisted
        w.refuse(job, at=1_000.0 + i)
    assert w.rep.blacklisted(w.w) and w.rep.get(w.w).failures == 5
    w.refuse(J[5], at=50_000.0)  # a later failure the slash does not name
    assert w.rep.get(w.w).strikes == [50_000.0]
    case_id = w.submit_slash(slashed)
    await w.desk.poll()  # followed
    open_dispute(env.disputes, env.d.token.address, worker=env.worker, case_id=case_id)
    await w.desk.poll()  # the vote opens on the bundle
    w.vote(case_id, True)
    w.now = 2_000.0  # the blacklisting the slash's strikes caused still runs
    assert w.rep.blacklisted(w.w)
    await w.desk.poll()  # resolved: the worker won
    await w.desk.poll()
    assert env.disputes.case(case_id).state is CaseState.WORKER_WON
    rec = w.rep.get(w.w)
    assert rec.failures == 1 and rec.strikes == [50_000.0]  # the other failure still counts
    assert not w.rep.blacklisted(w.w)
    assert w.book.pardoned(w.w, J) == set(slashed)
    await w.desk.poll()
    assert w.rep.get(w.w).failures == 1  # once
    from sogni_coordinator import slash_cli  # the operator's listing says so

    (listed,) = slash_cli._disputes_of(SimpleNamespace(database=w.db)).values()  # type: ignore[arg-type]
    assert listed["pardoned"] == ["0x" + j.hex() for j in slashed]
    assert "worker won, 5 failed checks pardoned" in slash_cli._dispute_line(listed)
    # a restart: the pardon is on disk and not applied again
    w.close()
    again = _World(env, tmp_path, now=2_000.0)
    rec = again.rep.get(again.w)
    assert rec.failures == 1 and rec.strikes == [50_000.0] and not again.rep.blacklisted(again.w)
    assert again.desk.apply_pardons() == 0
    await again.desk.poll()
    assert again.rep.get(again.w).failures == 1
    # nor is it proposed for a slash on that evidence again
    pid = again.store.propose_slash(again.w, "again", slashed)
    assert pid is not None
    prepared = slashes.prepare(again.store, env.d, pid, env.settlement.address, tmp_path)
    assert prepared.path is None
    (p,) = [p for p in again.store.slash_proposals() if p.id == pid]
    assert p.state == "dismissed" and "pardoned" in p.note
    again.close()


async def test_a_won_refusal_takes_back_its_own_strike_not_the_latest(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path, now=300.0)
    first = w.refuse(J[0], at=100.0)
    second = w.refuse(J[1], at=200.0)
    w.desk.resolved(first, True)
    rec = w.rep.get(w.w)
    assert rec.strikes == [200.0] and rec.failures == 1  # J[0]'s strike, not the latest
    # later, five other failures blacklist the worker; J[1]'s win does not lift that
    for i in range(5):
        w.rep.strike(w.w, now=10_000.0 + i)
    w.now = 10_010.0
    assert w.rep.blacklisted(w.w)
    w.desk.resolved(second, True)
    assert w.rep.blacklisted(w.w) and w.rep.get(w.w).failures == 5
    w.close()


async def test_a_job_is_pardoned_once_and_a_pardon_lost_in_a_crash_is_applied(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path)
    refusal = w.refuse(J[0], at=1_000.0)
    w.refuse(J[1], at=1_001.0)
    w.refuse(J[2], at=1_002.0)
    assert w.book.settle(refusal, True)  # recorded, then the coordinator stopped
    assert w.rep.get(w.w).failures == 3
    assert w.desk.apply_pardons() == 1  # the next poll applies it
    assert w.rep.get(w.w).failures == 2
    slash = SlashCase(b"\x55" * 32, 1, w.w.lower(), J[:3], b"\x66" * 32, 1, "r")
    assert w.book.add_slash(slash)
    w.book.update_slash(slash.case_id, outcome="worker won", finished=True)
    assert w.desk.apply_pardons() == 1
    assert w.rep.get(w.w).failures == 0 and w.rep.get(w.w).strikes == []
    assert w.desk.apply_pardons() == 0
    w.close()


@pytest.fixture
async def h(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=POLICY)
    yield harness
    harness.close()


async def test_a_failed_check_records_its_strike_and_a_pardoned_job_is_no_evidence(
    h: Harness, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the dispatcher: the check's strike is recorded against its job (what a won
    dispute takes back), and the slash proposal its blacklisting makes leaves out a job a
    won dispute pardoned."""
    chain = env.chain
    book = DisputeBook(tmp_path / "coordinator.db")
    h.dispatcher.refusals = Reporter(
        book,
        bytes(env.reporter.key),
        chain_id=chain.chain_id,
        disputes=env.disputes.address,
        clock=lambda: float(chain.timestamp()),
    )
    DisputeDesk(  # told of each strike of a refused job
        book, env.disputes, reporter=env.reporter, publish_dir=tmp_path, reputation=h.reputation
    )
    await _paid_request(h)
    worker, first, third = h.node(0), h.node(1, ready=False), h.node(2, ready=False)
    earlier = b"\x0e" * 32  # a failed job of this worker whose dispute it won
    book.record_pardons(worker.wallet, [earlier], b"\x0c" * 32)
    failed_job_ids = h.store.failed_job_ids
    monkeypatch.setattr(
        h.store, "failed_job_ids", lambda w, since: [earlier, *failed_job_ids(w, since)]
    )
    for _ in range(4):  # the check's strike is the fifth in the hour: blacklisted
        h.reputation.strike(worker.wallet)
    offer, truth = await _held(h, worker)
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, truth)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_faulty, h, first, truth)
        nursery.start_soon(_faulty, h, third, truth)
    await until_true(lambda: bool(h.store.slash_proposals()))
    assert h.reputation.blacklisted(worker.wallet)
    await until_true(lambda: book.unpardoned_strikes(worker.wallet, [job_id])[0][1] is not None)
    ((struck, at),) = book.unpardoned_strikes(worker.wallet, [job_id])
    assert struck == job_id and at == h.clock()
    (proposal,) = h.store.slash_proposals()
    assert proposal.job_ids == [job_id]  # not the pardoned one
    book.close()


# -- 2. one failing case does not stop the others ----------------------------------------


def _block_bundle(tmp_path: Path, case_id: bytes) -> Path:
    """A directory where the case's bundle goes: writing it fails (OSError)."""
    where = tmp_path / "pub" / "disputes" / f"{case_id.hex()}.json"
    where.mkdir(parents=True)
    return where


async def test_a_slash_case_that_fails_does_not_stop_the_others(env: Env, tmp_path: Path) -> None:
    w = _World(env, tmp_path)
    w.refuse(J[0])
    w.refuse(J[1])
    a = w.submit_slash([J[0]])
    b = w.submit_slash([J[1]])
    await w.desk.poll()
    for case_id in (a, b):
        open_dispute(env.disputes, env.d.token.address, worker=env.worker, case_id=case_id)
    blocked = _block_bundle(tmp_path, a)
    with capture_logs() as logs:
        await w.desk.poll()
    assert env.disputes.case(a).state is CaseState.DISPUTED
    assert env.disputes.case(b).state is CaseState.VOTING  # went on
    (failed,) = [e for e in logs if e["event"] == "dispute_case_step_failed"]
    assert failed["case"] == a.hex()[:16] and failed["error"] == "IsADirectoryError"
    assert PROMPT not in repr(logs)
    blocked.rmdir()
    await w.desk.poll()  # retried
    assert env.disputes.case(a).state is CaseState.VOTING
    w.close()


async def test_a_refusal_whose_vote_fails_to_open_is_retried_and_others_go_on(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path)
    a, b = w.refuse(J[0]), w.refuse(J[1])
    for case_id in (a, b):
        record = w.book.by_case(case_id)
        assert record is not None
        refusal = Refusal.from_json(record.as_json())
        open_dispute(env.disputes, env.d.token.address, worker=env.worker, refusal=refusal)
    blocked = _block_bundle(tmp_path, a)
    with capture_logs() as logs:
        assert await w.desk.poll() == 2
    assert env.disputes.case(a).state is CaseState.DISPUTED
    assert env.disputes.case(b).state is CaseState.VOTING
    assert [e["case"] for e in logs if e["event"] == "dispute_case_step_failed"] == [a.hex()[:16]]
    assert PROMPT not in repr(logs)
    record = w.book.by_case(a)
    assert record is not None and record.params is not None  # kept for the retry
    blocked.rmdir()
    await w.desk.poll()  # its event is read again
    assert env.disputes.case(a).state is CaseState.VOTING
    bundle_b = w.book.by_case(b)
    assert bundle_b is not None and bundle_b.bundle_hash == env.disputes.case(b).bundle_hash
    w.close()


# -- 3. re-checks name their job ----------------------------------------------------------


async def test_rechecks_name_the_job(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sogni_coordinator import disputes as desk_module
    from sogni_coordinator import verifiers

    w = _World(env, tmp_path)
    case_id = w.refuse(J[0])
    record = w.book.by_case(case_id)
    assert record is not None
    step = SimpleNamespace(step=2, kind="step", first=None, third=None)
    openings = [SimpleNamespace(step=2), SimpleNamespace(step=3)]
    evidence = SimpleNamespace(steps=[step], challenge=SimpleNamespace(openings=openings))
    monkeypatch.setattr(desk_module, "decode_evidence", lambda _raw: evidence)
    seen: list[Any] = []

    async def fake_verify_step(_dispatcher: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("job"))
        return SimpleNamespace(verifier=None)

    monkeypatch.setattr(verifiers, "verify_step", fake_verify_step)
    w.desk.dispatcher = SimpleNamespace(  # type: ignore[assignment]
        nodes={}, store=SimpleNamespace(failed_evidence=lambda _job: [b"kept"])
    )
    assert await w.desk.recheck(record) == []
    assert seen == [J[0]]
    w.close()


# -- 4. parameters a slash may need, and saying when they are gone -------------------------


async def test_a_slash_bundle_says_which_jobs_could_not_be_rechecked(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path)
    gone = w.refuse(J[0])
    w.refuse(J[1])
    assert w.book.shred(gone) == 1  # its parameters were deleted
    case_id = w.submit_slash([J[0], J[1], J[2]])  # J[2]: no refusal kept at all
    await w.desk.poll()
    open_dispute(env.disputes, env.d.token.address, worker=env.worker, case_id=case_id)
    with capture_logs() as logs:
        await w.desk.poll()
        await w.desk.poll()
    sc = w.book.slash_case(case_id)
    assert sc is not None and sc.bundle_path is not None
    bundle = json.loads(Path(sc.bundle_path).read_text())
    assert bundle["recheckImpossible"] == ["0x" + J[0].hex(), "0x" + J[2].hex()]
    assert bundle["why"] == "parameters deleted; parameters not kept"
    assert len(bundle["failures"]) == 3
    said = [e for e in logs if e["event"] == "dispute_slash_recheck_impossible"]
    assert len(said) == 1 and said[0]["jobs"] == 2
    w.close()


async def test_the_jobs_a_slash_names_keep_their_parameters_until_it_cannot_be_disputed(
    env: Env, tmp_path: Path
) -> None:
    w = _World(env, tmp_path)
    chain, d = env.chain, env.disputes
    named, other = w.refuse(J[0]), w.refuse(J[1])
    pid = w.store.propose_slash(w.w, "5 failed result checks", [J[0]])  # J[0]'s strike
    assert pid is not None
    window = d.params().dispute_window
    chain.advance_time(window + 3600 + 60)  # both refusals' own windows (and the slack) over
    await w.desk.poll()
    kept, shredded = w.book.by_case(named), w.book.by_case(other)
    assert shredded is not None and shredded.params is None
    assert kept is not None and kept.params is not None  # the open proposal names it
    # the operator sends the slash later: kept through the slash's own window too
    w.store.mark_slash(pid, "dismissed", "re-proposed below")
    case_id = w.submit_slash([J[0]])
    chain.advance_time(window - 120)
    await w.desk.poll()
    kept = w.book.by_case(named)
    assert kept is not None and kept.params is not None
    open_dispute(d, env.d.token.address, worker=env.worker, case_id=case_id)
    await w.desk.poll()  # the vote opens; the re-check could run on them
    sc = w.book.slash_case(case_id)
    assert sc is not None and sc.bundle_path is not None
    assert "recheckImpossible" not in json.loads(Path(sc.bundle_path).read_text())
    await w.desk.poll()  # voted on: nothing needs them any more
    kept = w.book.by_case(named)
    assert kept is not None and kept.params is None
    w.close()


async def test_a_proposal_never_acted_on_keeps_no_prompt_for_ever(env: Env, tmp_path: Path) -> None:
    w = _World(env, tmp_path)
    named = w.refuse(J[0])
    pid = w.store.propose_slash(w.w, "5 failed result checks", [J[0]])
    assert pid is not None
    env.chain.advance_time(env.disputes.params().dispute_window + 3600 + 60)
    with sqlite3.connect(w.db) as db:  # proposed longer ago than an operator may sit on it
        db.execute(
            "UPDATE slash_proposals SET proposed_at = ? WHERE id = ?",
            (time.time() - PROPOSAL_KEEP - 60, pid),
        )
    await w.desk.poll()
    shredded = w.book.by_case(named)
    assert shredded is not None and shredded.params is None
    w.close()


# -- 5. Disputes' newer errors, in one line -------------------------------------------------


def test_disputes_newer_errors_have_operator_wording(env: Env) -> None:
    from eth_abi import encode as abi_encode
    from eth_hash.auto import keccak

    from sogni_chain.artifacts import load_artifact

    decoder = ErrorDecoder([load_artifact("Disputes").abi])
    worker = "0x" + "ab" * 20
    data = keccak(b"DelegationJustChanged(address,uint64)")[:4] + abi_encode(
        ["address", "uint64"], [worker, 1_700_000_000]
    )
    err = decoder.decode(data)
    assert err.hint is not None and "delegation changed" in err.hint and "\n" not in err.hint
    assert "a second later" in str(err)

    d = env.disputes
    case = bytes(
        d.propose_slash(
            env.worker.address, 10**18, "sogni: test", b"\x22" * 32, sender=env.settlement
        ).event("SlashProposed")["caseId"]
    )
    open_dispute(d, env.d.token.address, worker=env.worker, case_id=case)
    with pytest.raises(ChainRevert) as pending:
        d.resolve(case, sender=env.outsider)
    assert pending.value.hint is not None and "cannot be resolved before" in str(pending.value)
    env.chain.advance_time(d.case(case).vote_by - env.chain.timestamp())
    with pytest.raises(ChainRevert) as late:
        d.open_voting(case, b"\x33" * 32, "u", sender=env.reporter)
    assert late.value.hint is not None and "the dispute is lost" in str(late.value)


def test_dispute_open_says_a_delegation_just_changed_before_sending(env: Env) -> None:
    from sogni_chain.disputes import DisputeRefused
    from sogni_chain.governance import StakingVotes

    d = env.disputes
    tx = d.propose_slash(
        env.worker.address, 10**18, "sogni: test", b"\x22" * 32, sender=env.settlement
    )
    case = bytes(tx.event("SlashProposed")["caseId"])
    StakingVotes(env.chain, env.d.staking.address).delegate(
        env.jurors[0].address, sender=env.worker
    )
    bond = env.d.token.balance_of(env.worker.address)
    with pytest.raises(DisputeRefused, match=r"delegation changed at .*try again in a second"):
        open_dispute(d, env.d.token.address, worker=env.worker, case_id=case)
    assert env.d.token.balance_of(env.worker.address) == bond  # nothing sent
    env.chain.advance_time(1)
    open_dispute(d, env.d.token.address, worker=env.worker, case_id=case)
    assert d.case(case).state is CaseState.DISPUTED
