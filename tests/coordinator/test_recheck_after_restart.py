"""A check pending when the coordinator stops is run again after the restart, not failed.

In-process (`conftest.Harness`: real SQLite, the dispatcher and its check tasks; fake nodes
that answer challenges with a real Merkle tree of made-up latents). The coordinator stops
with a held receipt; on the same database it restores the receipt as held (the client still
sees the job rendering, nothing billed), waits for the node that rendered it to reconnect,
checks it, and releases it: delivered and paid once. A node that never comes back within
`restart_recheck_timeout`, or comes back without the trajectory, fails the check closed,
without a strike, and the job is rendered again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from sogni_coordinator.checks import RESTART_REASON
from sogni_coordinator.job_state import JobState
from sogni_protocol.messages import Challenge, ChallengeRefused, VerifyRender

from .conftest import Harness
from .test_checks import (
    ALL,
    REFERENCE,
    Trajectory,
    _earned,
    _paid_request,
    answer_challenge,
    answer_rerender,
    answer_verify,
    committed,
    log_lines,
    next_of,
    until,
)


@pytest.fixture
async def short_wait(
    database: str, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[Harness]:
    """Every receipt checked; after a restart a node has 2 s to come back (each engine)."""
    policy = msgspec.structs.replace(ALL, restart_recheck_timeout=2.0)
    h = Harness(database, nursery, billing=True, verification=policy, folder=tmp_path)
    yield h
    h.close()


async def _held_then_restarted(
    h: Harness, *, cancelled: bool = False
) -> tuple[bytes, bytes, Trajectory, str]:
    """One paid job rendered by node 0, its receipt held (`cancelled`: then its client
    cancels); then the coordinator restarts. Returns (request id, job id, the committed
    trajectory, the worker's wallet)."""
    sub, _ = await _paid_request(h)
    worker = h.node(0)
    h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    job_id = offer.offer.job_id
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    assert h.store.check_state(job_id) == "pending"
    await next_of(worker, Challenge)  # the check had started: the coordinator dies now
    if cancelled:
        h.dispatcher.cancel_request(sub.accepted.request_id)  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()
    h.restart()
    assert h.dispatcher.restore() == 0  # nothing re-queued: the receipt is still held
    return sub.accepted.request_id, job_id, t, worker.wallet  # type: ignore[attr-defined]


async def test_a_check_pending_at_restart_runs_when_its_node_reconnects(
    short_wait: Harness,
) -> None:
    h = short_wait
    request_id, job_id, t, wallet = await _held_then_restarted(h)
    assert h.store.check_state(job_id) == "pending"
    assert h.dispatcher.job_counts()["running"] == 1  # the client sees it rendering
    assert h.store.unsettled_receipts() == [] and _earned(h, wallet) == 0
    assert h.store.request_record(request_id).queued == 1  # type: ignore[union-attr]
    box = h.dispatcher.mailboxes.get(request_id)
    assert box is not None and job_id not in box.pending  # not sent before its check
    worker = h.node(0, ready=False)  # the worker's node reconnects ...
    await trio.sleep(0.05)
    assert len(h.dispatcher.challenges) == 0  # ... the check waits for a verifier too
    verifier = h.node(1, ready=False)
    await answer_challenge(h, worker, t)
    await answer_verify(h, verifier, t, honest=True)
    await until(lambda: h.store.check_state(job_id) == "passed")
    await until(lambda: h.dispatcher.job_counts()["running"] == 0)  # released
    assert h.store.job_state(job_id) is JobState.DONE
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["worker"] == wallet
    # delivered once, to a client resuming with its token; paid once
    (record,) = [r for r in h.store.receipts() if r.receipt.job_id == job_id]
    assert [r.receipt.job_id for r in h.store.unsettled_receipts()] == [job_id]
    await until(lambda: _earned(h, wallet) > 0)
    earned = _earned(h, wallet)
    assert list(box.pending) == [job_id]
    path = h.dispatcher.results.path(request_id, record.index, record.receipt.offer_hash)
    assert path.exists()  # the restart's prune kept the held image
    h.restart()  # a second restart pays nothing again and re-checks nothing
    h.dispatcher.restore()
    assert h.dispatcher.checks.pending == {}
    assert _earned(h, wallet) == earned
    assert [r.receipt.job_id for r in h.store.unsettled_receipts()] == [job_id]


async def test_a_node_that_does_not_come_back_fails_the_check_closed_without_a_strike(
    short_wait: Harness,
) -> None:
    h = short_wait
    _, job_id, _, wallet = await _held_then_restarted(h)
    await until(lambda: h.dispatcher.job_counts()["queued"] == 1, timeout=10)
    ((_, _, _, reason),) = h.store.failed_receipts(job_id)
    assert reason.startswith(RESTART_REASON) and "did not reconnect within 2 s" in reason
    assert h.store.receipt(job_id) is None and h.store.unsettled_receipts() == []
    assert h.reputation.get(wallet).strikes == []
    assert _earned(h, wallet) == 0
    other = h.node(2)  # the job is rendered again
    h.dispatcher.match()
    (offer,) = other.offers()
    assert offer.offer.job_id == job_id


async def test_a_node_back_without_its_trajectory_fails_the_check_closed_without_a_strike(
    short_wait: Harness,
) -> None:
    h = short_wait
    _, job_id, _, wallet = await _held_then_restarted(h)
    worker = h.node(0, ready=False)
    ch = await next_of(worker, Challenge)
    gone = ChallengeRefused(job_id=ch.job_id, reason="no trajectory kept for this job")
    assert h.dispatcher.challenges.answered(worker.link.peer_id, gone)
    await until(lambda: bool(h.store.failed_receipts(job_id)))
    ((_, _, _, reason),) = h.store.failed_receipts(job_id)
    assert reason == f"{RESTART_REASON}: challenge: node refused: no trajectory kept for this job"
    assert h.reputation.get(wallet).strikes == []
    assert [x["verdict"] for x in log_lines(h)] == ["fail"]
    assert h.store.job_state(job_id) is JobState.QUEUED


async def test_a_rerender_pending_at_restart_runs_without_its_worker(short_wait: Harness) -> None:
    """A receipt checked by a whole re-render (here: no trajectory) needs nothing of its
    worker's node: after a restart it waits only for a node able to render it again."""
    h = short_wait
    await _paid_request(h)
    worker = h.node(0)
    first = h.node(1, ready=False, **REFERENCE)
    h.dispatcher.match()
    (offer,) = worker.offers()
    job_id = offer.offer.job_id
    result = worker.result(offer)  # no trajectory committed
    await h.dispatcher.accept_result(worker.link, result)
    await next_of(first, VerifyRender)  # the re-render had started: the coordinator dies now
    h.restart()
    assert h.dispatcher.restore() == 0
    assert h.store.check_state(job_id) == "pending"
    verifier = h.node(1, ready=False, **REFERENCE)  # the worker never comes back
    await answer_rerender(h, verifier, result.image)
    await until(lambda: h.store.check_state(job_id) == "passed")
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["verifier"] == verifier.wallet
    await until(lambda: _earned(h, worker.wallet) > 0)


async def test_a_cancel_while_held_survives_a_restart(short_wait: Harness) -> None:
    """The client cancels while a receipt is held; the coordinator restarts: the check came
    back with its job RUNNING, so a failed check re-queued it and it was rendered again for
    a cancelled request. The cancel is kept with the check now: the job comes back
    CANCELLING, and a check that fails ends it cancelled."""
    h = short_wait
    _, job_id, _, _ = await _held_then_restarted(h, cancelled=True)
    assert h.dispatcher.jobs[job_id].state is JobState.CANCELLING
    # its node never returns: the check fails closed, and the job ends cancelled
    await until(lambda: bool(h.store.failed_receipts(job_id)), timeout=10)
    await until(lambda: h.store.job_state(job_id) is JobState.CANCELLED)
    assert h.dispatcher.job_counts()["queued"] == 0  # never rendered again
