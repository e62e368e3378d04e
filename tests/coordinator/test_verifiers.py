"""The pure parts of verifier nodes: who may verify, the torch-free distance, the tolerances,
and the pending map that pairs a verifier's answer with the check waiting for it."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import trio

from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verifiers import (
    PendingVerifications,
    _floats,
    choose_verifier,
    normalised_distance,
    tolerance_for,
)
from sogni_protocol.messages import (
    JobParams,
    Message,
    ScalarEntry,
    StepOpeningWire,
    StepVerified,
    TensorEntry,
    VerifyRefused,
    VerifyStep,
    decode,
    encode,
)

WORKER = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
THIRD = "0x" + "ef" * 20


def _link(peer: str, wallet: str, models: tuple[str, ...] = ("m",)) -> NodeLink:
    send, _ = trio.open_memory_channel[Message](1)
    return NodeLink(peer_id=peer, wallet=wallet, models=frozenset(models), slots=1, outbox=send)


def test_choose_verifier_never_picks_the_workers_wallet() -> None:
    nodes = {
        "w1": _link("w1", WORKER),
        "w2": _link("w2", WORKER.upper().replace("0X", "0x")),  # same wallet, other case
        "o1": _link("o1", OTHER),
        "t1": _link("t1", THIRD),
        "x1": _link("x1", THIRD, models=("other-model",)),
    }
    rng = random.Random(7)
    picked = {choose_verifier(nodes, "m", WORKER, rng) for _ in range(200)}
    assert picked == {"o1", "t1"}  # both others drawn, never the worker's nor a non-server
    assert choose_verifier(nodes, "m", OTHER, rng) in {"w1", "w2", "t1"}
    only_worker = {k: v for k, v in nodes.items() if k in ("w1", "w2")}
    assert choose_verifier(only_worker, "m", WORKER, rng) is None
    assert choose_verifier(nodes, "absent-model", WORKER, rng) is None
    assert choose_verifier({}, "m", WORKER) is None
    # verifiers without standing (any case), or the one a re-check must not ask again
    assert {
        choose_verifier(nodes, "m", WORKER, rng, exclude={THIRD.upper()}) for _ in range(50)
    } == {"o1"}
    assert choose_verifier(nodes, "m", WORKER, rng, exclude=(OTHER, THIRD)) is None


def _np_distance(a: np.ndarray, p: np.ndarray, b: np.ndarray) -> float:
    a64, p64, b64 = (x.astype(np.float64) for x in (a, p, b))
    return float(np.linalg.norm(a64 - p64) / np.linalg.norm(a64 - b64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_python_distance_equals_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (1, 4, 16, 16)
    x_k = rng.standard_normal(shape).astype(np.float32)
    x_next = (x_k * 0.9 + rng.standard_normal(shape) * 0.1).astype(np.float32)
    x_pred = (x_next + rng.standard_normal(shape) * 1e-4).astype(np.float32)
    # through the wire format, as the coordinator sees it
    entries = [
        TensorEntry(name="latents", dtype="float32", shape=list(shape), data=x.tobytes())
        for x in (x_next, x_pred, x_k)
    ]
    ours = normalised_distance(_floats(entries[0]), _floats(entries[1]), _floats(entries[2]))
    assert ours == pytest.approx(_np_distance(x_next, x_pred, x_k), rel=1e-12)
    scaled = normalised_distance(_floats(entries[0]), _floats(entries[1]), _floats(entries[2]), 3.0)
    assert scaled == pytest.approx(_np_distance(x_next, x_pred, x_k * 3.0), rel=1e-9)


def test_distance_edge_cases() -> None:
    assert normalised_distance([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]) == 0.0
    assert normalised_distance([1.0, 2.0], [1.0, 3.0], [1.0, 2.0]) == math.inf
    assert normalised_distance([3.0, 0.0], [3.0, 0.0], [0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        normalised_distance([1.0], [1.0, 2.0], [1.0])


def test_tolerances_follow_the_measured_table_and_fail_closed() -> None:
    assert tolerance_for("float32") == 5e-5
    assert tolerance_for("float32+int8") == 6e-5
    assert tolerance_for("bfloat16") is None  # path-bound: test_same_path.py
    for unmeasured in ("float16", "float32+compiled", "float32+fp8", ""):
        assert tolerance_for(unmeasured) is None


def _opening(step: int) -> StepOpeningWire:
    data = np.zeros((1, 4, 8, 8), np.float32).tobytes()
    return StepOpeningWire(
        step=step,
        tensors=[TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=data)],
        scalars=[ScalarEntry(name="timestep", value=None)],
        proof=[],
        n_leaves=4,
    )


def _params() -> JobParams:
    return JobParams(
        model_id="m", positive_prompt="p", steps=3, guidance=4.0, width=64, height=64, seed=1
    )


def test_verify_messages_round_trip_and_refuse_inconsistent_fields() -> None:
    msg = VerifyStep(
        check_id=b"\x01" * 32,
        model_id="m",
        params=_params(),
        scheduler="",
        dtype="float32",
        k=1,
        opening=_opening(1),
        deadline=10,
    )
    assert decode(encode(msg)) == msg
    with pytest.raises(ValueError, match="outside a render"):
        VerifyStep(**{**_fields(msg), "k": 3, "opening": _opening(3)})
    with pytest.raises(ValueError, match="opening of leaf"):
        VerifyStep(**{**_fields(msg), "opening": _opening(2)})
    with pytest.raises(ValueError, match="model_id"):
        VerifyStep(**{**_fields(msg), "model_id": "other"})
    answer = StepVerified(check_id=b"\x01" * 32, latents=_opening(1).tensors[0], x_k_scale=14.6)
    assert decode(encode(answer)) == answer
    refused = VerifyRefused(check_id=b"\x01" * 32, reason="no")
    assert decode(encode(refused)) == refused


def _fields(msg: VerifyStep) -> dict[str, Any]:
    return {f: getattr(msg, f) for f in msg.__struct_fields__ if f != "v"}


async def test_pending_pairs_answers_and_fails_fast_when_the_verifier_leaves() -> None:
    pending = PendingVerifications()
    send, recv = trio.open_memory_channel[Message](4)
    request = VerifyStep(
        check_id=b"\x02" * 32,
        model_id="m",
        params=_params(),
        scheduler="",
        dtype="float32",
        k=0,
        opening=_opening(0),
        deadline=10,
    )
    answer = StepVerified(check_id=request.check_id, latents=_opening(1).tensors[0])
    results: list[object] = []

    async def ask() -> None:
        results.append(await pending.ask("peer", send, request, timeout=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        assert await recv.receive() == request
        assert not pending.answered("someone-else", answer)
        assert pending.answered("peer", answer)
    assert results == [answer] and len(pending) == 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await recv.receive()
        pending.node_left("peer", "stream closed")
    assert results[-1] == "verifier left: stream closed"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await recv.receive()
        pending.answered("peer", VerifyRefused(check_id=request.check_id, reason="busy"))
    assert results[-1] == "verifier refused: busy"

    async def ask_reply() -> None:
        results.append(await pending.ask_reply("peer", send, request, timeout=5))

    refusal = VerifyRefused(check_id=request.check_id, reason="leaf", code="bad_leaf")
    async with trio.open_nursery() as nursery:  # the refusal itself, for its code
        nursery.start_soon(ask_reply)
        await recv.receive()
        pending.answered("peer", refusal)
    assert results[-1] == refusal

    assert await pending.ask("peer", send, request, timeout=0.05) == "no answer within 0.05 s"
    assert len(pending) == 0
