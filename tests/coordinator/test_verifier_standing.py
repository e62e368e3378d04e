"""Checking the verifiers (docs/VERIFICATION.md, "Checking the verifiers"): a third wallet's
re-run, known-answer probes, standing, verifier work and the evidence of a failed check.

In-process (`conftest.Harness`), with fake verifier nodes that answer each `VerifyStep`
either honestly (the next leaf of whichever known trajectory the asked leaf belongs to) or
lazily (leaf k echoed back: d = 1.0, over any tolerance)."""

from __future__ import annotations

import io
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
from PIL import Image

from sogni_coordinator.checks import OVERRULED, PROBE_FAILED
from sogni_coordinator.evidence import decode_evidence
from sogni_coordinator.job_state import JobState
from sogni_coordinator.known_answers import KnownAnswer, KnownAnswers, KnownRender
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifier_standing import VerifierStanding
from sogni_protocol.messages import (
    Challenge,
    ChallengeRefused,
    DecodeVerified,
    JobImage,
    JobParams,
    Offer,
    StepVerified,
    VerifyDecode,
    VerifyRefused,
    VerifyRender,
    VerifyStep,
)

from .conftest import MODEL, FakeNode, Harness, events, request
from .test_checks import (
    REFERENCE,
    WEIGHTS_REFERENCE,
    Trajectory,
    _earned,
    _paid_request,
    answer_challenge,
    committed,
    log_lines,
    next_of,
    until,
)

POLICY = VerificationConfig(
    rate=1.0, challenge_timeout=5.0, verify_timeout=5.0, image_check=False, probe_rate=0.0
)


@pytest.fixture
async def h(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=POLICY)
    yield harness
    harness.close()


def _reply(ask: VerifyStep, known: list[Trajectory], honest: bool) -> StepVerified:
    """Honest: the next leaf of the known trajectory whose leaf k was sent (the verifier
    would compute exactly that). Lazy: leaf k echoed back."""
    leaf = next(t for t in ask.opening.tensors if t.name == "latents")
    if honest:
        (t,) = [t for t in known if t.leaves[ask.k] == leaf.data]
        latents = t.tensor(ask.k + 1)
    else:
        latents = leaf
    return StepVerified(
        check_id=ask.check_id, latents=latents, start_distance=0.0 if ask.k == 0 else None
    )


async def serve(
    h: Harness, node: FakeNode, known: list[Trajectory], *, honest: bool, n: int = 1
) -> list[VerifyStep]:
    """Answer the next `n` `VerifyStep`s sent to `node` (each waits for the one before)."""
    asked = []
    for _ in range(n):
        ask = await next_of(node, VerifyStep)
        asked.append(ask)
        assert h.dispatcher.verifications.answered(node.link.peer_id, _reply(ask, known, honest))
    return asked


async def serve_until_done(
    h: Harness, node: FakeNode, known: list[Trajectory], *, honest: bool
) -> int:
    """Answer every `VerifyStep` to `node` until no check is pending; how many."""
    count = 0
    while h.dispatcher.checks.pending:
        for msg in node.drain():
            if isinstance(msg, VerifyStep):
                reply = _reply(msg, known, honest)
                assert h.dispatcher.verifications.answered(node.link.peer_id, reply)
                count += 1
        await trio.sleep(0.005)
    return count


async def _held(h: Harness, worker: FakeNode, seed: int = 1) -> tuple[Offer, Trajectory]:
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=seed)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    return offer, t


def _prime(h: Harness, worker: str, verifier: str, seed: int = 50) -> Trajectory:
    """A known answer in the pool: step 2 of an earlier job that `worker` rendered and
    `verifier` agreed with."""
    t = Trajectory(10, seed=seed)
    params = JobParams(
        model_id=MODEL,
        positive_prompt="an earlier job",
        steps=10,
        guidance=4.0,
        width=64,
        height=64,
        seed=3,
    )
    h.dispatcher.checks.known.add(
        KnownAnswer(
            worker=worker.lower(),
            verifier=verifier.lower(),
            params=params,
            scheduler="",
            dtype="float32",
            opening_k=t.opening(2),
            opening_next=t.opening(3),
        )
    )
    return t


def _work(h: Harness, job_id: bytes) -> dict[str, int]:
    return dict(h.store.verifier_work([job_id]).get(job_id, []))


async def test_a_fail_overruled_by_a_third_wallet_costs_the_verifier_its_standing(
    h: Harness,
) -> None:
    sub, _ = await _paid_request(h)
    worker, lazy = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, t)
    ask = await next_of(lazy, VerifyStep)  # the lazy verifier is the only one asked first
    third = h.node(2, ready=False)  # a third wallet joins before it answers
    assert h.dispatcher.verifications.answered(lazy.link.peer_id, _reply(ask, [t], False))
    n = await serve_until_done(h, third, [t], honest=True)
    assert n >= 1  # the overruling re-run, and any later step
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["verifier"] == third.wallet
    assert OVERRULED in str(line["reason"])
    assert h.reputation.get(worker.wallet).strikes == []
    assert h.store.check_state(job_id) == "passed"
    assert [m.job_id for m in await events(sub) if isinstance(m, JobImage)] == [job_id]
    await until(lambda: _earned(h, worker.wallet) > 0)
    standing = h.dispatcher.checks.standing
    assert not standing.has_standing(lazy.wallet) and standing.has_standing(third.wallet)
    # its answer is not paid; the third's re-runs are, one step each
    assert _work(h, job_id) == {third.wallet.lower(): n}
    assert h.store.failed_evidence(job_id) == []
    # the next check never asks the lazy verifier
    sub2, _ = await _paid_request(h)
    h.dispatcher.ready(worker.link, 1)
    offer2, t2 = await _held(h, worker, seed=2)
    await answer_challenge(h, worker, t2)
    await serve_until_done(h, third, [t2], honest=True)
    assert not [m for m in lazy.drain() if isinstance(m, VerifyStep)]
    del sub2, offer2


async def test_a_fail_confirmed_by_a_third_wallet_stands_with_evidence(h: Harness) -> None:
    sub, _ = await _paid_request(h)
    rogue, first, third = h.node(0), h.node(1, ready=False), h.node(2, ready=False)
    offer, t = await _held(h, rogue)
    job_id = offer.offer.job_id
    truth = Trajectory(offer.offer.steps, seed=1)
    # what the verifiers compute: the next leaf of ANOTHER trajectory that shares leaf k
    await answer_challenge(h, rogue, t)

    async def honest_disagrees(node: FakeNode) -> None:
        ask = await next_of(node, VerifyStep)
        other = Trajectory(len(truth.leaves) - 1, seed=5)
        reply = StepVerified(
            check_id=ask.check_id, latents=other.tensor(ask.k + 1), start_distance=0.0
        )
        assert h.dispatcher.verifications.answered(node.link.peer_id, reply)

    async with trio.open_nursery() as nursery:  # whichever is drawn first, the other re-runs
        nursery.start_soon(honest_disagrees, first)
        nursery.start_soon(honest_disagrees, third)
    await until(lambda: h.store.failed_receipts(job_id) and h.reputation.get(rogue.wallet).strikes)
    (line,) = log_lines(h)
    assert line["verdict"] == "fail" and line["worker"] == rogue.wallet
    assert h.store.job_state(job_id) is JobState.QUEUED
    standing = h.dispatcher.checks.standing
    assert standing.has_standing(first.wallet) and standing.has_standing(third.wallet)
    assert _work(h, job_id) == {first.wallet.lower(): 1, third.wallet.lower(): 1}
    (raw,) = h.store.failed_evidence(job_id)
    ev = decode_evidence(raw)
    assert ev.reason.startswith("step 0: d = ") and "over" in ev.reason
    assert ev.challenge is not None and ev.challenge.job_id == job_id
    assert {o.step for o in ev.challenge.openings} >= {0, 1}
    (step,) = ev.steps
    assert step.step == 0 and step.kind == "step" and step.third is not None
    assert {step.first.verifier, step.third.verifier} == {first.wallet, third.wallet}
    assert step.first.distance is not None and step.first.distance > step.first.tolerance
    assert step.first.latents is not None and step.first.latents.shape == t.tensor(1).shape
    assert step.probe_passed is None
    del sub


@pytest.mark.parametrize("primed", [True, False])
async def test_two_wallets_a_lazy_verifier_is_caught_by_a_known_answer_probe(
    h: Harness, primed: bool
) -> None:
    """No third wallet: the fail is confirmed by probing the verifier with a step whose
    answer is known. The lazy verifier echoes the probe too: it loses standing and the
    honest worker is released unstruck. With nothing in the pool the fail stands: in a
    two-wallet network with no history nobody can tell who lies (documented limit)."""
    sub, _ = await _paid_request(h)
    worker, lazy = h.node(0), h.node(1, ready=False)
    known = _prime(h, "0x" + "11" * 20, "0x" + "22" * 20) if primed else None
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, t)
    asked = await serve(h, lazy, [t], honest=False)
    if primed:
        assert known is not None
        (probe,) = await serve(h, lazy, [t, known], honest=False)
        assert probe.k == 2 and probe.check_id != asked[0].check_id
        await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
        (line,) = log_lines(h)
        assert line["verdict"] == "skipped" and "no verifier" in str(line["reason"])
        assert PROBE_FAILED in str(line["reason"])
        assert h.reputation.get(worker.wallet).strikes == []
        assert not h.dispatcher.checks.standing.has_standing(lazy.wallet)
        assert _work(h, job_id) == {}  # the discarded answer and the probe are unpaid
        await until(lambda: _earned(h, worker.wallet) > 0)
    else:
        await until(lambda: h.reputation.get(worker.wallet).strikes)
        (raw,) = h.store.failed_evidence(job_id)
        assert decode_evidence(raw).steps[0].probe_passed is None
        assert h.dispatcher.checks.standing.has_standing(lazy.wallet)


async def test_a_verifier_that_passes_the_probe_confirms_its_fail(h: Harness) -> None:
    sub, _ = await _paid_request(h)
    rogue, verifier = h.node(0), h.node(1, ready=False)
    known = _prime(h, "0x" + "11" * 20, "0x" + "22" * 20)
    offer, t = await _held(h, rogue)
    job_id = offer.offer.job_id
    await answer_challenge(h, rogue, t)
    other = Trajectory(offer.offer.steps, seed=5)
    ask = await next_of(verifier, VerifyStep)
    reply = StepVerified(check_id=ask.check_id, latents=other.tensor(ask.k + 1), start_distance=0)
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)
    await serve(h, verifier, [known], honest=True)  # the probe, answered right
    await until(lambda: h.reputation.get(rogue.wallet).strikes)
    (raw,) = h.store.failed_evidence(job_id)
    assert decode_evidence(raw).steps[0].probe_passed is True
    assert h.dispatcher.checks.standing.has_standing(verifier.wallet)
    assert _work(h, job_id) == {verifier.wallet.lower(): 1}
    del sub


@pytest.mark.parametrize("probe_honest", [True, False])
async def test_answers_are_probed_at_probe_rate(
    tmp_path: Path, nursery: trio.Nursery, probe_honest: bool
) -> None:
    """probe_rate = 1: every answer is followed by a probe of the same verifier; probes
    are not paid. A verifier honest on real steps but wrong on a probe still loses
    standing, and its answers count for nothing (the check is skipped)."""
    policy = VerificationConfig(
        rate=1.0, challenge_timeout=5.0, verify_timeout=5.0, image_check=False, probe_rate=1.0
    )
    h = Harness(tmp_path / "c.db", nursery, billing=True, verification=policy)
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    known = _prime(h, "0x" + "11" * 20, "0x" + "22" * 20)
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, t)
    real = probes = 0
    while h.dispatcher.checks.pending:
        for msg in verifier.drain():
            if isinstance(msg, VerifyStep):
                is_probe = msg.params.positive_prompt == "an earlier job"
                probes += is_probe
                real += not is_probe
                reply = _reply(msg, [t, known], honest=probe_honest or not is_probe)
                assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)
        await trio.sleep(0.005)
    (line,) = log_lines(h)
    assert h.reputation.get(worker.wallet).strikes == []
    if probe_honest:
        assert line["verdict"] == "pass" and probes == real >= 1
        assert _work(h, job_id) == {verifier.wallet.lower(): real}
        # the passed steps joined the pool (the verifier never gets its own back)
        assert len(h.dispatcher.checks.known) == 1 + real
    else:
        assert line["verdict"] == "skipped" and probes == real == 1
        assert not h.dispatcher.checks.standing.has_standing(verifier.wallet)
        assert _work(h, job_id) == {}
    del sub
    h.close()


@pytest.mark.parametrize(("code", "verdict"), [("bad_leaf", "fail"), ("mode", "skipped")])
async def test_refusal_codes(h: Harness, code: str, verdict: str) -> None:
    """Only `bad_leaf` (the worker's leaf cannot be re-run) is held against the worker."""
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    await answer_challenge(h, worker, t)
    ask = await next_of(verifier, VerifyStep)
    refusal = VerifyRefused(check_id=ask.check_id, reason="could not", code=code)  # type: ignore[arg-type]
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, refusal)
    await until(lambda: log_lines(h))
    (line,) = log_lines(h)
    assert line["verdict"] == verdict and line["reason"] == "verifier refused: could not"
    if verdict == "fail":
        await until(lambda: h.reputation.get(worker.wallet).strikes)
        (raw,) = h.store.failed_evidence(offer.offer.job_id)
        assert decode_evidence(raw).steps[0].first.code == "bad_leaf"
    del sub


async def test_a_refused_challenge_keeps_the_refusal_as_evidence(h: Harness) -> None:
    sub, _ = await _paid_request(h)
    rogue = h.node(0)
    h.node(1, ready=False)
    offer, _t = await _held(h, rogue)
    job_id = offer.offer.job_id
    ch = await next_of(rogue, Challenge)
    refusal = ChallengeRefused(job_id=ch.job_id, reason="trajectory gone")
    assert h.dispatcher.challenges.answered(rogue.link.peer_id, refusal)
    await until(lambda: h.store.failed_evidence(job_id))
    (raw,) = h.store.failed_evidence(job_id)
    ev = decode_evidence(raw)
    assert ev.challenge is None and ev.challenge_refused is not None
    assert "trajectory gone" in ev.challenge_refused and ev.steps == []
    del sub


async def test_low_score_workers_are_checked_more(tmp_path: Path, nursery: trio.Nursery) -> None:
    """rate ~0: a worker below `low_score_below` is sampled at `low_score_rate` (1 here),
    others are not; with checking off entirely, nobody is."""
    for enabled in (True, False):
        policy = VerificationConfig(
            rate=1e-9 if enabled else 0.0, low_score_rate=1.0, low_score_below=0.3
        )
        folder = tmp_path / str(enabled)
        folder.mkdir()
        h = Harness(folder / "c.db", nursery, verification=policy)
        h.dispatcher.checks._rng = random.Random(1)
        good, bad = h.node(0), h.node(1)
        rec = h.reputation.get(bad.wallet)
        rec.jobs, rec.success = 50, 0.2  # a poor record: score 0.05
        now = h.clock()
        assert rec.score(now) < 0.3 <= h.reputation.get(good.wallet).score(now, now)
        await h.submit(request(2))
        h.dispatcher.match()
        (a,) = good.offers()
        (b,) = bad.offers()
        for node, offer in ((good, a), (bad, b)):
            t = Trajectory(offer.offer.steps, seed=1)
            await h.dispatcher.accept_result(node.link, committed(node, offer, t))
        assert h.store.check_state(a.offer.job_id) is None
        assert h.store.check_state(b.offer.job_id) == ("pending" if enabled else None)
        h.close()


# --- the parts -----------------------------------------------------------------------------
def test_known_answers_are_bounded_and_never_the_probed_wallets_own() -> None:
    pool = KnownAnswers(per_key=2)
    t = Trajectory(4, seed=1)
    params = JobParams(
        model_id="m", positive_prompt="p", steps=4, guidance=4.0, width=64, height=64, seed=1
    )

    def answer(worker: str, verifier: str, k: int, dtype: str = "float32") -> KnownAnswer:
        return KnownAnswer(worker, verifier, params, "", dtype, t.opening(k), t.opening(k + 1))

    pool.add(answer("0xaa", "0xaa", 0))  # agreeing with itself: not a known answer
    assert len(pool) == 0
    for k in range(3):
        pool.add(answer("0xaa", "0xbb", k))
    pool.add(answer("0xaa", "0xbb", 0, dtype="bfloat16"))
    assert len(pool) == 3  # two per (model, mode), newest kept
    rng = random.Random(1)
    drawn = {pool.draw("m", "float32", "0xcc", rng).opening_k.step for _ in range(50)}  # type: ignore[union-attr]
    assert drawn == {1, 2}
    assert pool.draw("m", "float32", "0xAA", rng) is None  # its own work
    assert pool.draw("m", "float32", "0xbb", rng) is None  # its own answer
    assert pool.draw("other", "float32", "0xcc", rng) is None
    assert pool.draw("m", "bfloat16", "0xcc", rng) is not None
    # a sibling container (another wallet, the same payout account as the worker's payee or
    # the agreeing verifier's) is never probed with that work
    sibling = KnownAnswers()
    sibling.add(
        KnownAnswer(
            "0xaa", "0xbb", params, "", "float32", t.opening(0), t.opening(1),
            accounts=frozenset({"0xpayee", "0xvpay"}),
        )
    )  # fmt: skip
    assert sibling.draw("m", "float32", "0xdd", rng, payout="0xPAYEE") is None
    assert sibling.draw("m", "float32", "0xdd", rng, payout="0xvpay") is None
    assert sibling.draw("m", "float32", "0xdd", rng, payout="0xother") is not None
    assert sibling.draw("m", "float32", "0xdd", rng) is not None


def test_standing_is_lost_for_a_while() -> None:
    now = [100.0]
    standing = VerifierStanding(lost_for=60.0, clock=lambda: now[0])
    standing.lose("0xAB", "probe")
    assert not standing.has_standing("0xab") and standing.without() == {"0xab"}
    now[0] += 61
    assert standing.has_standing("0xAB") and standing.without() == frozenset()


async def test_an_image_check_overruled_discards_that_verifiers_steps(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The image check is decided as a step is: a verifier that fails an honest image is
    overruled by a third wallet's decode, loses standing, and the steps it had passed in the
    same check are re-run elsewhere (its answers no longer count, nor are they paid)."""
    policy = VerificationConfig(
        rate=1.0, challenge_timeout=5.0, verify_timeout=5.0, image_check=True, probe_rate=0.0
    )
    h = Harness(tmp_path / "c.db", nursery, billing=True, verification=policy)
    sub, _ = await _paid_request(h)
    worker, liar = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    image = _png(offer.offer.width, offer.offer.height, (200, 30, 30))  # as FakeNode renders
    await answer_challenge(h, worker, t)
    steps_by_liar = 0
    while True:  # the liar re-runs every step honestly, then is asked to decode
        msgs = liar.drain()
        decode = next((m for m in msgs if isinstance(m, VerifyDecode)), None)
        for m in msgs:
            if isinstance(m, VerifyStep):
                steps_by_liar += 1
                assert h.dispatcher.verifications.answered(liar.link.peer_id, _reply(m, [t], True))
        if decode is not None:
            break
        await trio.sleep(0.005)
    third = h.node(2, ready=False)
    wrong = DecodeVerified(check_id=decode.check_id, image=_png(64, 64, (0, 0, 0)))
    assert h.dispatcher.verifications.answered(liar.link.peer_id, wrong)
    redone = 0
    while h.dispatcher.checks.pending:
        for m in third.drain():
            if isinstance(m, VerifyDecode):
                right = DecodeVerified(check_id=m.check_id, image=image)
                assert h.dispatcher.verifications.answered(third.link.peer_id, right)
            elif isinstance(m, VerifyStep):
                redone += 1
                assert h.dispatcher.verifications.answered(third.link.peer_id, _reply(m, [t], True))
        await trio.sleep(0.005)
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and OVERRULED in str(line["reason"]), line
    assert redone == steps_by_liar >= 1  # every step the liar had passed, asked again
    assert not h.dispatcher.checks.standing.has_standing(liar.wallet)
    assert _work(h, job_id) == {third.wallet.lower(): redone + 1}
    assert h.reputation.get(worker.wallet).strikes == []
    del sub
    h.close()


def _png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


async def test_two_wallets_a_lazy_rerender_verifier_is_caught_by_a_step_probe(
    h: Harness,
) -> None:
    """A re-render's verifier (float32) answers a wrong image for an honest worker's
    unmeasured-mode receipt; no third wallet: it is probed with a known float32 step, echoes
    it, loses standing, and the worker is released unstruck."""
    sub, _ = await _paid_request(h)
    worker, lazy = h.node(0), h.node(1, ready=False, **REFERENCE)
    known = _prime(h, "0x" + "11" * 20, "0x" + "22" * 20)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    cuda = "float16@cuda-sm90-torch2.13"
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t, dtype=cuda))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")  # not what it rendered
    ask = await next_of(lazy, VerifyRender)
    reply = DecodeVerified(check_id=ask.check_id, image=buf.getvalue())
    assert h.dispatcher.verifications.answered(lazy.link.peer_id, reply)
    (probe,) = await serve(h, lazy, [known], honest=False)
    assert probe.dtype == "float32" and probe.k == 2
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "skipped" and PROBE_FAILED in str(line["reason"])
    assert h.reputation.get(worker.wallet).strikes == []
    assert not h.dispatcher.checks.standing.has_standing(lazy.wallet)


def _earlier_render(h: Harness, image: bytes, *, seed: int, budget: float) -> KnownRender:
    """A known render in the pool: a job that 0x11.. rendered and 0x22.. re-rendered as
    `image`."""
    params = JobParams(
        model_id=MODEL, positive_prompt="an earlier render", steps=10, guidance=4.0,
        width=64, height=64, seed=seed,
    )  # fmt: skip
    earlier = KnownRender(
        worker="0x" + "11" * 20, verifier="0x" + "22" * 20, params=params, weights="",
        image=image, budget=budget,
    )  # fmt: skip
    h.dispatcher.checks.known_renders.add(earlier)
    return earlier


@pytest.mark.parametrize("probe", ["wrong image", "known image", "refused"])
async def test_two_wallets_a_rerender_verifier_is_probed_with_a_known_render(
    h: Harness, probe: str
) -> None:
    """With a passed re-render in the pool, a re-render's verifier that fails an honest
    worker (no third wallet) is probed with that earlier job, as an ordinary `VerifyRender`
    with the deadline a real check of it would carry (preferred to a known step: a verifier
    can be lazy on re-renders only). A wrong image costs it its standing and releases the
    worker unstruck; the known image lets its fail stand; a refused render probe is followed
    by a known step, which it answers wrong."""
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False, **REFERENCE)
    known_step = _prime(h, "0x" + "11" * 20, "0x" + "22" * 20)
    known_image, wrong = _png(64, 64, (200, 30, 30)), _png(64, 64, (10, 200, 10))
    earlier = _earlier_render(h, known_image, seed=4, budget=300.0)
    params = earlier.params
    h.dispatcher.match()
    (offer,) = worker.offers()
    job_id = offer.offer.job_id
    t = Trajectory(offer.offer.steps, seed=1)
    cuda = "float16@cuda-sm90-torch2.13"
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t, dtype=cuda))
    ask = await next_of(verifier, VerifyRender)
    reply = DecodeVerified(check_id=ask.check_id, image=wrong)  # not the delivered image
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)
    asked = await next_of(verifier, VerifyRender)
    assert asked.params == params and asked.check_id != ask.check_id
    assert asked.weights is msgspec.UNSET  # a plain re-render's frame carries no weights
    left = asked.deadline - time.time()
    assert POLICY.verify_timeout + 300 - 5 < left <= POLICY.verify_timeout + 300 + 1
    answer: DecodeVerified | VerifyRefused = DecodeVerified(
        check_id=asked.check_id, image=known_image if probe == "known image" else wrong
    )
    if probe == "refused":
        answer = VerifyRefused(check_id=asked.check_id, reason="busy", code="other")
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, answer)
    if probe == "refused":  # then a known float32 step, answered wrong
        (step_probe,) = await serve(h, verifier, [known_step], honest=False)
        assert step_probe.dtype == "float32"
    standing = h.dispatcher.checks.standing
    if probe == "known image":  # the fail stands: unpaid, struck, rendered again
        rep = h.reputation
        await until(
            lambda: bool(h.store.failed_receipts(job_id) and rep.get(worker.wallet).strikes)
        )
        (raw,) = h.store.failed_evidence(job_id)
        assert decode_evidence(raw).steps[0].probe_passed is True
        assert len(h.reputation.get(worker.wallet).strikes) == 1
        assert standing.has_standing(verifier.wallet)
    else:
        await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
        (line,) = log_lines(h)
        assert line["verdict"] == "skipped" and PROBE_FAILED in str(line["reason"])
        assert h.reputation.get(worker.wallet).strikes == []
        assert not standing.has_standing(verifier.wallet)
    assert not [m for m in verifier.drain() if isinstance(m, VerifyStep)]


def test_known_answers_expire_with_the_prompt_retention() -> None:
    """An answer holds its job's prompt: it is not drawn (nor kept) past `max_age`."""
    now = [1000.0]
    pool = KnownAnswers[KnownRender](4, max_age=60.0, clock=lambda: now[0])
    params = JobParams(model_id="m", positive_prompt="p", steps=2, guidance=4.0,
                       width=64, height=64, seed=1)  # fmt: skip
    pool.add(KnownRender(worker="0xaa", verifier="0xbb", params=params, weights="",
                         image=b"png", budget=10.0))  # fmt: skip
    rng = random.Random(1)
    now[0] += 59.0
    assert pool.draw("m", "render:", "0xcc", rng) is not None and len(pool) == 1
    now[0] += 2.0
    assert pool.draw("m", "render:", "0xcc", rng) is None and len(pool) == 0


async def test_a_passed_rerender_becomes_a_known_render(h: Harness) -> None:
    """The verifier's image of a passed re-render joins the pool, keyed by model and the
    worker's weights, and is never drawn for the accounts that made it."""
    sub, _ = await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False, **WEIGHTS_REFERENCE)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    int4 = "float16+quanto-int4@cuda-sm90-torch2.13"
    result = committed(worker, offer, t, dtype=int4)
    await h.dispatcher.accept_result(worker.link, result)
    ask = await next_of(verifier, VerifyRender)
    reply = DecodeVerified(check_id=ask.check_id, image=result.image)
    assert h.dispatcher.verifications.answered(verifier.link.peer_id, reply)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    pool, rng = h.dispatcher.checks.known_renders, random.Random(1)
    mode = "render:float16+quanto-int4"
    known = pool.draw(MODEL, mode, "0x" + "33" * 20, rng)
    assert known is not None and known.image == result.image and known.params == offer.params
    assert pool.draw(MODEL, "render:", "0x" + "33" * 20, rng) is None  # other weights
    for account in (worker.wallet, verifier.wallet):
        assert pool.draw(MODEL, mode, account, rng) is None


@pytest.mark.parametrize("case", ["upheld", "evicted", "recheck lies"])
async def test_a_failed_probe_is_rechecked_before_it_costs_standing(
    tmp_path: Path, nursery: trio.Nursery, case: str
) -> None:
    """A verifier (probe_rate = 1) fails a known render: before it loses standing, another
    wallet answers the same probe. `upheld`: it agrees with the pool, the verifier loses
    standing. `evicted`: it fails the entry too and so does a third: a planted entry (a
    colluding pair's garbage); it goes, nobody probed loses standing, its verifier does.
    `recheck lies`: the second fails it (failing takes no work), a third upholds it: the
    verifier and the lying recheck both lose standing."""
    policy = msgspec.structs.replace(POLICY, probe_rate=1.0)
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=policy)
    sub, _ = await _paid_request(h)
    worker = h.node(0)
    verifiers = [h.node(i, ready=False, **REFERENCE) for i in (1, 2, 3)]
    garbage, real = _png(64, 64, (200, 30, 30)), _png(64, 64, (10, 200, 10))
    planted = _earlier_render(h, garbage, seed=9, budget=60.0)  # a colluding pair's
    planted_params, pool = planted.params, h.dispatcher.checks.known_renders
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    cuda = "float16@cuda-sm90-torch2.13"
    result = committed(worker, offer, t, dtype=cuda)
    await h.dispatcher.accept_result(worker.link, result)
    script = {"upheld": [real, garbage], "evicted": [real, real, real],
              "recheck lies": [real, real, garbage]}[case]  # fmt: skip
    probed: list[str] = []  # wallets asked the planted job, in order

    def image_for(node: FakeNode, ask: VerifyRender) -> bytes:
        if ask.params != planted_params:
            return result.image  # the real check: the honest render
        probed.append(node.wallet)
        return script[len(probed) - 1] if len(probed) <= len(script) else garbage

    async def answer_renders() -> None:
        while True:
            for node in verifiers:
                for ask in [m for m in node.drain() if isinstance(m, VerifyRender)]:
                    reply = DecodeVerified(check_id=ask.check_id, image=image_for(node, ask))
                    assert h.dispatcher.verifications.answered(node.link.peer_id, reply)
            await trio.sleep(0.005)

    async with trio.open_nursery() as answering:
        answering.start_soon(answer_renders)
        await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
        answering.cancel_scope.cancel()
    (line,) = log_lines(h)
    assert line["verdict"] == "pass"
    standing = h.dispatcher.checks.standing
    assert len(set(probed[: len(script)])) == len(script)  # each recheck another wallet
    lost = {v.wallet for v in verifiers if not standing.has_standing(v.wallet)}
    still = pool.draw(MODEL, "render:", "0x" + "33" * 20, random.Random(1))
    if case == "upheld":
        assert lost == {probed[0]} and still is planted
    elif case == "evicted":
        assert lost == set() and still is not planted
        assert not standing.has_standing(planted.verifier)
    else:
        assert lost == {probed[0], probed[1]} and still is planted


def test_a_planted_pairs_entries_all_go() -> None:
    """`evict_made_by`: every entry of the (worker, verifier) pair, none of another's."""
    pool = KnownAnswers[KnownRender](8)
    params = JobParams(model_id="m", positive_prompt="p", steps=2, guidance=4.0,
                       width=64, height=64, seed=1)  # fmt: skip

    def entry(worker: str, verifier: str, weights: str = "") -> KnownRender:
        return KnownRender(worker=worker, verifier=verifier, params=params, weights=weights,
                           image=b"png", budget=1.0)  # fmt: skip

    kept = entry("0xaa", "0xcc")
    for e in (entry("0xaa", "0xbb"), entry("0xaa", "0xbb", "float32+fp8"), kept):
        pool.add(e)
    assert pool.evict_made_by("0xAA", "0xBB") == 2 and len(pool) == 1
    assert pool.draw("m", "render:", "0xdd", random.Random(1)) is kept
