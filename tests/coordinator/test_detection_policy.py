"""How many steps a check re-runs (issue #12: the detection floor per checked job, by policy),
and a check that needs more leaves than one `Challenge` carries."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.challenges import (
    challenge_batches,
    draw_steps,
    leaves_for,
    pairs_needed,
)
from sogni_coordinator.evidence import decode_evidence
from sogni_coordinator.verification_config import VerificationConfig
from sogni_protocol.messages import MAX_CHALLENGE_STEPS, Challenge, ChallengeAnswer

from .conftest import Harness, request
from .test_checks import (
    ALL,
    Trajectory,
    answer_verify,
    committed,
    log_lines,
    until,
)


def _miss(n: int, bad: int, k: int) -> float:
    """Probability that k distinct uniform steps of n miss all `bad` faked ones."""
    return math.comb(n - bad, k) / math.comb(n, k)


def test_the_default_policy_meets_the_floor_for_a_quarter_of_the_steps_faked() -> None:
    p = VerificationConfig()
    assert (p.catch_fraction, p.confidence, p.pairs) == (0.25, 0.99, 0)
    assert [p.steps_to_check(n) for n in (1, 4, 8, 10, 20, 30, 50)] == [1, 4, 7, 7, 11, 12, 14]
    assert pairs_needed(0.25, 0.99) == 17  # the length-free bound, (1 - f)^k <= 1 - p
    for n in range(1, 81):
        k = p.steps_to_check(n)
        bad = max(1, math.ceil(0.25 * n))
        assert 1 <= k <= n
        assert 1 - _miss(n, bad, k) >= 0.99  # enough ...
        if k > 1:
            assert 1 - _miss(n, bad, k - 1) < 0.99  # ... and no more than needed
        assert k <= pairs_needed(0.25, 0.99)  # never more than the bound


@pytest.mark.parametrize("n", [4, 8, 9])
def test_every_placement_of_the_faked_steps_is_caught_as_often_as_promised(n: int) -> None:
    """Exhaustive over which steps are faked and which k are drawn: the floor is a minimum
    over cheats, not an average."""
    k = VerificationConfig().steps_to_check(n)
    bad = math.ceil(0.25 * n)
    draws = list(itertools.combinations(range(1, n + 1), k))
    for faked in itertools.combinations(range(1, n + 1), bad):
        caught = sum(bool(set(faked) & set(d)) for d in draws)
        assert caught / len(draws) >= 0.99


def test_pairs_overrides_the_derived_number_and_is_capped_at_the_job() -> None:
    assert VerificationConfig(pairs=3).steps_to_check(30) == 3
    assert VerificationConfig(pairs=100).steps_to_check(30) == 30
    assert VerificationConfig(catch_fraction=1.0).steps_to_check(30) == 1  # all faked: 1 does
    assert VerificationConfig(catch_fraction=0.5, confidence=0.95).steps_to_check(30) == 4
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"catch_fraction": 0.0}, VerificationConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"confidence": 1.0}, VerificationConfig)
    with pytest.raises(ValueError):
        pairs_needed(0.25, 0.99, 0)


def test_drawn_steps_become_leaves_and_challenges_of_at_most_the_limit() -> None:
    rng = random.Random(3)
    for n in (1, 2, 8, 30, 50, 200):
        k = VerificationConfig().steps_to_check(n)
        steps = draw_steps(n, k, rng, start=True)
        assert steps == sorted(set(steps)) and 1 in steps and k <= len(steps) <= k + 1
        assert all(1 <= s <= n for s in steps)
        leaves = leaves_for(steps, n, end=True)
        assert {s - 1 for s in steps} | set(steps) | {n} == set(leaves)
        batches = challenge_batches(leaves)
        assert [leaf for b in batches for leaf in b] == leaves
        assert all(1 <= len(b) <= MAX_CHALLENGE_STEPS for b in batches)
        Challenge(job_id=b"\1" * 32, steps=batches[-1], deadline=1)  # each a valid message
    assert leaves_for([1, 2, 3], 3) == [0, 1, 2, 3]
    assert len(challenge_batches(list(range(31)))) == 2


@pytest.fixture
async def checked(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """Every receipt checked, 16 steps re-run per check."""
    policy = msgspec.structs.replace(ALL, pairs=16)
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=policy)
    yield h
    h.close()


async def test_a_check_of_more_leaves_than_one_challenge_sends_several(checked: Harness) -> None:
    """30 steps, 16 drawn (+ step 1) open at least 17 leaves, more than one `Challenge`
    carries (16): the worker gets them one challenge after another, each answer proved, and
    every drawn step is re-run."""
    h = checked
    payer = Account.create()
    assert h.ledger is not None
    h.ledger.credit_purchase(payer.address, 1)
    sub = await h.submit(authorize(request(1, steps=30), bytes(payer.key), h.dispatcher.domain))
    worker, verifier = h.node(0), h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(30, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    asked: list[list[int]] = []
    d = h.dispatcher
    inbox: list[Challenge] = []

    def challenged_or_verifying() -> bool:
        inbox.extend(m for m in worker.drain() if isinstance(m, Challenge))
        return bool(inbox) or len(d.verifications) > 0

    while True:  # the next challenge comes only once the one before is answered
        await until(challenged_or_verifying)
        if not inbox:
            break  # all opened: the verifier re-runs the steps
        ch = inbox.pop(0)
        asked.append(list(ch.steps))
        answer = ChallengeAnswer(job_id=ch.job_id, openings=[t.opening(k) for k in ch.steps])
        assert d.challenges.answered(worker.link.peer_id, answer)
    leaves = [k for batch in asked for k in batch]
    assert leaves == sorted(set(leaves)) and len(leaves) > MAX_CHALLENGE_STEPS
    assert len(asked) == math.ceil(len(leaves) / MAX_CHALLENGE_STEPS) >= 2
    ks = await answer_verify(h, verifier, t, honest=True)
    assert ks[0] == 0 and 16 <= len(ks) <= 17  # every drawn step, step 1 first
    assert all(k in leaves and k + 1 in leaves for k in ks)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    (line,) = log_lines(h)
    assert line["verdict"] == "pass"


async def test_a_failed_check_of_several_challenges_keeps_valid_evidence(
    checked: Harness,
) -> None:
    """More leaves than one `ChallengeAnswer` holds: the evidence keeps the leaves the failed
    step rests on, and still decodes as one valid answer."""
    h = checked
    payer = Account.create()
    assert h.ledger is not None
    h.ledger.credit_purchase(payer.address, 1)
    await h.submit(authorize(request(1, steps=30), bytes(payer.key), h.dispatcher.domain))
    worker, verifier = h.node(0), h.node(1, ready=False)
    h.dispatcher.match()
    (offer,) = worker.offers()
    job_id = offer.offer.job_id
    t = Trajectory(30, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    inbox: list[Challenge] = []

    def challenged_or_verifying() -> bool:
        inbox.extend(m for m in worker.drain() if isinstance(m, Challenge))
        return bool(inbox) or len(h.dispatcher.verifications) > 0

    while True:
        await until(challenged_or_verifying)
        if not inbox:
            break
        ch = inbox.pop(0)
        answer = ChallengeAnswer(job_id=ch.job_id, openings=[t.opening(k) for k in ch.steps])
        assert h.dispatcher.challenges.answered(worker.link.peer_id, answer)
    (k,) = await answer_verify(h, verifier, t, honest=False)  # the first step fails: stop
    await until(lambda: bool(h.store.failed_evidence(job_id)))
    (raw,) = h.store.failed_evidence(job_id)
    ev = decode_evidence(raw)
    assert ev.challenge is not None and [s.step for s in ev.steps] == [k] == [0]
    assert [o.step for o in ev.challenge.openings] == [0, 1]
