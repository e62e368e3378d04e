"""Challenges over libp2p: the coordinator asks a node to open steps of a receipted render.

An honest node answers from the trajectory it kept, and the answer opens the receipt's root;
a node whose trajectory file is gone refuses; a rogue node that answers with other latents
than it committed to fails the check. (What the check cannot catch yet, a rogue that
committed made-up latents and opens them faithfully, is shown too: that is the verifier
re-render's job, docs/TRAJECTORY.md.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio

from sogni_app.api import render
from sogni_coordinator.challenges import ChallengeResult, choose_steps
from sogni_coordinator.dispatch import Dispatcher
from sogni_net import Channel
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    encode,
)

from .conftest import receive_skipping, rogue_node, tiny_request
from .rogue_kit import heartbeats, made_up_trajectory, peer_of, rogue_result, stored_receipt, wire

pytestmark = pytest.mark.filterwarnings("ignore")


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
        peer = peer_of(dispatcher, node.wallet.address)
        first, second = (im.job_id for im in result.images)

        receipt = stored_receipt(dispatcher, first)
        assert receipt.trajectory_root != bytes(32) and receipt.steps_done == 3
        every_leaf = await dispatcher.challenge(peer, first, [0, 1, 2, 3], timeout=20)
        assert every_leaf.answer is not None, every_leaf.refused
        assert every_leaf.fault(receipt) is None
        assert len(encode(every_leaf.answer)) > CONTROL_FRAME_LIMIT
        drawn = choose_steps(receipt.steps_done, 1)
        assert (await dispatcher.challenge(peer, first, drawn, timeout=20)).fault(receipt) is None
        # asked of the wrong receipt (another job's root): the same honest openings fail
        assert (
            every_leaf.fault(stored_receipt(dispatcher, second)) == "the answer is for another job"
        )

        out_of_range = await dispatcher.challenge(peer, first, [3, 4], timeout=20)
        assert out_of_range.answer is None
        assert "outside the 4 committed leaves" in (out_of_range.fault(receipt) or "")

        kept = net.tmp / "honest" / "trajectories" / f"{second.hex()}.safetensors"
        assert kept.is_file()
        kept.unlink()  # expired, or lost with a disk
        lost = await dispatcher.challenge(peer, second, [1, 2], timeout=20)
        assert lost.answer is None
        assert lost.fault(stored_receipt(dispatcher, second)) == (
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


async def test_a_rogue_answering_with_other_latents_fails(net_factory: Any) -> None:
    async with (
        net_factory() as net,
        rogue_node(net) as (channel, acct),
        trio.open_nursery() as beats,
    ):
        beats.start_soon(heartbeats, channel)
        committed = made_up_trajectory(3, seed=11)
        async with trio.open_nursery() as nursery:  # a client, so there is a job to take
            nursery.start_soon(render, net.addr, tiny_request(1))
            job_id = await rogue_result(net, channel, acct, committed)
            nursery.cancel_scope.cancel()
        dispatcher = net.coordinator.dispatcher
        peer = peer_of(dispatcher, acct.address)
        receipt = stored_receipt(dispatcher, job_id)
        assert receipt.trajectory_root == committed.root

        def tampered(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(
                job_id=c.job_id, openings=[wire(committed, 1, True), wire(committed, 2)]
            )

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, tampered)
        assert res.fault(receipt) == "step 1 does not match the committed trajectory root"

        def another_run(c: Challenge) -> ChallengeAnswer:  # latents made up after the ask
            fresh = made_up_trajectory(3, seed=12)
            return ChallengeAnswer(job_id=c.job_id, openings=[wire(fresh, k) for k in c.steps])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, another_run)
        assert res.fault(receipt) == "step 1 does not match the committed trajectory root"

        def one_missing(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(job_id=c.job_id, openings=[wire(committed, 1)])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, one_missing)
        assert res.fault(receipt) == "asked for steps [1, 2], opened [1]"

        # Faithful openings of made-up latents pass: this check proves commitment, not
        # honest steps (the verifier's re-render of step 2 from leaf 1 is what catches it).
        def faithful(c: Challenge) -> ChallengeAnswer:
            return ChallengeAnswer(job_id=c.job_id, openings=[wire(committed, k) for k in c.steps])

        res = await _challenge_rogue(dispatcher, peer, job_id, channel, faithful)
        assert res.fault(receipt) is None
        assert msgspec.structs.asdict(res.challenge)["steps"] == [1, 2]
        assert peer in dispatcher.nodes
        beats.cancel_scope.cancel()
