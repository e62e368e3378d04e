"""Sampled receipts are held until verified (`sogni_coordinator.checks`): in-process, with a
fake worker that commits to a real Merkle tree of made-up latents and a fake verifier node."""

from __future__ import annotations

import functools
import io
import json
import math
import random
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import trio
from eth_account import Account
from PIL import Image

from sogni_app.api import authorize
from sogni_coordinator.challenges import MAX_PAIRS, choose_steps
from sogni_coordinator.dispatch import ResultRefused
from sogni_coordinator.evidence import decode_evidence
from sogni_coordinator.job_state import JobState
from sogni_coordinator.ledger import worker_account
from sogni_coordinator.rerender_verify import rerender_weights
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifiers import SEED_TOLERANCE
from sogni_protocol import eip712
from sogni_protocol.messages import (
    MAX_CHALLENGE_STEPS,
    RERENDER_FEATURE,
    RERENDER_SEED_FEATURE,
    RERENDER_WEIGHTS_FEATURE,
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    DecodeVerified,
    JobImage,
    JobParams,
    Offer,
    RenderMeta,
    Result,
    ScalarEntry,
    StepOpeningWire,
    StepVerified,
    TensorEntry,
    VerifyRender,
    VerifyStep,
    decode,
    encode,
)
from sogni_protocol.trajectory import TensorBytes, TrajectoryTree, step_digest

from .conftest import DOMAIN, FakeNode, Harness, events, request

T = TypeVar("T")
SHAPE = [1, 4, 2, 2]
ALL = VerificationConfig(
    rate=1.0, challenge_timeout=5.0, verify_timeout=5.0, image_check=False, probe_rate=0.0
)
"""Every receipt checked; no image check (its own tests), no probes unless a test asks."""


def _latents(step: int, seed: int) -> bytes:
    n = 1
    for d in SHAPE:
        n *= d
    return array("f", [(seed + 1) * 10.0 / (step + 1) + i * 0.01 for i in range(n)]).tobytes()


class Trajectory:
    """N + 1 made-up leaves (a latent and a None timestep each) and their Merkle tree."""

    def __init__(self, steps: int, seed: int) -> None:
        self.leaves = [_latents(k, seed) for k in range(steps + 1)]
        self.tree = TrajectoryTree([self.digest(k) for k in range(steps + 1)])

    def entries(self, k: int) -> dict[str, object]:
        return {"latents": TensorBytes("float32", tuple(SHAPE), self.leaves[k]), "timestep": None}

    def digest(self, k: int) -> bytes:
        return step_digest(self.entries(k))  # type: ignore[arg-type]

    def tensor(self, k: int) -> TensorEntry:
        return TensorEntry(name="latents", dtype="float32", shape=SHAPE, data=self.leaves[k])

    def opening(self, k: int) -> StepOpeningWire:
        return StepOpeningWire(
            step=k,
            tensors=[self.tensor(k)],
            scalars=[ScalarEntry(name="timestep", value=None)],
            proof=self.tree.proof(k),
            n_leaves=self.tree.n_leaves,
        )


def committed(node: FakeNode, offer: Offer, t: Trajectory, dtype: str = "float32") -> Result:
    """`node`'s result for `offer`, its receipt signing `t`'s root, in mode `dtype`."""
    plain = node.result(offer)
    receipt = plain.receipt.__class__(
        **{f: getattr(plain.receipt, f) for f in plain.receipt.__struct_fields__ if f != "v"}
        | {"trajectory_root": t.tree.root}
    )
    return Result(
        job_id=plain.job_id,
        image=plain.image,
        receipt=receipt,
        signature=eip712.sign_receipt(node.key, DOMAIN, receipt),
        meta=RenderMeta(backend="test", device="cpu", dtype=dtype, threads=1),
    )


async def until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def next_of(node: FakeNode, kind: type[T]) -> T:
    found: list[T] = []

    def got() -> bool:
        found.extend(m for m in node.drain() if isinstance(m, kind))
        return bool(found)

    await until(got)
    return found[0]


async def answer_challenge(
    h: Harness, worker: FakeNode, t: Trajectory, *, lie: bool = False
) -> None:
    """The worker opens what it is asked (`lie`: proven leaves of another trajectory)."""
    ch = await next_of(worker, Challenge)
    src = Trajectory(len(t.leaves) - 1, seed=99) if lie else t
    answer = ChallengeAnswer(job_id=ch.job_id, openings=[src.opening(k) for k in ch.steps])
    assert h.dispatcher.challenges.answered(worker.link.peer_id, answer)


async def answer_verify(
    h: Harness,
    verifier: FakeNode,
    t: Trajectory,
    *,
    honest: bool,
    start: float | None = 0.0,
) -> list[int]:
    """The verifier re-runs step k, for every `VerifyStep` of the check under way: the
    committed next leaf (honest) or another one; for k = 0 it reports `start` as leaf 0's
    distance from the seed's noise. Returns the k asked, in order."""
    asked: list[VerifyStep] = []
    ks: list[int] = []

    def got() -> bool:
        asked.extend(m for m in verifier.drain() if isinstance(m, VerifyStep))
        return bool(asked) or not h.dispatcher.checks.pending

    while True:
        await until(got)
        if not asked:
            return ks
        ask = asked.pop(0)
        ks.append(ask.k)
        other = Trajectory(len(t.leaves) - 1, 5)
        latents = t.tensor(ask.k + 1) if honest else other.tensor(ask.k + 1)
        d0 = start if ask.k == 0 else None
        reply = StepVerified(check_id=ask.check_id, latents=latents, start_distance=d0)
        assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)


def _check_passed(h: Harness, job_id: bytes) -> bool:
    return h.store.check_state(job_id) == "passed"


def log_lines(h: Harness) -> list[dict[str, Any]]:
    path = h.folder / "verifications.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
async def checked(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """A charging coordinator that checks every full receipt."""
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=ALL)
    yield h
    h.close()


async def _paid_request(h: Harness, n: int = 1) -> tuple[object, str]:
    payer = Account.create()
    assert h.ledger is not None
    h.ledger.credit_purchase(payer.address, 1)
    sub = await h.submit(authorize(request(n), bytes(payer.key), h.dispatcher.domain))
    return sub, payer.address


async def _held(h: Harness, worker: FakeNode) -> tuple[Offer, Trajectory]:
    """`worker` renders the one job matched to it and sends a committed result, which a
    coordinator checking every receipt holds: the offer and the trajectory it committed to."""
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    return offer, t


def _earned(h: Harness, wallet: str) -> int:
    assert h.ledger is not None
    return sum(h.ledger.balance(worker_account(wallet)).values())


async def test_a_sampled_receipt_is_held_until_its_check_passes(checked: Harness) -> None:
    h = checked
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)  # two wallets
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    # held: stored pending, not delivered, not billed, not in an epoch, still "running"
    assert h.store.check_state(job_id) == "pending"
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    assert h.store.unsettled_receipts() == []
    assert h.dispatcher.job_counts()["running"] == 1
    assert _earned(h, worker.wallet) == 0
    await answer_challenge(h, worker, t)
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: h.store.check_state(job_id) == "passed")
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    images = [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    assert [m.job_id for m in images] == [job_id]
    assert [r.receipt.job_id for r in h.store.unsettled_receipts()] == [job_id]
    await until(lambda: _earned(h, worker.wallet) > 0)
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["jobId"] == "0x" + job_id.hex()
    assert line["worker"] == worker.wallet and line["verifier"] == verifier.wallet
    assert line["distance"] == 0.0 and "prompt" not in json.dumps(line)


async def test_a_check_another_coordinator_decided_first_settles_nothing_here(
    checked: Harness,
) -> None:
    """Two coordinators of a cluster can check one held receipt (this one's lease lapsed in
    an outage and the next lessee took the check over). The other's verdict lands first
    (here: failed, the receipt moved to the evidence): when this check then passes, nothing
    is settled, credited or delivered here, and the job leaves this coordinator. Before,
    the pass settled and delivered a receipt the network had already refused."""
    h = checked
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "pending"
    assert h.store.fail_held_receipt(job_id, "refused by the other coordinator's check")
    await answer_challenge(h, worker, t)
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: job_id not in h.dispatcher.jobs)
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    assert h.store.unsettled_receipts() == []
    assert _earned(h, worker.wallet) == 0
    assert h.reputation.get(worker.wallet).strikes == []  # the other's verdict, not ours


async def test_a_held_receipts_prompt_key_outlives_the_retention(checked: Harness) -> None:
    """A held receipt's job is stored done, yet its check (re-run after a restart, or by
    another coordinator) needs the job's parameters: its request's key is not shredded
    while the check is pending. Before, a restart after the retention could not unseal the
    parameters and the coordinator refused to start (`PromptKeyError`)."""
    h = checked
    await _paid_request(h)
    worker = h.node(0)
    offer, _ = await _held(h, worker)
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "pending"
    assert h.store.shred_keys(0, now=time.time() + 10**6) == 0
    (pending,) = h.store.pending_checks([job_id])  # its parameters still unseal
    assert pending.job.params.steps == offer.offer.steps


@pytest.mark.parametrize("fault", ["verifier_disagrees", "other_root", "refuses"])
async def test_a_failed_check_requeues_unpaid_strikes_and_keeps_evidence(
    checked: Harness, fault: str
) -> None:
    h = checked
    sub, payer = await _paid_request(h)
    rogue, honest = h.node(0), h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = rogue.offers()
    job_id = offer.offer.job_id
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(rogue.link, committed(rogue, offer, t))
    if fault == "refuses":
        ch = await next_of(rogue, Challenge)
        refusal = ChallengeRefused(job_id=ch.job_id, reason="trajectory gone")
        assert h.dispatcher.challenges.answered(rogue.link.peer_id, refusal)
    elif fault == "other_root":  # leaves of another trajectory: the Merkle check fails
        await answer_challenge(h, rogue, t, lie=True)
    else:  # its own committed (made-up) leaves, correctly proven: the re-run disagrees
        await answer_challenge(h, rogue, t)
        await answer_verify(h, honest, t, honest=False)
    await until(lambda: h.store.failed_receipts(job_id) and h.reputation.get(rogue.wallet).strikes)
    ((_, worker, evidence, reason),) = h.store.failed_receipts(job_id)
    assert worker == rogue.wallet.lower() and evidence.trajectory_root == t.tree.root
    assert reason
    assert h.store.receipt(job_id) is None and h.store.check_state(job_id) is None
    assert h.store.job_state(job_id) is JobState.QUEUED
    assert h.store.unsettled_receipts() == []
    assert len(h.reputation.get(rogue.wallet).strikes) == 1
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    (line,) = log_lines(h)
    assert line["verdict"] == "fail" and line["worker"] == rogue.wallet
    assert (line["distance"] is not None) is (fault == "verifier_disagrees")
    # re-rendered by the other wallet, though the rogue has a free slot too
    h.dispatcher.ready(honest.link, 1)
    h.dispatcher.ready(rogue.link, 1)
    h.dispatcher.match()
    assert rogue.offers() == []
    (again,) = honest.offers()
    assert again.offer.job_id == job_id
    t2 = Trajectory(again.offer.steps, seed=2)
    await h.dispatcher.accept_result(honest.link, committed(honest, again, t2))
    await answer_challenge(h, honest, t2)
    await answer_verify(h, rogue, t2, honest=True)  # the rogue verifies (and is honest here)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    assert _earned(h, rogue.wallet) == 0
    await until(lambda: _earned(h, honest.wallet) > 0)
    assert [x["verdict"] for x in log_lines(h)] == ["fail", "pass"]
    assert h.ledger is not None and h.ledger.balance(payer)["spark_paid"] < 1_000_000


async def test_no_verifier_skips_the_check_and_releases(checked: Harness) -> None:
    h = checked
    sub, _ = await _paid_request(h)
    worker = h.node(0)  # a single-wallet network
    offer, t = await _held(h, worker)
    await answer_challenge(h, worker, t)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    assert h.store.check_state(offer.offer.job_id) == "skipped"
    (line,) = log_lines(h)
    assert line["verdict"] == "skipped" and "no verifier" in str(line["reason"])
    assert h.reputation.get(worker.wallet).strikes == []


async def test_a_busy_worker_is_asked_again_and_never_struck_for_it(
    checked: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node holding too many challenges refuses more as "busy" (`CHALLENGE_BUSY`): that
    failed the check and struck an honest node. Now, when this coordinator has many
    challenges open to it (`BUSY_BELIEVED`, 1 here), it asks again until its deadline; busy
    to the end fails the check (unpaid) without a strike."""
    from sogni_coordinator import checks
    from sogni_protocol.messages import CHALLENGE_BUSY, ChallengeRefused

    monkeypatch.setattr(checks, "BUSY_BELIEVED", 1)
    h = checked
    await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    job_id = offer.offer.job_id
    ch = await next_of(worker, Challenge)
    busy = ChallengeRefused(job_id=ch.job_id, reason=f"{CHALLENGE_BUSY} 64 challenges waiting")
    assert h.dispatcher.challenges.answered(worker.link.peer_id, busy)
    await answer_challenge(h, worker, t)  # asked again a moment later: answered now
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: h.store.check_state(job_id) == "passed")
    assert h.reputation.get(worker.wallet).strikes == []


async def test_a_late_result_held_for_its_check_is_a_slow_sample(checked: Harness) -> None:
    """A node past its deadline (the job running again elsewhere) answers; its result is
    drawn and held, the check passes: its render time was recorded as 0, the fastest sample
    a node can give. It is a slow one now, and sets no render-time median."""
    from .conftest import FLOOR

    h = checked
    await _paid_request(h)
    late, other = h.node(0), h.node(1)
    h.dispatcher.match()
    mine, theirs = late.offers(), other.offers()
    holder, verifier = (late, other) if mine else (other, late)
    (offer,) = mine or theirs
    h.clock.advance(FLOOR + 1)
    h.dispatcher.sweep()  # deadline missed: the job goes to the other node
    h.dispatcher.match()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(holder.link, committed(holder, offer, t))
    assert h.store.check_state(offer.offer.job_id) == "pending"
    await answer_challenge(h, holder, t)
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: h.reputation.get(holder.wallet).jobs == 1)  # credited: check passed
    record = h.reputation.get(holder.wallet)
    assert record.speed < 1.0 and record.work_rate == 0


async def test_a_challenge_lost_with_a_reconnect_is_asked_again_on_the_new_stream(
    checked: Harness,
) -> None:
    """The worker's stream was replaced (a reconnect) while its challenge was open: the
    challenge failed "node left: ..." and only "node not connected" counted as gone, so an
    honest worker was struck and unpaid for a network blip. It is asked again once the same
    node is back (it keeps its trajectory), and the check passes."""
    h = checked
    await _paid_request(h)
    worker = h.node(0)
    verifier = h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    await next_of(worker, Challenge)  # on its way when the stream drops
    again = h.node(0)  # the same node on a new stream
    await answer_challenge(h, again, t)  # the challenge, asked again
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: _earned(h, again.wallet) > 0)
    assert h.store.check_state(offer.offer.job_id) == "passed"
    assert h.reputation.get(worker.wallet).strikes == []


async def test_a_verdict_the_database_refuses_is_written_again_not_lost(
    checked: Harness,
) -> None:
    """A check's verdict write that failed (disk full, a busy or lost database) escaped
    `Checks._check` and ended `Checks.run`, the dispatcher and the coordinator. It is
    written again until the database takes it; then the receipt is paid as usual."""
    import sqlite3

    h = checked
    await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    real, tries = h.store.mark_check, []

    def failing_twice(job_id: bytes, state: str) -> bool:
        tries.append(state)
        if len(tries) <= 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(job_id, state)

    h.store.mark_check = failing_twice  # type: ignore[method-assign]
    await answer_challenge(h, worker, t)
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: _earned(h, worker.wallet) > 0, timeout=20)
    assert tries == ["passed"] * 3 and h.store.check_state(offer.offer.job_id) == "passed"


async def test_a_wallet_losing_every_challenge_with_its_stream_is_struck_past_a_few(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A challenge lost with the worker's stream fails unpaid and unstruck (a blip): a
    cheater could drop its connection at every challenge it cannot pass and never be struck.
    Past `AWAY_FORGIVEN` such losses within `STRIKE_WINDOW`, the next one is struck."""
    from sogni_coordinator.checks import AWAY_FORGIVEN

    quick = msgspec.structs.replace(ALL, challenge_timeout=0.3)
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=quick)
    try:
        h.node(1, ready=False)  # a verifier
        worker = h.node(0)
        for lost in range(AWAY_FORGIVEN + 1):
            await _paid_request(h)
            h.dispatcher.match()
            (offer,) = worker.offers()
            t = Trajectory(offer.offer.steps, seed=1)
            await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
            await next_of(worker, Challenge)
            h.dispatcher.node_left(worker.link, "stream reset")  # gone until the deadline
            job_id = offer.offer.job_id  # failed, then (after any strike) queued again:
            await until(lambda: _job_state(h, job_id) is JobState.QUEUED)  # noqa: B023
            struck = len(h.reputation.get(worker.wallet).strikes)
            assert struck == (1 if lost == AWAY_FORGIVEN else 0), lost
            worker = h.node(0)  # back, for the next job
    finally:
        h.close()


async def test_a_busy_refusal_with_one_challenge_open_is_struck(checked: Harness) -> None:
    """A cheater could say "busy" to every challenge it cannot pass, never struck. With
    fewer than `BUSY_BELIEVED` challenges open to it, "busy" is an ordinary refusal."""
    from sogni_protocol.messages import CHALLENGE_BUSY, ChallengeRefused

    h = checked
    await _paid_request(h)
    worker = h.node(0)
    h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    ch = await next_of(worker, Challenge)
    busy = ChallengeRefused(job_id=ch.job_id, reason=f"{CHALLENGE_BUSY} 64 challenges waiting")
    assert h.dispatcher.challenges.answered(worker.link.peer_id, busy)
    await until(lambda: bool(h.store.failed_receipts(offer.offer.job_id)))
    await until(lambda: len(h.reputation.get(worker.wallet).strikes) == 1)


def _job_state(h: Harness, job_id: bytes) -> JobState | None:
    job = h.dispatcher.jobs.get(job_id)
    return job.state if job is not None else h.store.job_state(job_id)


async def test_a_result_after_a_hand_back_is_checked_or_not_taken(checked: Harness) -> None:
    """Sampling looked only at RUNNING jobs: a node that handed a job back (no penalty) and
    then answered it with noise, while no other node had taken it (QUEUED), was stored,
    billed and delivered unchecked, and its "elapsed 0" made it the fastest node; so was a
    full result for a job the client cancelled. Now the first is refused when its draw says
    check (nothing owed, no strike); the second is held with its cancel (a restart resumes
    its check CANCELLING) and paid once the check passes (it was refused unpaid: an honest
    node that finished before the cancel reached it lost the render)."""
    h = checked
    sub, _ = await _paid_request(h, 2)
    worker = h.node(0, slots=2)
    verifier = h.node(1, ready=False)
    h.dispatcher.match()
    first, second = worker.offers()
    h.dispatcher.handed_back(worker.link, first.offer.job_id, "no slot")
    assert h.dispatcher.jobs[first.offer.job_id].state is JobState.QUEUED
    t = Trajectory(first.offer.steps, seed=1)
    with pytest.raises(ResultRefused, match="taken back"):
        await h.dispatcher.accept_result(worker.link, committed(worker, first, t))
    assert h.store.check_state(first.offer.job_id) is None
    assert h.store.unsettled_receipts() == [] and _earned(h, worker.wallet) == 0
    assert h.reputation.get(worker.wallet).strikes == []
    assert h.dispatcher.jobs[first.offer.job_id].state is JobState.QUEUED  # rendered again

    h.dispatcher.cancel_request(sub.accepted.request_id)  # type: ignore[attr-defined]
    assert h.dispatcher.jobs[second.offer.job_id].state is JobState.CANCELLING
    t2 = Trajectory(second.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, second, t2))
    assert h.store.check_state(second.offer.job_id) == "pending"
    (pending,) = h.store.pending_checks()
    assert pending.cancelled  # held with its cancel: a restart resumes it CANCELLING
    assert _earned(h, worker.wallet) == 0  # nothing paid before the check
    await answer_challenge(h, worker, t2)
    await answer_verify(h, verifier, t2, honest=True)
    await until(lambda: _earned(h, worker.wallet) > 0)
    assert h.store.check_state(second.offer.job_id) == "passed"
    assert h.reputation.get(worker.wallet).strikes == []
    assert _job_state(h, second.offer.job_id) is JobState.DONE


async def test_policy_samples_nothing_at_rate_zero_and_the_first_jobs(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    for policy, held in [
        (VerificationConfig(), [False, False, False]),
        (VerificationConfig(first_jobs=2, image_check=False), [True, True, False]),
    ]:
        folder = tmp_path / str(policy.first_jobs)
        folder.mkdir()
        h = Harness(folder / "coordinator.db", nursery, verification=policy)
        worker, verifier = h.node(0), h.node(1, ready=False)
        sub = await h.submit(request(3))
        seen = []
        for _ in range(3):
            h.dispatcher.ready(worker.link, 1)
            h.dispatcher.match()
            (offer,) = worker.offers()
            t = Trajectory(offer.offer.steps, seed=1)
            await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
            seen.append(h.store.check_state(offer.offer.job_id) == "pending")
            if seen[-1]:
                await answer_challenge(h, worker, t)
                await answer_verify(h, verifier, t, honest=True)
                await until(functools.partial(_check_passed, h, offer.offer.job_id))
        assert seen == held
        await until(sub.state.finished.is_set)
        h.close()


async def test_without_rerender_uncovered_receipts_are_released_at_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """`rerender = false`: a zero root, an unmeasured mode are not sampled even at rate 1."""
    policy = msgspec.structs.replace(ALL, rerender=False)
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=policy)
    sub, _ = await _paid_request(h, 2)
    worker, _verifier = h.node(0, slots=2), h.node(1, ready=False, **REFERENCE)
    h.dispatcher.match()
    a, b = worker.offers()
    await h.deliver(worker, a)  # no trajectory
    t = Trajectory(b.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, b, t, dtype="float16"))
    assert h.store.check_state(a.offer.job_id) is None
    assert h.store.check_state(b.offer.job_id) is None
    assert sub.state.finished.is_set()  # type: ignore[attr-defined]
    h.close()


# --- the whole re-render (docs/VERIFICATION.md, "Whole re-render") -----------------------
REFERENCE = {"mode": "float32", "version": RERENDER_FEATURE}
"""What a node able to re-render advertises."""


async def answer_rerender(h: Harness, verifier: FakeNode, image: bytes) -> VerifyRender:
    """The verifier's answer to the next `VerifyRender`: `image` as its render."""
    ask = await next_of(verifier, VerifyRender)
    reply = DecodeVerified(check_id=ask.check_id, image=image)
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)
    return ask


WEIGHTS_REFERENCE = {"mode": "float32", "version": f"{RERENDER_FEATURE} {RERENDER_WEIGHTS_FEATURE}"}
"""What a node able to re-render with a quantized worker's weights advertises."""


@pytest.mark.parametrize(
    ("declared", "weights"),
    [
        ("float16+quanto-int4@cuda-sm90-torch2.13", "float16+quanto-int4"),
        ("bfloat16+fp8+compiled@cuda-sm90-torch2.13", "bfloat16+fp8"),
        ("float32+quanto-int4@cuda-sm90-torch2.13", "float32+quanto-int4"),
        ("float8+fp8@cuda-sm90-torch2.13", "float32+fp8"),  # a dtype no node declares
    ],
)
async def test_a_4bit_or_fp8_receipt_is_rerendered_with_the_workers_weights(
    checked: Harness, declared: str, weights: str
) -> None:
    """A 4-bit or fp8 mode's rounding alone moves the picture (BENCHMARKS.md), so its
    re-render reproduces the worker's weights: asked only of a node naming
    `+rerender-weights`, never of a plain re-render node, with the weights named."""
    h = checked
    sub, _ = await _paid_request(h)
    worker = h.node(0)
    plain = h.node(1, ready=False, **REFERENCE)
    verifier = h.node(2, ready=False, **WEIGHTS_REFERENCE)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    result = committed(worker, offer, t, dtype=declared)
    await h.dispatcher.accept_result(worker.link, result)
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "pending"
    ask = await answer_rerender(h, verifier, result.image)
    assert ask.weights == weights and ask.dtype == "float32"
    await until(lambda: h.store.check_state(job_id) == "passed")
    assert not [m for m in plain.drain() if isinstance(m, VerifyRender)]
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["verifier"] == verifier.wallet


async def test_a_4bit_receipt_with_no_weights_verifier_is_skipped_and_released(
    checked: Harness,
) -> None:
    """Only plain re-render nodes serve the model: a 4-bit receipt is not re-rendered
    against plain weights (that would refuse honest nodes); skipped, released, paid."""
    h = checked
    sub, _ = await _paid_request(h)
    worker, plain = h.node(0), h.node(1, ready=False, **REFERENCE)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    mode = "float16+quanto-int4@cuda-sm90-torch2.13"
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t, dtype=mode))
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "skipped" and "float16+quanto-int4 weights" in line["reason"]
    assert not [m for m in plain.drain() if isinstance(m, VerifyRender)]
    await until(lambda: _earned(h, worker.wallet) > 0)


def test_a_verify_render_frame_names_weights_only_when_set() -> None:
    """Unset weights are not encoded: a `+rerender` node that predates the field (it refuses
    unknown fields) still reads every plain re-render."""
    params = JobParams(model_id="sogni-tiny-sd", positive_prompt="p", steps=2, guidance=4.0,
                       width=64, height=64, seed=1)  # fmt: skip
    plain = VerifyRender(
        check_id=b"\x01" * 32, model_id=params.model_id, params=params, dtype="float32",
        deadline=1,
    )  # fmt: skip
    assert "weights" not in msgspec.msgpack.decode(encode(plain))
    weighted = msgspec.structs.replace(plain, weights="bfloat16+fp8")
    assert decode(encode(weighted)) == weighted


def test_only_4bit_and_fp8_modes_need_the_workers_weights() -> None:
    for plain in ("float32", "bfloat16@cpu-avx2", "float16+int8@cuda-sm90", "float32+quanto-int8"):
        assert rerender_weights(plain) == ""
    assert rerender_weights("bfloat16+quanto-int4+compiled@cpu-avx2") == "bfloat16+quanto-int4"
    assert rerender_weights("float16@cuda-fp8") == ""  # only a mode part counts, not the path


@pytest.mark.parametrize("uncovered", ["no trajectory", "unmeasured mode"])
async def test_an_uncovered_receipt_is_rerendered_elsewhere_and_passes(
    checked: Harness, uncovered: str
) -> None:
    """No trajectory, or a declared mode with no step tolerance (CUDA float16): no
    challenge, a whole re-render on a float32 node of another wallet; its image matches:
    passed, delivered, paid, the verifier paid for every step."""
    h = checked
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False, **REFERENCE)
    h.node(2, ready=False)  # another wallet, but no `+rerender`: never asked
    h.dispatcher.match()
    (offer,) = worker.offers()
    if uncovered == "no trajectory":
        result = worker.result(offer)
    else:
        t = Trajectory(offer.offer.steps, seed=1)
        result = committed(worker, offer, t, dtype="float16@cuda-sm90-torch2.13")
    await h.dispatcher.accept_result(worker.link, result)
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "pending"
    ask = await answer_rerender(h, verifier, result.image)
    assert ask.params.model_id == offer.params.model_id and ask.dtype == "float32"
    assert ask.check_id != job_id
    await until(lambda: h.store.check_state(job_id) == "passed")
    assert not [m for m in worker.drain() if isinstance(m, Challenge)]
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["verifier"] == verifier.wallet
    assert line["distance"] == 0.0 and line["imageRule"] == "rerender"
    await until(lambda: _earned(h, worker.wallet) > 0)
    steps = offer.offer.steps  # a re-render is paid as every step of the job
    assert h.store.verifier_work([job_id]) == {job_id: [(verifier.wallet.lower(), steps)]}


@dataclass
class _HeldCuda:
    sub: object
    worker: FakeNode
    verifiers: tuple[FakeNode, FakeNode]
    offer: Offer
    trajectory: Trajectory
    result: Result

    @property
    def job_id(self) -> bytes:
        return self.offer.offer.job_id


async def _held_cuda_receipt(h: Harness, advert: dict[str, str]) -> _HeldCuda:
    """A paid request's one job, rendered by node 0 declaring CUDA float16 (no step
    tolerance) with a committed trajectory, and its receipt accepted (held for a re-render);
    nodes 1 and 2, of other wallets, advertise `advert`."""
    sub, _ = await _paid_request(h)
    worker = h.node(0)
    verifiers = (h.node(1, ready=False, **advert), h.node(2, ready=False, **advert))
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    result = committed(worker, offer, t, dtype="float16@cuda-sm90-torch2.13")
    await h.dispatcher.accept_result(worker.link, result)
    return _HeldCuda(sub, worker, verifiers, offer, t, result)


async def test_an_uncovered_receipt_whose_image_differs_fails_after_a_third_wallet(
    checked: Harness,
) -> None:
    """A node declaring an unmeasured mode delivers another image: the re-render differs,
    a third wallet's re-render agrees; the receipt fails (unpaid, struck, evidence kept),
    and the job is rendered again."""
    h = checked
    held = await _held_cuda_receipt(h, REFERENCE)
    sub, rogue, (first, third), job_id = held.sub, held.worker, held.verifiers, held.job_id
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")  # not the delivered
    asked: list[FakeNode] = []
    with trio.fail_after(10):
        while len(asked) < 2:
            for v in (first, third):
                for ask in (m for m in v.drain() if isinstance(m, VerifyRender)):
                    reply = DecodeVerified(check_id=ask.check_id, image=buf.getvalue())
                    assert h.dispatcher.verifications.answered(v.link.peer_id, reply)
                    asked.append(v)
            await trio.sleep(0.005)
    assert sorted(v.wallet for v in asked) == sorted([first.wallet, third.wallet])
    await until(lambda: h.store.failed_receipts(job_id) and h.reputation.get(rogue.wallet).strikes)
    ((_, worker, _, reason),) = h.store.failed_receipts(job_id)
    assert worker == rogue.wallet.lower() and "re-render" in reason
    assert h.store.job_state(job_id) is JobState.QUEUED
    assert _earned(h, rogue.wallet) == 0
    (line,) = log_lines(h)
    assert line["verdict"] == "fail" and line["distance"] > line["tolerance"]
    (stored,) = h.store.failed_evidence(job_id)
    ev = decode_evidence(stored)
    assert [s.kind for s in ev.steps] == ["render"]
    assert ev.steps[0].third is not None and not ev.steps[0].third.passed
    assert not sub.state.finished.is_set()  # type: ignore[attr-defined]


SEEDED = {"mode": "float32", "version": f"{RERENDER_FEATURE} {RERENDER_SEED_FEATURE}"}
"""What a node able to re-render with the seed check advertises."""


@pytest.mark.parametrize("d0", [0.0, 1.41])
async def test_a_rerendered_receipt_with_a_trajectory_is_seed_checked(
    checked: Harness, d0: float
) -> None:
    """An unmeasured mode's receipt commits a trajectory and a `+rerender-seed` node is
    connected: the worker opens leaf 0 (proved), the verifier gets it with the re-render and
    measures it against the seed. The same picture passes only at d0 = 0; at 1.41 (another
    seed's noise) a third wallet agrees and the receipt fails (unpaid, struck, leaf 0 kept as
    evidence). A passed one's leaf 0 rides along with the known render it becomes."""
    h = checked
    held = await _held_cuda_receipt(h, SEEDED)
    sub, worker, (first, third), job_id = held.sub, held.worker, held.verifiers, held.job_id
    offer, t, result = held.offer, held.trajectory, held.result
    await answer_challenge(h, worker, t)
    asked: list[VerifyRender] = []
    with trio.fail_after(10):
        while not asked or (d0 and len(asked) < 2):
            for v in (first, third):
                for ask in (m for m in v.drain() if isinstance(m, VerifyRender)):
                    reply = DecodeVerified(
                        check_id=ask.check_id, image=result.image, start_distance=d0
                    )
                    assert h.dispatcher.verifications.answered(v.link.peer_id, reply)
                    asked.append(ask)
            await trio.sleep(0.005)
    assert all(a.start_latents == t.tensor(0) for a in asked)
    if not d0:
        await until(lambda: h.store.check_state(job_id) == "passed")
        await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
        (line,) = log_lines(h)
        assert line["verdict"] == "pass" and "seed: leaf 0 within" in str(line["reason"])
        pool = h.dispatcher.checks.known_renders
        known = pool.draw(offer.params.model_id, "render:", "0x" + "00" * 20, random.Random(0))
        assert known is not None and known.start == t.tensor(0)
        return
    await until(lambda: h.store.failed_receipts(job_id) and h.reputation.get(worker.wallet).strikes)
    ((_, who, _, reason),) = h.store.failed_receipts(job_id)
    assert who == worker.wallet.lower() and "seed: leaf 0 is d0 = 1.41" in reason
    assert _earned(h, worker.wallet) == 0
    ev = decode_evidence(h.store.failed_evidence(job_id)[0])
    assert ev.challenge is not None and [o.step for o in ev.challenge.openings] == [0]


# --- the seed check (docs/VERIFICATION.md, "Seed check") ---------------------------------
@pytest.mark.parametrize("n_steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("pairs", [1, 2, MAX_PAIRS])
def test_choose_steps_with_start_always_opens_the_pair_0_1(n_steps: int, pairs: int) -> None:
    rng = random.Random(n_steps * 100 + pairs)
    for _ in range(200):
        leaves = choose_steps(n_steps, pairs, rng, start=True)
        assert leaves == sorted(set(leaves)) and {0, 1} <= set(leaves)
        assert len(leaves) <= MAX_CHALLENGE_STEPS and max(leaves) <= n_steps
        steps = [s for s in leaves if s >= 1 and s - 1 in leaves]
        # as many random pairs as asked (but step 1's place when 8 disjoint pairs are full)
        assert len(steps) >= min(pairs, n_steps, MAX_PAIRS)
    assert choose_steps(1, 1, rng, start=True) == [0, 1]
    assert 0 not in choose_steps(50, 1, random.Random(7))  # unchanged without `start`


async def test_every_check_opens_leaf_0_and_has_pair_0_1_verified(checked: Harness) -> None:
    h = checked
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    _, t = await _held(h, worker)
    ch = await next_of(worker, Challenge)
    assert {0, 1} <= set(ch.steps)
    answer = ChallengeAnswer(job_id=ch.job_id, openings=[t.opening(k) for k in ch.steps])
    assert h.dispatcher.challenges.answered(worker.link.peer_id, answer)
    ks = await answer_verify(h, verifier, t, honest=True)
    # step 1 first, then the drawn ones: 7 of 10 steps by default (catch_fraction 0.25,
    # confidence 0.99), 8 when step 1 was not among them
    assert ks[0] == 0 and ks == sorted(set(ks)) and 7 <= len(ks) <= 8
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "pass"


@pytest.mark.parametrize(
    ("start", "verdict"),
    [(0.0, "pass"), (5e-7, "pass"), (1.41, "fail"), (math.inf, "fail"), (None, "skipped")],
)
async def test_a_leaf_0_off_the_seed_fails_the_check(
    checked: Harness, start: float | None, verdict: str
) -> None:
    """Leaves that make honest steps (the verifier agrees on every step) but whose leaf 0 is
    not the seed's noise: another seed, or an older job replayed. A verifier that did not
    compare (no `start_distance`) is inconclusive: skipped, no strike."""
    h = checked
    sub, _ = await _paid_request(h)
    rogue, verifier = h.node(0), h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = rogue.offers()
    job_id = offer.offer.job_id
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(rogue.link, committed(rogue, offer, t))
    await answer_challenge(h, rogue, t)
    ks = await answer_verify(h, verifier, t, honest=True, start=start)
    assert ks[0] == 0
    (line,) = log_lines(h)
    assert line["verdict"] == verdict, line
    if verdict == "fail":
        await until(lambda: h.reputation.get(rogue.wallet).strikes)  # after the evidence
        assert len(ks) == 1  # the seed check decided it: no further step asked
        assert line["step"] == 0 and line["tolerance"] == SEED_TOLERANCE
        assert line["distance"] == (None if math.isinf(start or 0.0) else start)
        assert "seed" in str(line["reason"])
        ((_, worker, _, reason),) = h.store.failed_receipts(job_id)
        assert worker == rogue.wallet.lower() and "seed's noise" in reason
        assert len(h.reputation.get(rogue.wallet).strikes) == 1
        assert h.store.job_state(job_id) is JobState.QUEUED
        assert _earned(h, rogue.wallet) == 0
        assert not [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    else:
        await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
        assert h.reputation.get(rogue.wallet).strikes == []
        assert h.store.check_state(job_id) == ("passed" if verdict == "pass" else "skipped")
        if verdict == "skipped":
            assert "did not compare leaf 0" in str(line["reason"])


async def test_the_payer_s_own_node_never_checks_its_jobs(checked: Harness) -> None:
    """The only other wallet serving the model is the payer's: the check is skipped, never
    asked of it (it would be paid from the take of work it paid for, free Spark included)."""
    h = checked
    worker, payer_node = h.node(0), h.node(1, ready=False)
    assert h.ledger is not None
    h.ledger.credit_purchase(payer_node.wallet, 1)
    sub = await h.submit(authorize(request(1), payer_node.key, h.dispatcher.domain))
    offer, t = await _held(h, worker)
    await answer_challenge(h, worker, t)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    assert h.store.check_state(offer.offer.job_id) == "skipped"
    (line,) = log_lines(h)
    assert "no verifier" in str(line["reason"])
    assert not [m for m in payer_node.drain() if isinstance(m, VerifyStep)]
