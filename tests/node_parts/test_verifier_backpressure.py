"""A coordinator's burst of verifier checks never piles up on a node: at most
`MAX_CHECKS_WAITING` are held (running or waiting their turn), the rest are refused at once
with a code that blames no worker, and a check whose deadline passes while it waits is
refused instead of run (`PullSession._verifier_work`)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import trio
from eth_account import Account

from sogni_node.pull import (
    MAX_CHALLENGES_WAITING,
    MAX_CHECKS_WAITING,
    NodeIdentity,
    PullSession,
)
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Capabilities,
    Challenge,
    ChallengeRefused,
    DecodeVerified,
    JobParams,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
    VerifyStep,
)

DOMAIN = Domain(31337, "0x" + "22" * 20)
ACCOUNT = Account.create()


def _session(max_pixels: int = 0, models: list[str] | None = None) -> PullSession:
    identity = NodeIdentity(ACCOUNT.address, bytes(ACCOUNT.key), DOMAIN, frozenset())
    caps = Capabilities(
        peer_id="peer-v",
        wallet=ACCOUNT.address,
        expiry=2_000_000_000,
        models=models or ["m"],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=max_pixels,
    )
    return PullSession(None, "addr", identity, None, None, caps)  # type: ignore[arg-type]


def _check(deadline: float) -> VerifyDecode:
    latents = TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=bytes(1024))
    leaf = StepOpeningWire(
        step=8,
        tensors=[latents],
        scalars=[ScalarEntry(name="timestep", value=1)],
        proof=[],
        n_leaves=9,
    )
    return VerifyDecode(
        check_id=os.urandom(32),
        model_id="m",
        dtype="float32",
        width=64,
        height=64,
        opening=leaf,
        deadline=int(deadline),
    )


async def test_a_burst_of_checks_is_held_up_to_the_limit_and_the_rest_refused_at_once() -> None:
    session = _session()
    release = threading.Event()
    ran: list[bytes] = []

    def work(msg: Any) -> DecodeVerified:  # one slow decode, in the worker thread
        release.wait(30)
        ran.append(msg.check_id)
        return DecodeVerified(check_id=msg.check_id, image=b"png")

    burst = MAX_CHECKS_WAITING + 5
    msgs = [_check(time.time() + 60) for _ in range(burst)]
    replies: dict[bytes, DecodeVerified | VerifyRefused] = {}

    async def one(msg: VerifyDecode) -> None:
        reply = await session._verifier_work(msg, work, "decode_failed", "could not decode")
        replies[msg.check_id] = cast(DecodeVerified | VerifyRefused, reply)

    async with trio.open_nursery() as nursery:
        for msg in msgs:
            nursery.start_soon(one, msg)
        with trio.fail_after(10):  # the extra ones are answered while the first still runs
            while len(replies) < burst - MAX_CHECKS_WAITING:
                await trio.sleep(0.01)
        refused = [r for r in replies.values() if isinstance(r, VerifyRefused)]
        assert len(refused) == burst - MAX_CHECKS_WAITING and not ran
        assert all(r.code == "other" and r.reason.startswith("busy:") for r in refused)
        release.set()
    done = [r for r in replies.values() if isinstance(r, DecodeVerified)]
    assert len(done) == MAX_CHECKS_WAITING == len(ran)
    assert session._checks_waiting == 0
    # held again from zero: a later check is not refused for the burst that has gone
    again = await session._verifier_work(
        _check(time.time() + 60), work, "decode_failed", "could not decode"
    )
    assert isinstance(again, DecodeVerified)


async def test_a_check_whose_deadline_passes_while_it_waits_is_refused_not_run() -> None:
    session = _session()
    release = threading.Event()
    ran: list[bytes] = []

    def work(msg: Any) -> DecodeVerified:
        release.wait(30)
        ran.append(msg.check_id)
        return DecodeVerified(check_id=msg.check_id, image=b"png")

    first, soon = _check(time.time() + 60), _check(time.time() + 2)
    replies: dict[bytes, Any] = {}

    async def one(msg: VerifyDecode) -> None:
        replies[msg.check_id] = await session._verifier_work(msg, work, "f", "could not")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, first)
        await trio.sleep(0.1)
        nursery.start_soon(one, soon)  # waits behind `first` past its deadline
        await trio.sleep(max(0.0, soon.deadline - time.time()) + 0.2)
        release.set()
    assert isinstance(replies[first.check_id], DecodeVerified)
    late = replies[soon.check_id]
    assert isinstance(late, VerifyRefused) and late.code == "deadline"
    assert ran == [first.check_id]


def test_a_step_check_over_max_pixels_is_refused_like_a_decode(tmp_path: Path) -> None:
    """`VerifyStep` ignored `max_pixels` (decode and re-render checked it): a node that
    advertises 512x512 ran a UNet step at 2048x2048 for any coordinator that asked."""
    from sogni_node.models.defaults import default_registry
    from sogni_node.render.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(default_registry(tmp_path, test_model=True), threads=1)
    session = _session(max_pixels=512 * 512, models=["sogni-tiny-sd"])
    session.worker = cast(Any, SimpleNamespace(backend=backend))
    params = JobParams(
        model_id="sogni-tiny-sd",
        positive_prompt="p",
        steps=10,
        guidance=5.0,
        width=2048,
        height=2048,
        seed=1,
    )
    step = VerifyStep(
        check_id=os.urandom(32),
        model_id="sogni-tiny-sd",
        params=params,
        scheduler="",
        dtype=backend.dtype_name,
        k=8,
        opening=_check(time.time() + 60).opening,
        deadline=int(time.time() + 60),
    )
    refused = session._serving_refusal(step, "re-run a step")
    assert refused is not None and refused.code == "too_large"
    assert "2048x2048" in refused.reason
    small = msgspec.structs.replace(
        step, params=msgspec.structs.replace(params, width=512, height=512)
    )
    assert session._serving_refusal(small, "re-run a step") is None


async def test_a_flood_of_challenges_is_bounded_and_dropped_once_the_session_ends() -> None:
    """Each `Challenge` started a task with no bound, no deadline check and no check of the
    session: 100k small frames became 100k trajectory loads that outlived the session."""
    session = _session()
    release = threading.Event()
    answered: list[bytes] = []
    sent: list[object] = []

    def answer(msg: Challenge) -> ChallengeRefused:  # one slow trajectory load at a time
        release.wait(30)
        answered.append(msg.job_id)
        return ChallengeRefused(job_id=msg.job_id, reason="no trajectory")

    session._answer = answer  # type: ignore[method-assign]
    session.send = sent.append  # type: ignore[method-assign,assignment]
    flood = [
        Challenge(job_id=os.urandom(32), steps=[1], deadline=int(time.time() + 60))
        for _ in range(MAX_CHALLENGES_WAITING + 10)
    ]
    async with trio.open_nursery() as nursery:
        for msg in flood:
            nursery.start_soon(session._on_challenge, msg)
        with trio.fail_after(10):  # the extra ones are refused while the first still loads
            while len(sent) < 10:
                await trio.sleep(0.01)
        assert all(isinstance(m, ChallengeRefused) and "busy" in m.reason for m in sent)
        session.closed.set()  # the session ends: those waiting are dropped, not answered
        release.set()
    assert len(answered) == 1 and session._challenges_waiting == 0
    assert len(sent) == 11


def test_a_cancel_stops_only_a_render_this_session_claimed() -> None:
    """Two coordinators offered one job id (a cluster's failover): B's job waits for A's
    render of it. B's `Cancel(pay_partial)` stopped A's render, whose partial receipt A
    then refused as "not cancelled", a strike for an honest node."""
    from sogni_node.pull import _Job
    from sogni_node.worker import Worker
    from sogni_protocol.messages import Cancel, JobOffer, Offer

    class _Backend:
        name = "test"

    worker = Worker(cast(Any, _Backend()), slots=2)
    job_id = os.urandom(32)
    theirs = worker.claim(job_id)  # session A's render
    session = _session()
    session.worker = worker
    offer = JobOffer(
        job_id=job_id,
        coordinator="0x" + "33" * 20,
        model_id="m",
        params_hash=bytes(32),
        steps=4,
        width=64,
        height=64,
        seed=1,
        work_units=1,
        deadline=2_000_000_000,
    )
    params = JobParams(
        model_id="m", positive_prompt="p", steps=4, guidance=4.0, width=64, height=64, seed=1
    )
    waiting = _Job(Offer(offer=offer, params=params, signature=bytes(65)), bytes(32), None)
    session._live[job_id] = waiting  # B's job, waiting for A's render to end
    session.coordinator = "0x" + "33" * 20
    theirs.owner = _session()  # a live session of another coordinator
    theirs.owner.coordinator = "0x" + "44" * 20
    session._on_cancel(Cancel(job_id=job_id, pay_partial=True))
    assert not theirs.cancel.is_set() and job_id in session._cancelled
    theirs.owner.closed.set()  # ended, but another coordinator's (a cluster's failover)
    session._on_cancel(Cancel(job_id=job_id))
    assert not theirs.cancel.is_set()
    theirs.owner.coordinator = session.coordinator  # this coordinator's own, reconnected:
    session._on_cancel(Cancel(job_id=job_id))  # nobody else will stop it
    assert theirs.cancel.is_set()
    theirs.cancel.clear()
    mine = _Job(waiting.msg, bytes(32), theirs)  # had this session claimed it: stopped
    session._live[job_id] = mine
    session._on_cancel(Cancel(job_id=job_id, pay_partial=True))
    assert theirs.cancel.is_set() and theirs.pay_partial
