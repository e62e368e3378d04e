"""Challenges, the pure half: which steps to ask for, how many, and checking an answer."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
import torch
import trio

from sogni_coordinator.challenges import (
    MAX_PAIRS,
    PendingChallenges,
    check_answer,
    choose_steps,
    pairs_needed,
)
from sogni_node.render.trajectory import Trajectory, TrajectoryRecorder
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    Message,
    Receipt,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    decode,
    encode,
)

JOB = b"\x07" * 32
ADDR = "0x" + "11" * 20


def _trajectory(seed: int, steps: int = 4) -> Trajectory:
    rec = TrajectoryRecorder()
    gen = torch.Generator("cpu").manual_seed(seed)
    for step in range(steps + 1):
        rec.record(
            step,
            torch.randn((1, 4, 8, 8), generator=gen),
            timestep=None if step == 0 else step * 10.0,
        )
    return rec.finish()


def _receipt(t: Trajectory, job: bytes = JOB) -> Receipt:
    return Receipt(
        job_id=job,
        offer_hash=b"\x01" * 32,
        worker=ADDR,
        coordinator=ADDR,
        model_id="m",
        result_hash=b"\x02" * 32,
        steps_done=t.n_steps,
        work_units=1,
        completed_at=1,
        trajectory_root=t.root,
    )


def _wire(t: Trajectory, step: int) -> StepOpeningWire:
    """What an honest node sends (the same mapping as `sogni_node.pull._opening_wire`)."""
    opening = t.open(step)
    rec = opening.record
    return StepOpeningWire(
        step=step,
        tensors=[
            TensorEntry(
                name=n,
                dtype=rec.dtypes[n],  # type: ignore[arg-type]
                shape=list(a.shape),
                data=a.astype("<f4").tobytes(),
            )
            for n, a in sorted(rec.tensors.items())
        ],
        scalars=[ScalarEntry(name=n, value=v) for n, v in sorted(rec.scalars.items())],
        proof=list(opening.proof),
        n_leaves=opening.n_leaves,
    )


def _answer(t: Trajectory, steps: list[int], job: bytes = JOB) -> ChallengeAnswer:
    return ChallengeAnswer(job_id=job, openings=[_wire(t, k) for k in steps])


def _roundtrip(msg: Any) -> Any:
    return decode(encode(msg))


# --- how many, which ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("f", "p", "k"),
    [
        (1.0, 0.99, 1),
        (0.5, 0.5, 1),
        (0.5, 0.75, 2),
        (0.5, 0.95, 5),
        (0.1, 0.95, 29),
        (0.2, 0.9, 11),
    ],
)
def test_pairs_needed_catches_a_faker_with_the_asked_probability(
    f: float, p: float, k: int
) -> None:
    assert pairs_needed(f, p) == k
    assert 1 - (1 - f) ** k >= p - 1e-12  # k pairs are enough ...
    if k > 1:
        assert 1 - (1 - f) ** (k - 1) < p  # ... and k - 1 are not


def test_pairs_needed_refuses_nonsense() -> None:
    for f, p in [(0.0, 0.9), (1.5, 0.9), (0.5, 1.0), (0.5, -0.1)]:
        with pytest.raises(ValueError):
            pairs_needed(f, p)


def test_choose_steps_draws_distinct_pairs_of_adjacent_leaves() -> None:
    rng = random.Random(5)
    for _ in range(200):
        n, k = rng.randint(1, 60), rng.randint(1, 12)
        leaves = choose_steps(n, k, rng)
        assert leaves == sorted(set(leaves)) and leaves[0] >= 0 and leaves[-1] <= n
        assert len(leaves) <= 16
        assert all(s - 1 in leaves or s + 1 in leaves for s in leaves)  # pairs only
        assert len(leaves) >= min(k, n, MAX_PAIRS) + 1
    assert choose_steps(3, 10, random.Random(1)) == [0, 1, 2, 3]  # every step of a short run
    assert len(choose_steps(100, 50, random.Random(1))) <= 2 * MAX_PAIRS
    Challenge(job_id=JOB, steps=choose_steps(100, 50), deadline=1)  # always a valid message
    with pytest.raises(ValueError):
        choose_steps(0, 1)


# --- checking an answer ------------------------------------------------------------------
def test_a_genuine_answer_passes_after_a_trip_over_the_wire() -> None:
    t = _trajectory(1)
    steps = [1, 2, 4]
    challenge = Challenge(job_id=JOB, steps=steps, deadline=1)
    answer = _roundtrip(_answer(t, [4, 1, 2]))  # any order
    assert check_answer(_receipt(t), _roundtrip(challenge), answer) is None


def test_a_tampered_tensor_fails() -> None:
    t = _trajectory(1)
    answer = _answer(t, [2, 3])
    data = bytearray(answer.openings[0].tensors[0].data)
    data[5] ^= 0x01
    tampered = msgspec.structs.replace(answer.openings[0].tensors[0], data=bytes(data))
    answer.openings[0] = msgspec.structs.replace(answer.openings[0], tensors=[tampered])
    fault = check_answer(_receipt(t), Challenge(job_id=JOB, steps=[2, 3], deadline=1), answer)
    assert fault == "step 2 does not match the committed trajectory root"


def test_a_changed_scalar_fails() -> None:
    t = _trajectory(1)
    answer = _answer(t, [2])
    opening = answer.openings[0]
    answer.openings[0] = msgspec.structs.replace(
        opening, scalars=[ScalarEntry(name="timestep", value=21.0)]
    )
    assert check_answer(_receipt(t), Challenge(job_id=JOB, steps=[2], deadline=1), answer)


def test_the_wrong_step_fails() -> None:
    t = _trajectory(1)
    challenge = Challenge(job_id=JOB, steps=[1, 2], deadline=1)
    assert "opened [2, 3]" in (check_answer(_receipt(t), challenge, _answer(t, [2, 3])) or "")
    # leaf 3's tensors and proof relabelled as step 2: the index is inside the leaf
    relabelled = _answer(t, [1, 3])
    relabelled.openings[1] = msgspec.structs.replace(relabelled.openings[1], step=2)
    assert check_answer(_receipt(t), challenge, relabelled) == (
        "step 2 does not match the committed trajectory root"
    )


def test_a_missing_or_extra_step_fails() -> None:
    t = _trajectory(1)
    challenge = Challenge(job_id=JOB, steps=[1, 2], deadline=1)
    assert check_answer(_receipt(t), challenge, _answer(t, [1]))
    assert check_answer(_receipt(t), challenge, _answer(t, [1, 2, 3]))
    assert check_answer(_receipt(t), challenge, _answer(t, [1, 1]))


def test_a_proof_for_another_root_fails() -> None:
    honest, other = _trajectory(1), _trajectory(2)
    challenge = Challenge(job_id=JOB, steps=[0, 1], deadline=1)
    # a genuine opening of another trajectory (another render, or one made up after the ask)
    assert check_answer(_receipt(honest), challenge, _answer(other, [0, 1])) == (
        "step 0 does not match the committed trajectory root"
    )
    # the right tensors with another tree's proof
    mixed = _answer(honest, [0, 1])
    mixed.openings[0] = msgspec.structs.replace(mixed.openings[0], proof=list(other.open(0).proof))
    assert check_answer(_receipt(honest), challenge, mixed)


def test_the_tree_size_and_job_must_be_the_receipts() -> None:
    t = _trajectory(1)
    challenge = Challenge(job_id=JOB, steps=[1], deadline=1)
    short = msgspec.structs.replace(_receipt(t), steps_done=t.n_steps - 1)
    assert "the receipt's 3 steps make 4" in (check_answer(short, challenge, _answer(t, [1])) or "")
    other_job = b"\x08" * 32
    assert check_answer(_receipt(t), challenge, _answer(t, [1], job=other_job)) == (
        "the answer is for another job"
    )
    none = msgspec.structs.replace(_receipt(t), trajectory_root=bytes(32))
    assert check_answer(none, challenge, _answer(t, [1])) == "the receipt commits to no trajectory"


# --- the messages ------------------------------------------------------------------------
def test_messages_refuse_inconsistent_or_unbounded_fields() -> None:
    t = _trajectory(1)
    good = encode(_answer(t, [1]))
    raw = msgspec.msgpack.decode(good)

    def bad(mutate: Any) -> None:
        copy = msgspec.msgpack.decode(good)
        mutate(copy)
        with pytest.raises(InvalidMessage):
            decode(msgspec.msgpack.encode(copy))

    def tensor(c: Any) -> Any:
        return c["openings"][0]["tensors"][0]

    bad(lambda c: tensor(c).update(data=tensor(c)["data"][:-4]))  # bytes != shape
    bad(lambda c: tensor(c).update(shape=[1, 4, 8, 9]))
    bad(lambda c: tensor(c).update(dtype="float64"))
    bad(lambda c: tensor(c).update(name="latents!"))
    bad(lambda c: c["openings"][0].update(tensors=[]))
    bad(lambda c: c["openings"][0]["scalars"].append({"name": "latents", "value": 1}))  # repeat
    bad(lambda c: c["openings"][0].update(proof=[b"x" * 31]))
    bad(lambda c: c["openings"][0].update(step=t.n_leaves))  # outside its own tree
    bad(lambda c: c.update(openings=c["openings"] * 17))
    bad(lambda c: c.update(openings=[]))
    assert raw["type"] == "challengeAnswer"

    ask = msgspec.msgpack.decode(encode(Challenge(job_id=JOB, steps=[0, 1], deadline=9)))
    for steps in ([], [1, 1], list(range(17)), [-1]):
        with pytest.raises(InvalidMessage):
            decode(msgspec.msgpack.encode({**ask, "steps": steps}))
    refused = ChallengeRefused(job_id=JOB, reason="gone")
    assert _roundtrip(refused) == refused


# --- the waiting room --------------------------------------------------------------------
async def test_pending_challenges_pair_answers_time_out_and_fail_when_the_node_leaves() -> None:
    t = _trajectory(1)
    pending = PendingChallenges()
    out_send, out_recv = trio.open_memory_channel[Message](4)
    challenge = Challenge(job_id=JOB, steps=[1, 2], deadline=1)
    results: list[Any] = []

    async def ask(timeout: float) -> None:
        results.append(await pending.ask("peer", out_send, challenge, timeout))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, 5.0)
        assert await out_recv.receive() == challenge
        assert not pending.answered("other-peer", _answer(t, [1, 2]))  # not its challenge
        assert pending.answered("peer", _answer(t, [1, 2]))
    assert results[0].fault(_receipt(t)) is None and len(pending) == 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, 5.0)
        await out_recv.receive()
        pending.answered("peer", ChallengeRefused(job_id=JOB, reason="no trajectory kept"))
    assert results[1].fault(_receipt(t)) == "node refused: no trajectory kept"

    await ask(0.05)  # nobody answers
    assert await out_recv.receive() == challenge  # it was sent all the same
    assert results[2].answer is None and results[2].fault(_receipt(t)) == "no answer within 0.05 s"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, 5.0)
        await out_recv.receive()
        pending.node_left("peer", "stream closed")
    assert results[3].fault(_receipt(t)) == "node left: stream closed"

    out_recv.close()
    await ask(5.0)
    assert results[4].refused == "the node is gone" and len(pending) == 0


def test_choose_steps_can_open_the_final_leaf_for_the_image_check() -> None:
    rng = random.Random(9)
    for _ in range(300):
        n, k = rng.randint(1, 60), rng.randint(1, 12)
        leaves = choose_steps(n, k, rng, start=True, end=True)
        assert n in leaves and {0, 1} <= set(leaves)  # the final latent and the seed's pair
        assert len(leaves) <= 16 and leaves == sorted(set(leaves))
    assert choose_steps(8, 1, random.Random(2), end=True)[-1] == 8
