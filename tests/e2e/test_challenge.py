"""Challenges over libp2p: the coordinator asks a node to open steps of a receipted render.

An honest node answers from the trajectory it kept, and the answer opens the receipt's root;
a node whose trajectory file is gone refuses; a rogue node that answers with other latents
than it committed to fails the check. (What the check cannot catch yet, a rogue that
committed made-up latents and opens them faithfully, is shown too: that is the verifier
re-render's job, docs/TRAJECTORY.md.)
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import torch
import trio
from PIL import Image

from sogni_app.api import render
from sogni_coordinator.challenges import ChallengeResult, choose_steps
from sogni_coordinator.dispatch import Dispatcher
from sogni_net import Channel
from sogni_node.render.trajectory import Trajectory, TrajectoryRecorder
from sogni_protocol import eip712
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    Heartbeat,
    Offer,
    Ready,
    Receipt,
    RenderMeta,
    Result,
    ResultAck,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    encode,
)

from .conftest import Net, receive_skipping, rogue_node, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")


def _peer_of(dispatcher: Dispatcher, wallet: str) -> str:
    peers = [p for p, link in dispatcher.nodes.items() if eip712.same_address(link.wallet, wallet)]
    assert len(peers) == 1
    return peers[0]


def _receipt(dispatcher: Dispatcher, job_id: bytes) -> Receipt:
    stored = dispatcher.store.receipt(job_id)
    assert stored is not None
    return stored.receipt


async def test_an_honest_node_opens_its_steps_and_one_that_lost_them_refuses(
    net_factory: Any, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with net_factory() as net:
        node = await net.add_node(backend, "honest")
        with trio.fail_after(60):
            # 256 x 256: 64 KiB of latents per leaf, so an answer needs more than a control
            # frame (it travels under the result frame limit)
            result = await render(net.addr, tiny_request(2, width=256, height=256))
        capsys.readouterr()  # from here on: what challenges log
        dispatcher = net.coordinator.dispatcher
        peer = _peer_of(dispatcher, node.wallet.address)
        first, second = (im.job_id for im in result.images)

        receipt = _receipt(dispatcher, first)
        assert receipt.trajectory_root != bytes(32) and receipt.steps_done == 3
        every_leaf = await dispatcher.challenge(peer, first, [0, 1, 2, 3], timeout=20)
        assert every_leaf.answer is not None, every_leaf.refused
        assert every_leaf.fault(receipt) is None
        assert len(encode(every_leaf.answer)) > CONTROL_FRAME_LIMIT
        drawn = choose_steps(receipt.steps_done, 1)
        assert (await dispatcher.challenge(peer, first, drawn, timeout=20)).fault(receipt) is None
        # asked of the wrong receipt (another job's root): the same honest openings fail
        assert every_leaf.fault(_receipt(dispatcher, second)) == "the answer is for another job"

        out_of_range = await dispatcher.challenge(peer, first, [3, 4], timeout=20)
        assert out_of_range.answer is None
        assert "outside the 4 committed leaves" in (out_of_range.fault(receipt) or "")

        kept = net.tmp / "honest" / "trajectories" / f"{second.hex()}.safetensors"
        assert kept.is_file()
        kept.unlink()  # expired, or lost with a disk
        lost = await dispatcher.challenge(peer, second, [1, 2], timeout=20)
        assert lost.answer is None
        assert lost.fault(_receipt(dispatcher, second)) == (
            "node refused: no trajectory kept for this job (expired or lost)"
        )

        unknown = await dispatcher.challenge(peer, b"\x05" * 32, [0], timeout=20)
        assert unknown.fault(receipt) == (
            "node refused: this node rendered no such job for this coordinator"
        )
        absent = await dispatcher.challenge("no-such-peer", first, [0], timeout=1)
        assert absent.fault(receipt) == "node not connected"
        assert len(dispatcher.challenges) == 0
        assert peer in dispatcher.nodes  # the session survived it all
    logs = capsys.readouterr()
    assert "challenge_answered" in logs.out + logs.err  # the node logs them, not the prompt
    assert "a red circle" not in logs.out + logs.err


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _made_up_trajectory(steps: int, seed: int) -> Trajectory:
    rec = TrajectoryRecorder()
    gen = torch.Generator("cpu").manual_seed(seed)
    for k in range(steps + 1):
        rec.record(k, torch.randn((1, 4, 8, 8), generator=gen), timestep=None if k == 0 else 1.0)
    return rec.finish()


def _wire(t: Trajectory, step: int, tamper: bool = False) -> StepOpeningWire:
    opening = t.open(step)
    rec = opening.record
    tensors = []
    for name, arr in sorted(rec.tensors.items()):
        data = arr.astype("<f4").tobytes()
        if tamper and name == "latents":
            data = (arr * 1.001).astype("<f4").tobytes()  # "close enough" latents
        dtype: Any = rec.dtypes[name]
        tensors.append(TensorEntry(name=name, dtype=dtype, shape=list(arr.shape), data=data))
    return StepOpeningWire(
        step=step,
        tensors=tensors,
        scalars=[ScalarEntry(name=n, value=v) for n, v in sorted(rec.scalars.items())],
        proof=list(opening.proof),
        n_leaves=opening.n_leaves,
    )


async def _rogue_result(net: Net, channel: Channel, acct: Any, committed: Trajectory) -> bytes:
    """Take one job, 'render' it (a flat image) and get a receipt naming `committed`'s root."""
    await channel.send(Ready(slots=1))
    offer = await receive_skipping(channel, (Offer,))
    p = offer.params
    image = _png(p.width, p.height)
    receipt = Receipt(
        job_id=offer.offer.job_id,
        offer_hash=eip712.offer_hash(net.domain, offer.offer),
        worker=acct.address,
        coordinator=offer.offer.coordinator,
        model_id=offer.offer.model_id,
        result_hash=hashlib.sha256(image).digest(),
        steps_done=offer.offer.steps,
        work_units=offer.offer.work_units,
        price_factor_bps=offer.offer.price_factor_bps,
        completed_at=int(time.time()),
        trajectory_root=committed.root,
    )
    sig = eip712.sign_receipt(bytes(acct.key), net.domain, receipt)
    meta = RenderMeta(backend="rogue", device="cpu", dtype="float32", threads=1)
    result = Result(job_id=receipt.job_id, image=image, receipt=receipt, signature=sig, meta=meta)
    await channel.send(result, limit=RESULT_FRAME_LIMIT)
    ack = await receive_skipping(channel, (ResultAck,))
    assert ack.accepted, ack.reason
    return receipt.job_id


async def _challenge_rogue(
    dispatcher: Dispatcher,
    peer: str,
    job_id: bytes,
    channel: Channel,
    answer: Callable[[Challenge], ChallengeAnswer],
) -> ChallengeResult:
    results: list[ChallengeResult] = []

    async def ask() -> None:
        results.append(await dispatcher.challenge(peer, job_id, [1, 2], timeout=20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        challenge = await receive_skipping(channel, (Challenge,))
        assert challenge.steps == [1, 2] and challenge.deadline > time.time()
        await channel.send(answer(challenge), limit=RESULT_FRAME_LIMIT)
    return results[0]


async def _heartbeats(channel: Channel) -> None:
    """What keeps a rogue's stream alive (the coordinator drops a silent node)."""
    seq = 0
    while True:
        seq += 1
        await channel.send(Heartbeat(seq=seq))
        await trio.sleep(0.5)


async def test_a_rogue_answering_with_other_latents_fails(net_factory: Any) -> None:
    async with (
        net_factory() as net,
        rogue_node(net) as (channel, acct),
        trio.open_nursery() as beats,
    ):
        beats.start_soon(_heartbeats, channel)
        committed = _made_up_trajectory(3, seed=11)
        async with trio.open_nursery() as nursery:  # a client, so there is a job to take
            nursery.start_soon(render, net.addr, tiny_request(1))
            job_id = await _rogue_result(net, channel, acct, committed)
            nursery.cancel_scope.cancel()
        dispatcher = net.coordinator.dispatcher
        peer = _peer_of(dispatcher, acct.address)
        receipt = _receipt(dispatcher, job_id)
        assert receipt.trajectory_root == committed.root

        def tampered(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(
                job_id=c.job_id, openings=[_wire(committed, 1, True), _wire(committed, 2)]
            )

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, tampered)
        assert res.fault(receipt) == "step 1 does not match the committed trajectory root"

        def another_run(c: Challenge) -> ChallengeAnswer:  # latents made up after the ask
            fresh = _made_up_trajectory(3, seed=12)
            return ChallengeAnswer(job_id=c.job_id, openings=[_wire(fresh, k) for k in c.steps])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, another_run)
        assert res.fault(receipt) == "step 1 does not match the committed trajectory root"

        def one_missing(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(job_id=c.job_id, openings=[_wire(committed, 1)])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, one_missing)
        assert res.fault(receipt) == "asked for steps [1, 2], opened [1]"

        # Faithful openings of made-up latents pass: this check proves commitment, not
        # honest steps (the verifier's re-render of step 2 from leaf 1 is what catches it).
        def faithful(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(job_id=c.job_id, openings=[_wire(committed, k) for k in c.steps])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, faithful)
        assert res.fault(receipt) is None
        assert msgspec.structs.asdict(res.challenge)["steps"] == [1, 2]
        assert peer in dispatcher.nodes
        beats.cancel_scope.cancel()
