"""The dispatcher's lifecycle driven through its public API, on a fake clock and real SQLite:
deadlines, stragglers, the attempts limit, cancel with partial pay, restart restore."""

from __future__ import annotations

import struct
import zlib

import pytest
import trio
import trio.testing
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.dispatch import (
    MAX_ATTEMPTS,
    NEWCOMER_WORK_RATE,
    Refusal,
    ResultRefused,
    Submission,
)
from sogni_coordinator.job_state import JobState
from sogni_coordinator.ledger import partial_value, reserved_account, worker_account
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    JobFailed,
    JobImage,
    LoraRef,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    encode,
)
from sogni_protocol.pricing import quote

from .conftest import FLOOR, FakeNode, Harness, Offer, _png, events, request


def _job_state(h: Harness, job_id: bytes) -> JobState | None:
    job = h.dispatcher.jobs.get(job_id)
    return job.state if job is not None else h.store.job_state(job_id)


# --- submit -------------------------------------------------------------------------------
async def test_submit_commits_and_queues_one_job_per_image(coord: Harness) -> None:
    sub = await coord.submit(request(3))
    assert isinstance(sub.accepted, RequestAccepted)
    assert sub.accepted.cost_micro == 0  # billing off
    ids = sub.accepted.job_ids
    assert [s.job_id for s in coord.store.live_jobs()] == ids
    assert [j.job_id for j in coord.dispatcher.queue] == ids
    assert all(_job_state(coord, j) is JobState.QUEUED for j in ids)
    assert coord.dispatcher.job_counts() == {"queued": 3, "running": 0, "cancelling": 0}


async def test_submit_refuses_with_a_code_and_a_reason(coord: Harness) -> None:
    with pytest.raises(Refusal) as info:
        await coord.submit(request(model_id="not-served"))
    assert info.value.code == "unknown_model" and "not-served" in info.value.reason
    with pytest.raises(Refusal, match="no connected node has it"):  # no configured list
        await coord.dispatcher.submit(request(), client_peer="c", allowed_models=set())
    with pytest.raises(Refusal) as info:
        coord.dispatcher.account(None, "peer")  # type: ignore[arg-type]
    assert info.value.code == "billing_off"
    twice = [LoraRef(id="style"), LoraRef(id="style", strength=0.5)]
    with pytest.raises(Refusal) as info:  # every node would decline it, attempt after attempt
        await coord.submit(request(loras=twice))
    assert info.value.code == "invalid_request" and "listed twice" in info.value.reason
    assert coord.store.counts().get("queued", 0) == 0  # nothing refused was stored


async def test_a_blacklisted_wallet_cannot_join(coord: Harness) -> None:
    node = coord.node(0)
    for _ in range(5):
        coord.reputation.strike(node.wallet)
    coord.dispatcher.node_left(node.link, "bye")
    with pytest.raises(Refusal, match="blacklisted"):
        coord.node(0)


# --- deadlines and lost nodes ---------------------------------------------------------------
async def test_missed_deadline_cancels_requeues_and_costs_reputation(coord: Harness) -> None:
    sub = await coord.submit(request(1))
    (job_id,) = sub.accepted.job_ids
    a = coord.node(0)
    coord.dispatcher.match()
    (offer,) = a.offers()
    assert _job_state(coord, job_id) is JobState.RUNNING
    coord.clock.advance(FLOOR - 1)
    coord.dispatcher.sweep()
    assert a.cancels() == [] and _job_state(coord, job_id) is JobState.RUNNING
    coord.clock.advance(2)
    coord.dispatcher.sweep()
    assert [c.job_id for c in a.cancels()] == [job_id]
    assert not a.cancels()[0].pay_partial
    assert _job_state(coord, job_id) is JobState.QUEUED
    assert coord.store.live_jobs()[0].attempts == 1  # durable across a restart
    assert coord.reputation.get(a.wallet).failures == 1
    assert a.link.inflight == {}
    # another node takes it; the first node's late receipt still counts (work saved), once
    b = coord.node(1)
    coord.dispatcher.match()
    (copy,) = b.offers()
    assert copy.offer.job_id == job_id
    await coord.deliver(a, offer)
    assert _job_state(coord, job_id) is JobState.DONE
    assert coord.reputation.get(a.wallet).speed < 1.0  # late: a slow sample, never "instant"
    assert coord.reputation.get(a.wallet).work_rate == 0  # its time is unknown: no rate
    assert [c.job_id for c in b.cancels()] == [job_id]  # the other holder is stopped
    with pytest.raises(ResultRefused, match="already receipted"):
        await coord.deliver(b, copy)
    assert coord.reputation.get(b.wallet).failures == 0  # b no longer held it: no strike
    assert [type(m) for m in await events(sub)] == [JobImage]
    assert sub.state.finished.is_set() and sub.state.delivered == 1


async def test_a_node_still_stopping_a_job_is_not_offered_it_again(coord: Harness) -> None:
    """After a missed deadline the only capable node is still stopping the job: offered it
    again, it could only decline ("already running here"), and each decline spent one of the
    job's attempts, so a slow first render failed the job in milliseconds (session 19)."""
    sub = await coord.submit(request(1))
    (job_id,) = sub.accepted.job_ids
    a = coord.node(0)
    coord.dispatcher.match()
    assert len(a.offers()) == 1
    coord.clock.advance(FLOOR + 1)
    coord.dispatcher.sweep()
    assert [c.job_id for c in a.cancels()] == [job_id]
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    assert a.offers() == []  # kept from the node until it answers the cancel
    assert _job_state(coord, job_id) is JobState.QUEUED
    coord.dispatcher.handed_back(a.link, job_id, "cancelled by coordinator")
    coord.dispatcher.match()
    (again,) = a.offers()  # it has stopped: the job may go to it again
    assert again.offer.job_id == job_id
    assert coord.dispatcher.jobs[job_id].attempts == 1  # the deadline's, nothing more
    # a node that never answers a cancel gets the job back only after the grace
    coord.clock.advance(FLOOR + 1)
    coord.dispatcher.sweep()
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    assert a.offers() == []
    coord.clock.advance(coord.dispatcher.cancel_grace)
    coord.dispatcher.sweep()
    coord.dispatcher.match()
    assert [o.offer.job_id for o in a.offers()] == [job_id]
    assert coord.dispatcher.jobs[job_id].attempts == 2


async def test_a_node_that_leaves_gives_its_jobs_back_to_the_front(coord: Harness) -> None:
    first = await coord.submit(request(1))
    a = coord.node(0)
    coord.dispatcher.match()
    assert len(a.offers()) == 1
    second = await coord.submit(request(1))
    coord.dispatcher.node_left(a.link, "stream closed")
    assert [j.job_id for j in coord.dispatcher.queue if j.state is JobState.QUEUED] == [
        first.accepted.job_ids[0],
        second.accepted.job_ids[0],
    ]
    assert coord.reputation.get(a.wallet).failures == 1
    assert coord.dispatcher.nodes == {}


async def test_attempts_limit_fails_the_job_and_tells_the_client(coord: Harness) -> None:
    sub = await coord.submit(request(1))
    (job_id,) = sub.accepted.job_ids
    a = coord.node(0)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        coord.dispatcher.ready(a.link, 1)
        coord.dispatcher.match()
        (offer,) = a.offers()
        assert offer.offer.job_id == job_id
        coord.dispatcher.handed_back(a.link, job_id, "render failed")
        if attempt < MAX_ATTEMPTS:
            assert _job_state(coord, job_id) is JobState.QUEUED
    assert _job_state(coord, job_id) is JobState.FAILED
    assert coord.store.job_state(job_id) is JobState.FAILED
    (failed,) = await events(sub)
    assert isinstance(failed, JobFailed) and f"after {MAX_ATTEMPTS} attempts" in failed.reason
    assert "render failed" in failed.reason
    assert sub.state.finished.is_set() and sub.state.failed == 1
    assert coord.reputation.get(a.wallet).failures == 0  # hand-backs are not penalised
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    assert a.offers() == []


async def test_a_cancel_and_a_failure_are_told_only_once_stored(coord: Harness) -> None:
    """`RequestDone` (a cancel) and `JobFailed` (a give-up) reached the client while the
    jobs' end was only queued for the writer: a SIGKILL then, and the restarted coordinator
    rendered (and charged) the request its client was told had been cancelled."""
    cancelled = await coord.submit(request(1))
    failing = await coord.submit(request(1))
    a = coord.node(0)
    for _ in range(MAX_ATTEMPTS - 1):
        coord.dispatcher.match()
        (offer,) = a.offers()
        coord.dispatcher.handed_back(a.link, offer.offer.job_id, "render failed")
        coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    (last,) = a.offers()  # the job whose next hand-back is its last attempt
    other = cancelled if last.offer.job_id not in cancelled.accepted.job_ids else failing
    lock = coord.store._shared.rlock
    lock.acquire()  # the writer's group is slow (an fsync, another process's lock)
    try:
        coord.dispatcher.cancel_request(other.accepted.request_id)
        coord.dispatcher.handed_back(a.link, last.offer.job_id, "render failed")
        for sub in (cancelled, failing):
            assert await sub.events.next() is None  # nothing said: nothing stored yet
    finally:
        lock.release()
    await coord.dispatcher.durable()
    assert coord.store.job_state(other.accepted.job_ids[0]) is JobState.CANCELLED
    assert coord.store.job_state(last.offer.job_id) is JobState.FAILED
    told = [await sub.events.next() for sub in (cancelled, failing)]
    assert {type(m) for m in told} == {RequestDone, JobFailed}


async def test_a_job_no_connected_node_can_serve_fails_after_the_grace(coord: Harness) -> None:
    sub = await coord.submit(request(1))  # the model is configured: accepted without any node
    coord.dispatcher.sweep()  # the first sweep finds no node: the grace starts
    coord.clock.advance(coord.dispatcher.no_node_grace - 1)
    coord.dispatcher.sweep()
    assert await events(sub) == []
    coord.clock.advance(2)
    coord.dispatcher.sweep()
    (failed,) = await events(sub)
    assert isinstance(failed, JobFailed) and "no connected node can serve" in failed.reason
    assert coord.store.job_state(sub.accepted.job_ids[0]) is JobState.FAILED


async def test_a_momentary_gap_does_not_fail_a_long_queued_job(coord: Harness) -> None:
    """Found by the chaos soak: the grace counts from when no node could serve the job, not
    from when it was queued, so a job that waited its turn survives a node's restart."""
    sub = await coord.submit(request(2))
    a = coord.node(0)  # one slot: job 0 runs on it, job 1 waits in the queue
    coord.dispatcher.match()
    coord.clock.advance(coord.dispatcher.no_node_grace / 2)
    coord.dispatcher.sweep()
    coord.clock.advance(coord.dispatcher.no_node_grace / 2 + 1)  # job 1 queued > grace
    coord.dispatcher.sweep()
    assert await events(sub) == []  # a capable node was connected all along
    coord.dispatcher.node_left(a.link, "killed")  # the node dies; its restart is under way
    coord.dispatcher.sweep()  # the same instant: no node has been missing for any time
    assert not any(isinstance(m, JobFailed) for m in await events(sub))
    coord.clock.advance(coord.dispatcher.no_node_grace + 1)  # it stays away: now they fail
    coord.dispatcher.sweep()
    assert sum(isinstance(m, JobFailed) for m in await events(sub)) == 2


async def test_a_kept_result_answering_a_re_offer_is_no_speed_sample(coord: Harness) -> None:
    """A node answers a re-offer (after a restart or a reconnect) with the result it kept,
    finished long before this offer: it counted as a render of one round trip (the fastest
    node, its partial-pay rate raised, every straggler of the request copied)."""
    sub = await coord.submit(request(2))
    a = coord.node(0, slots=2)
    coord.dispatcher.match()
    kept, fresh = a.offers()
    coord.clock.advance(2)
    before = coord.clock() - 600  # rendered for an earlier offer, 10 minutes ago
    await coord.deliver(a, kept, completed_at=int(before))
    record = coord.reputation.get(a.wallet)
    assert record.jobs == 1 and record.work_rate == 0  # no rate measured from it
    assert sub.state.durations == []  # nor a straggler's measure
    await coord.deliver(a, fresh)  # rendered for this offer: 2 s
    assert coord.reputation.get(a.wallet).work_rate > 0 and sub.state.durations == [2.0]


# --- stragglers ------------------------------------------------------------------------------
async def test_a_straggler_is_copied_and_the_first_receipt_wins(coord: Harness) -> None:
    sub = await coord.submit(request(4))
    a = coord.node(0, slots=4)
    coord.dispatcher.match()
    offers = a.offers()
    assert len(offers) == 4
    coord.clock.advance(1)
    for offer in offers[:3]:
        await coord.deliver(a, offer)
    slow = offers[3]
    b = coord.node(1)
    coord.clock.advance(1.5)  # running 2.5 s against a median of 1 s: 2.5 > 2 x 1
    coord.dispatcher.sweep()
    (copy,) = b.offers()
    assert copy.offer.job_id == slow.offer.job_id
    job = coord.dispatcher.jobs[slow.offer.job_id]
    assert job.state is JobState.RUNNING and set(job.holders) == {a.link, b.link}
    coord.dispatcher.sweep()
    assert b.offers() == []  # one copy only
    await coord.deliver(b, copy)
    assert [c.job_id for c in a.cancels()] == [slow.offer.job_id]
    with pytest.raises(ResultRefused, match="already receipted"):
        await coord.deliver(a, slow)
    assert coord.reputation.get(a.wallet).failures == 0
    images = [m for m in await events(sub) if isinstance(m, JobImage)]
    assert sorted(m.index for m in images) == [0, 1, 2, 3]
    assert sub.state.finished.is_set() and sub.state.delivered == 4
    assert len(coord.store.receipts()) == 4


# --- cancel ---------------------------------------------------------------------------------
async def test_cancel_ends_queued_jobs_and_pays_running_ones_pro_rata(paid: Harness) -> None:
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    req = request(3)
    sub = await paid.submit(authorize(req, bytes(payer.key), paid.dispatcher.domain))
    per_image = quote(req).per_image.spark_micro
    assert sub.accepted.cost_micro == 3 * per_image
    a = paid.node(0)
    paid.dispatcher.match()
    (offer,) = a.offers()
    running, *queued = sub.accepted.job_ids
    assert offer.offer.job_id == running

    paid.dispatcher.cancel_request(sub.accepted.request_id)
    assert [(c.job_id, c.pay_partial) for c in a.cancels()] == [(running, True)]
    assert _job_state(paid, running) is JobState.CANCELLING
    assert paid.store.job_state(running) is JobState.CANCELLING  # a restart will not redo it
    assert all(paid.store.job_state(j) is JobState.CANCELLED for j in queued)
    paid.dispatcher.cancel_request(sub.accepted.request_id)  # twice: nothing more happens
    assert len(a.cancels()) == 1

    with pytest.raises(ResultRefused, match="no image"):  # partial means no image
        await paid.deliver(a, offer, steps_done=4, image=b"\x89PNG\r\n\x1a\n")
    # a bad result from the holder is a strike and lets go of the job: being cancelled, it ends
    assert len(paid.reputation.get(a.wallet).strikes) == 1
    assert _job_state(paid, running) is JobState.CANCELLED
    assert paid.store.receipts() == []
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]
    assert sub.state.finished.is_set() and sub.state.cancelled == 3
    assert paid.ledger.balance(payer.address)["spark_paid"] == 1_000_000  # all refunded


async def test_a_result_whose_session_ends_while_it_commits_is_settled_all_the_same(
    paid: Harness,
) -> None:
    # The node's session is cancelled (its stream reset, the node replaced) while the receipt
    # waits for its group commit: the write goes ahead, so must what follows it (delivery,
    # billing, the job's end), or the job is re-queued and every honest re-render refused.
    sub, a, offer, req, payer = await _offered_paid(paid)
    with trio.CancelScope() as session:
        session.cancel()  # delivered at the first wait: the queued receipt write's
        await paid.deliver(a, offer)
    assert not session.cancelled_caught  # it ran to its end
    paid.dispatcher.node_left(a.link, "stream reset")
    job_id = offer.offer.job_id
    assert _job_state(paid, job_id) is JobState.DONE
    assert [m.job_id for m in await events(sub) if isinstance(m, JobImage)] == [job_id]
    b = paid.node(1)
    paid.dispatcher.match()
    assert b.offers() == []  # nothing re-queued
    assert paid.reputation.get(a.wallet).strikes == []
    charged = quote(req).per_image.spark_micro
    assert paid.ledger is not None
    assert paid.ledger.balance(payer)["spark_paid"] == 1_000_000 - charged


async def test_an_image_whose_frame_to_the_client_would_be_over_the_limit_is_refused(
    coord: Harness,
) -> None:
    # A decodable PNG padded with a private chunk: the node's Result frame fits under the
    # limit, the client's JobImage (a few bytes more) would not; once committed, no client
    # could ever read it, and every resume would stop at it.
    def padded(size: int) -> bytes:  # a PNG of `size` bytes: a private chunk before IEND
        png = _png(64, 64)
        pad = size - len(png) - 12
        chunk = struct.pack(">I", pad) + b"prVt" + bytes(pad)
        return png[:-12] + chunk + struct.pack(">I", zlib.crc32(chunk[4:])) + png[-12:]

    sub = await coord.submit(request(1))
    a = coord.node(0)
    coord.dispatcher.match()
    (offer,) = a.offers()
    overhead = len(encode(a.result(offer, image=padded(100_000)))) - 100_000  # bin32 length
    result = a.result(offer, image=padded(RESULT_FRAME_LIMIT - overhead))
    assert len(encode(result)) == RESULT_FRAME_LIMIT  # the node's frame fits exactly
    with pytest.raises(ResultRefused, match=r"frame to the client would be \d+ bytes, over"):
        await coord.dispatcher.accept_result(a.link, result)
    assert coord.store.receipts() == []
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]


async def test_a_settlement_whose_write_failed_is_made_before_the_refund(paid: Harness) -> None:
    """A settlement's write failed with its group (a busy or lost database) and nothing
    retried it: the request's refund then closed the reservation, and the stored, accepted
    receipt could never be paid (the payer refunded its price). The refund settles every
    settlement of the request again first (idempotent per job)."""
    import sqlite3

    payer = Account.create()
    ledger = paid.ledger
    assert ledger is not None
    ledger.credit_purchase(payer.address, 1)
    await paid.submit(authorize(request(2), bytes(payer.key), paid.dispatcher.domain))
    a = paid.node(0, slots=2)
    paid.dispatcher.match()
    first, second = a.offers()
    real, failed = ledger.settle, []

    def settle_failing_once(*args: object, **kwargs: object) -> object:
        if not failed:
            failed.append(args)
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    ledger.settle = settle_failing_once  # type: ignore[method-assign]
    await paid.deliver(a, first)
    await paid.dispatcher.durable()
    assert failed  # the first settlement's write failed
    await paid.deliver(a, second)
    await paid.dispatcher.durable()
    settled = ledger.settled_jobs(0, float("inf"))
    assert len(settled) == 2 and {row[1] for row in settled} == {a.wallet.lower()}
    per_image = quote(request(2)).per_image.spark_micro
    assert ledger.balance(payer.address)["spark_paid"] < 1_000_000 - per_image  # both charged


async def test_a_holder_leaving_while_its_receipt_commits_does_not_give_the_job_up(
    paid: Harness, nursery: trio.Nursery
) -> None:
    """The last attempt's node left while its good receipt was being committed: the job was
    given up (JobFailed, the request refunded), then the receipt was stored and the node
    told "accepted": never delivered, never paid (the epoch refused it as ended unsettled).
    The release waits for the commit's outcome; a stored receipt ends the job as usual."""
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    sub = await paid.submit(authorize(request(1), bytes(payer.key), paid.dispatcher.domain))
    d = paid.dispatcher
    for i in range(MAX_ATTEMPTS - 1):
        n = paid.node(10 + i)
        d.match()
        (o,) = n.offers()
        d.handed_back(n.link, o.offer.job_id, "busy")
    last = paid.node(0)
    d.match()
    (offer,) = last.offers()
    accepted = trio.Event()

    async def deliver() -> None:
        await paid.deliver(last, offer)  # raises if refused
        accepted.set()

    lock = paid.store._shared.rlock
    lock.acquire()  # the writer's group is slow (an fsync, another process's lock)
    try:
        nursery.start_soon(deliver)
        with trio.fail_after(10):
            while not d._committing:
                await trio.sleep(0.01)
        d.node_left(last.link, "stream reset")  # the session ends while its receipt commits
        assert offer.offer.job_id in d.jobs  # not given up meanwhile
    finally:
        lock.release()
    with trio.fail_after(10):
        await accepted.wait()
    sent = await events(sub)
    assert [type(m) for m in sent] == [JobImage] and sub.state.delivered == 1
    assert sub.state.failed == 0
    assert len(paid.ledger.settled_jobs(0, float("inf"))) == 1  # the node is paid


async def test_a_partial_receipt_from_before_a_reconnect_is_measured_from_the_first_offer(
    coord: Harness,
) -> None:
    """A node renders 20 of 40 steps, its stream drops, it reconnects, the job is offered
    again and cancelled: the node answers with the partial receipt of its earlier session's
    render. Its steps were bounded by the time since the re-offer (0.5 s: at most 5 steps
    at its measured rate): the honest claim was refused with a strike."""
    big = {"width": 1024, "height": 1024, "steps": 40}
    a = coord.node(0)
    await _measured(coord, a, big)
    sub = await coord.submit(request(1, **big))
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    (first,) = a.offers()
    coord.clock.advance(5.0)  # 20 steps at that rate, then the stream drops
    coord.dispatcher.node_left(a.link, "stream reset")
    again_node = coord.node(0)  # the same peer and wallet, reconnected
    coord.dispatcher.match()
    (again,) = again_node.offers()
    assert again.offer.job_id == first.offer.job_id
    coord.dispatcher.cancel_request(sub.accepted.request_id)
    coord.clock.advance(0.5)
    await coord.deliver(again_node, again, steps_done=20)  # accepted: 20 of 40 paid
    assert coord.reputation.get(a.wallet).strikes == []
    assert _job_state(coord, first.offer.job_id) is JobState.CANCELLED


async def test_a_partial_receipt_is_paid_for_the_steps_done(paid: Harness) -> None:
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    req = request(2)
    sub = await paid.submit(authorize(req, bytes(payer.key), paid.dispatcher.domain))
    per_image = quote(req).per_image.spark_micro
    a = paid.node(0)
    paid.dispatcher.match()
    (offer,) = a.offers()
    paid.dispatcher.cancel_request(sub.accepted.request_id)
    paid.clock.advance(2.0)  # 4 of 10 steps of a tiny job: plenty of time for a newcomer
    await paid.deliver(a, offer, steps_done=4)
    (stored,) = paid.store.receipts()
    assert stored.receipt.steps_done == 4 and stored.receipt.work_units == (
        offer.offer.work_units * 4 // 10
    )
    assert paid.store.job_state(offer.offer.job_id) is JobState.CANCELLED
    charged = partial_value(per_image, 4, 10)
    assert paid.ledger.balance(payer.address)["spark_paid"] == 1_000_000 - charged
    assert sum(paid.ledger.balance(worker_account(a.wallet)).values()) > 0
    assert sum(paid.ledger.balance(reserved_account(sub.accepted.request_id)).values()) == 0
    assert not [m for m in await events(sub) if isinstance(m, JobImage)]
    assert (sub.state.delivered, sub.state.cancelled) == (0, 2)
    with pytest.raises(ResultRefused, match="already receipted"):  # paid once
        await paid.deliver(a, offer, steps_done=5)


async def test_a_scheduler_no_node_renders_is_refused_on_arrival(coord: Harness) -> None:
    """It was accepted and failed on every node it was offered to (an error each)."""
    coord.node(0)
    with pytest.raises(Refusal, match="unknown scheduler 'no_such'") as info:
        await coord.submit(request(1, scheduler="no_such"))
    assert info.value.code == "invalid_request"
    assert coord.dispatcher.jobs == {}
    await coord.submit(request(1, scheduler="euler_a"))  # one the network renders


async def test_a_handed_back_job_goes_to_another_node_first(coord: Harness) -> None:
    """A node failing every job at once (its disk full) handed each back and, free again
    at once, was offered the same jobs again: all their attempts spent in milliseconds."""
    sub = await coord.submit(request(1))
    broken = coord.node(0)
    coord.dispatcher.match()
    (offer,) = broken.offers()
    healthy = coord.node(1, ready=False)
    coord.dispatcher.handed_back(broken.link, offer.offer.job_id, "node error")
    coord.dispatcher.ready(broken.link, 1)  # it has credit first again
    coord.dispatcher.ready(healthy.link, 1)
    coord.dispatcher.match()
    assert broken.offers() == []
    (again,) = healthy.offers()
    assert again.offer.job_id == offer.offer.job_id
    await coord.deliver(healthy, again)
    assert sub.state.delivered == 1


async def _offered_paid(paid: Harness) -> tuple[Submission, FakeNode, Offer, RenderRequest, str]:
    """A paid request of 1 image, offered to node 0: (its submission, the node, the offer,
    the request, the payer's address)."""
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    req = request(1)
    sub = await paid.submit(authorize(req, bytes(payer.key), paid.dispatcher.domain))
    a = paid.node(0)
    paid.dispatcher.match()
    (offer,) = a.offers()
    return sub, a, offer, req, payer.address


async def _cancelled_while_rendering(
    paid: Harness,
) -> tuple[Submission, FakeNode, Offer, int, str]:
    """`_offered_paid`, then cancelled (the node was told); the image's price in its place."""
    sub, a, offer, req, payer = await _offered_paid(paid)
    paid.dispatcher.cancel_request(sub.accepted.request_id)
    return sub, a, offer, quote(req).per_image.spark_micro, payer


async def test_a_partial_receipt_after_the_stream_was_lost_is_paid(paid: Harness) -> None:
    """The node's stream drops with the cancel in flight: the job waits, still cancelling,
    for the partial receipt the node sends when it is back (it ended unpaid at once)."""
    sub, a, offer, _, _ = await _cancelled_while_rendering(paid)
    paid.clock.advance(2.0)
    paid.dispatcher.node_left(a.link, "stream reset")
    assert _job_state(paid, offer.offer.job_id) is JobState.CANCELLING
    back = paid.node(0)  # the same peer and wallet
    paid.dispatcher.match()
    assert back.offers() == []  # never offered again
    await paid.deliver(back, offer, steps_done=4)
    assert paid.store.job_state(offer.offer.job_id) is JobState.CANCELLED
    assert paid.ledger is not None
    assert sum(paid.ledger.balance(worker_account(a.wallet)).values()) > 0
    assert paid.reputation.get(a.wallet).strikes == []
    assert sub.state.cancelled == 1 and sub.state.remaining == 0


async def test_a_partial_receipt_after_a_restart_is_paid(paid: Harness) -> None:
    """The coordinator restarts while a cancelled job's node stops it: the offer kept with
    the cancel lets the job wait for that node's partial receipt, checked against it."""
    _, a, offer, per_image, payer = await _cancelled_while_rendering(paid)
    await paid.dispatcher.durable()
    paid.restart()
    paid.dispatcher.restore()
    paid.clock.advance(2.0)
    other = paid.node(1)  # another wallet cannot answer the offer made to node 0
    with pytest.raises(ResultRefused, match="offer was made to another node"):
        await paid.deliver(other, offer, steps_done=4)
    back = paid.node(0)
    await paid.deliver(back, offer, steps_done=4)
    assert paid.store.job_state(offer.offer.job_id) is JobState.CANCELLED
    assert paid.ledger is not None
    charged = partial_value(per_image, 4, 10)
    assert paid.ledger.balance(payer)["spark_paid"] == (1_000_000 - charged)
    assert sum(paid.ledger.balance(worker_account(a.wallet)).values()) > 0


async def test_a_cancelled_job_whose_node_says_goodbye_ends_at_once(paid: Harness) -> None:
    """A node leaving in order sent what it had first: nothing to wait for."""
    sub, a, offer, _, _ = await _cancelled_while_rendering(paid)
    paid.dispatcher.node_left(a.link, "node said goodbye: stopping", goodbye=True)
    assert _job_state(paid, offer.offer.job_id) is JobState.CANCELLED
    assert sub.state.cancelled == 1


async def test_a_cancelled_job_whose_node_never_comes_back_ends_unpaid(paid: Harness) -> None:
    sub, a, offer, _, _ = await _cancelled_while_rendering(paid)
    paid.dispatcher.node_left(a.link, "stream reset")
    paid.clock.advance(paid.dispatcher.partial_wait + 1)
    paid.dispatcher.sweep()
    assert _job_state(paid, offer.offer.job_id) is JobState.CANCELLED
    assert sub.state.cancelled == 1
    back = paid.node(0)
    with pytest.raises(ResultRefused):  # too late: nothing owed
        await paid.deliver(back, offer, steps_done=4)
    assert paid.ledger is not None
    assert sum(paid.ledger.balance(worker_account(a.wallet)).values()) == 0


async def test_a_partial_receipt_cannot_claim_more_steps_than_time_allows(
    coord: Harness,
) -> None:
    """The cheat: a client cancels at once and its own node claims nearly every step of a big
    job. The bound is the node's measured rate (or a generous newcomer rate), never its word."""
    big = {"width": 1024, "height": 1024, "steps": 40}
    a = coord.node(0)
    cheat = await coord.submit(request(1, **big))
    coord.dispatcher.match()
    (offer,) = a.offers()
    coord.dispatcher.cancel_request(cheat.accepted.request_id)
    with pytest.raises(ResultRefused, match="at most 1 at this node's newcomer's rate"):
        await coord.deliver(a, offer, steps_done=39)  # 0 s after the offer
    assert not coord.store.receipts()
    assert coord.reputation.get(a.wallet).strikes == []  # unmeasured: it may be fast
    # a node that never finished a job: twice the baseline GPU's rate, not 20x (forever)
    late = await coord.submit(request(1, **big))
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    (unmeasured,) = a.offers()
    coord.dispatcher.cancel_request(late.accepted.request_id)
    coord.clock.advance(2.0)
    per_step = unmeasured.offer.work_units / 40
    allowed = 1 + int(2.0 * NEWCOMER_WORK_RATE / per_step)
    assert allowed < 20 <= 1 + int(2.0 * 20_000 / per_step)  # what 20x allowed
    with pytest.raises(ResultRefused, match=f"at most {allowed} at this node's newcomer"):
        await coord.deliver(a, unmeasured, steps_done=20)

    honest = await _measured(coord, a, big)
    # 1 s after the next offer: at twice that rate, at most 1 + 8 steps
    third = await coord.submit(request(1, **big))
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    (offer,) = a.offers()
    coord.dispatcher.cancel_request(third.accepted.request_id)
    coord.clock.advance(1.0)
    with pytest.raises(ResultRefused, match="at most 9 at this node's measured speed"):
        await coord.deliver(a, offer, steps_done=20)
    assert len(coord.store.receipts()) == 1 and honest.accepted.job_ids
    assert len(coord.reputation.get(a.wallet).strikes) == 1  # measured: an overclaim is a lie


async def test_a_partial_receipt_for_a_running_job_is_refused_as_a_strike(
    coord: Harness,
) -> None:
    sub = await coord.submit(request(1))
    a = coord.node(0)
    coord.dispatcher.match()
    (offer,) = a.offers()
    with pytest.raises(ResultRefused, match="not cancelled"):
        await coord.deliver(a, offer, steps_done=3)
    assert coord.store.receipts() == []
    assert len(coord.reputation.get(a.wallet).strikes) == 1
    assert _job_state(coord, sub.accepted.job_ids[0]) is JobState.QUEUED  # re-queued


# --- restart --------------------------------------------------------------------------------
async def test_restart_requeues_live_jobs_and_never_ended_ones(coord_any: Harness) -> None:
    """Every job state persisted and restored, on each engine."""
    coord = coord_any
    main = await coord.submit(request(3))  # one done, one running, one queued
    cancelled_running = await coord.submit(request(1))
    cancelled_queued = await coord.submit(request(1))
    a = coord.node(0, slots=2)
    coord.dispatcher.match()
    first, second = a.offers()
    assert (first.offer.job_id, second.offer.job_id) == tuple(main.accepted.job_ids[:2])
    await coord.deliver(a, first)
    coord.dispatcher.ready(a.link, 2)  # one slot busy
    coord.dispatcher.match()
    (third,) = a.offers()
    assert third.offer.job_id == main.accepted.job_ids[2]
    coord.dispatcher.handed_back(a.link, third.offer.job_id, "shutdown")  # attempt 1 spent
    coord.dispatcher.ready(a.link, 2)  # one slot busy
    coord.dispatcher.match()
    (other,) = a.offers()
    assert other.offer.job_id == main.accepted.job_ids[2]  # back at the front
    coord.dispatcher.cancel_request(cancelled_queued.accepted.request_id)
    c = coord.node(2)
    coord.dispatcher.match()
    (doomed,) = c.offers()
    assert doomed.offer.job_id == cancelled_running.accepted.job_ids[0]
    coord.dispatcher.cancel_request(cancelled_running.accepted.request_id)  # CANCELLING

    coord.restart()  # nodes and clients are gone; every offer is void
    restored = coord.dispatcher.restore()
    live = main.accepted.job_ids[1:]
    assert restored == 2
    # the cancelled running job waits for its node's partial receipt, never offered again
    assert set(coord.dispatcher.jobs) == {*live, doomed.offer.job_id}
    assert coord.store.job_state(main.accepted.job_ids[0]) is JobState.DONE
    assert coord.store.job_state(doomed.offer.job_id) is JobState.CANCELLING
    coord.clock.advance(coord.dispatcher.partial_wait + 1)
    coord.dispatcher.sweep()  # none came: it ends cancelled, unpaid, not redone
    await coord.dispatcher.durable()
    assert coord.store.job_state(doomed.offer.job_id) is JobState.CANCELLED
    assert [s.job_id for s in coord.store.live_jobs()] == live
    assert {s.job_id: s.attempts for s in coord.store.live_jobs()}[live[1]] == 1

    b = coord.node(1, slots=4)
    coord.dispatcher.match()
    offers = b.offers()
    assert sorted(o.offer.job_id for o in offers) == sorted(live)
    for offer in offers:
        await coord.deliver(b, offer)
    # the client is gone: every image waits on disk for it (the first one, too)
    assert sorted(i for _, i, _ in coord.store.pending_deliveries()) == [0, 1, 2]
    assert len(list(coord.dispatcher.results.folder(main.accepted.request_id).iterdir())) == 3
    assert coord.store.live_jobs() == []
    assert coord.dispatcher.requests == {}
    # and a second restart has nothing to do
    coord.restart()
    assert coord.dispatcher.restore() == 0


async def test_a_cancelling_job_keeps_its_request_open_in_the_store(coord: Harness) -> None:
    """A coordinator adopting a request (several coordinators) settles and refunds it from
    `request_record`: a job still cancelling did not count as live, so the whole rest was
    refunded and the node's last receipt, when it came, went unpaid."""
    sub = await coord.submit(request(2))
    a = coord.node(0)
    coord.dispatcher.match()
    (offer,) = a.offers()
    coord.dispatcher.cancel_request(sub.accepted.request_id)
    await trio.testing.wait_all_tasks_blocked()
    assert coord.store.job_state(offer.offer.job_id) is JobState.CANCELLING
    record = coord.store.request_record(sub.accepted.request_id)
    assert record is not None and record.queued == 1  # the cancelling one; the other ended


async def test_a_cancel_looks_at_its_own_jobs_only(coord: Harness) -> None:
    """Every `CancelRequest` (a gateway's `jobError` too) walked every live job of every
    request; a repeated cancel of an ended request did the same for nothing."""

    class Counted(dict):  # type: ignore[type-arg]
        walks = 0

        def values(self):  # type: ignore[no-untyped-def,override]
            Counted.walks += 1
            return super().values()

    other = await coord.submit(request(3))
    mine = await coord.submit(request(2))
    coord.dispatcher.jobs = Counted(coord.dispatcher.jobs)
    coord.dispatcher.cancel_request(mine.accepted.request_id)
    coord.dispatcher.cancel_request(mine.accepted.request_id)  # again: ended, nothing to do
    coord.dispatcher.cancel_request(b"\x00" * 32)  # never here
    assert Counted.walks == 0
    assert mine.state.cancelled == 2 and mine.state.finished.is_set()
    assert all(_job_state(coord, j) is JobState.QUEUED for j in other.accepted.job_ids)


async def _measured(coord: Harness, node: FakeNode, big: dict[str, int]) -> Submission:
    """An honest full render teaches the coordinator the node's rate: 40 steps in 10 s."""
    sub = await coord.submit(request(1, **big))
    coord.dispatcher.ready(node.link, 1)
    coord.dispatcher.match()
    (offer,) = node.offers()
    coord.clock.advance(10.0)
    await coord.deliver(node, offer)
    return sub
