"""The seed check over libp2p (docs/VERIFICATION.md, "Seed check"): real nodes, real steps.

Every sampled check also opens leaf 0 and has step 1 re-run by a node of another wallet,
which compares leaf 0 with the noise it regenerates from the job's seed. Honest nodes pass
(their leaf 0 is that noise bit for bit). A rogue worker that renders the job honestly but
with another seed (every step of its trajectory is a real step of the model, so only the seed
check can tell), or that replays an older job's real trajectory and image (same prompt,
another seed) for a new job, is caught: its receipt becomes evidence, it earns nothing, it is
struck, and the honest node renders the job again.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from sogni_app.api import render
from sogni_coordinator.verifiers import SEED_TOLERANCE
from sogni_net import Channel
from sogni_node.render.trajectory import Trajectory
from sogni_protocol import eip712
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    StepVerified,
)

from .conftest import receive_skipping, rogue_node, tiny_request
from .rogue_kit import (
    EVERY,
    checks_of,
    heartbeats,
    honest_joins,
    open_faithfully,
    real_render,
    refuse_next_step,
    spy_verifier_replies,
    submit_result,
    take_offer,
    wire,
)

pytestmark = pytest.mark.filterwarnings("ignore")


async def _open(channel: Channel, job_id: bytes, committed: Trajectory) -> list[int]:
    """Answer the coordinator's challenge faithfully; the steps it asked for."""
    challenge = await receive_skipping(channel, (Challenge,))
    assert challenge.job_id == job_id
    openings = [wire(committed, k) for k in challenge.steps]
    await channel.send(ChallengeAnswer(job_id=job_id, openings=openings), limit=RESULT_FRAME_LIMIT)
    return list(challenge.steps)


async def test_honest_nodes_pass_the_seed_check(
    net_factory: Any, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with net_factory(verification=EVERY) as net:
        replies = spy_verifier_replies(monkeypatch, net, StepVerified)
        await net.add_node(backend, "alice")
        await net.add_node(backend, "bob")
        with trio.fail_after(120):
            result = await render(net.addr, tiny_request(2, scheduler="euler_a"))
        assert len(result.images) == 2
        checks = checks_of(net.tmp)
        assert [c["verdict"] for c in checks] == ["pass", "pass"], checks
        # one seed comparison per check (step 1, k = 0), each exact: the measured d0
        starts = [r.start_distance for r in replies if r.start_distance is not None]
        assert starts == [0.0, 0.0]
        assert all(r.start_distance is None for r in replies if r.x_k_scale == 1.0)


@pytest.mark.parametrize("rogue", ["another_seed", "replayed_older_job"])
async def test_a_rogue_with_the_wrong_start_is_caught_and_its_job_rendered_again(
    net_factory: Any, backend: Any, rogue: str
) -> None:
    async with (
        net_factory(verification=EVERY) as net,
        rogue_node(net) as (channel, acct),
        trio.open_nursery() as beats,
    ):
        beats.start_soon(heartbeats, channel)
        dispatcher = net.coordinator.dispatcher
        request = tiny_request(1, scheduler="euler")
        results: list[Any] = []

        async def client(req: Any) -> None:
            results.append(await render(net.addr, req))

        with trio.fail_after(150):
            if rogue == "replayed_older_job":
                # an older job, same prompt, seed 5, rendered honestly by the rogue; alone on
                # the network its check is skipped (no other wallet) and it is delivered
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client, msgspec.structs.replace(request, seed=5))
                    older = await take_offer(channel)
                    assert older.params.seed == 5
                    image, committed = await real_render(backend, older.params)
                    old_id = await submit_result(
                        net, channel, acct, older, image, committed, dtype=backend.dtype_name
                    )
                    await _open(channel, old_id, committed)
                assert dispatcher.store.check_state(old_id) == "skipped"
                results.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client, request)
                offer = await take_offer(channel)
                assert offer.params.seed == 1
                if rogue == "another_seed":  # every step real, from seed 2's noise
                    params = msgspec.structs.replace(offer.params, seed=2)
                    image, committed = await real_render(backend, params)
                # else: the older job's image and trajectory, replayed
                job_id = await submit_result(
                    net, channel, acct, offer, image, committed, dtype=backend.dtype_name
                )
                assert dispatcher.store.check_state(job_id) == "pending"
                challenge = await receive_skipping(channel, (Challenge,))
                assert {0, 1} <= set(challenge.steps)
                honest = await honest_joins(net, backend)  # the verifier, then worker
                await open_faithfully(channel, job_id, committed, challenge.steps)
                # the honest node renders the job again; the rogue, the only other wallet,
                # is asked to verify it and refuses: the honest node is released anyway
                await refuse_next_step(channel)
        (result,) = results
        (image_out,) = result.images
        assert eip712.same_address(image_out.receipt.worker, honest.wallet.address)
        ((_, worker, evidence, reason),) = dispatcher.store.failed_receipts(job_id)
        assert eip712.same_address(worker, acct.address)
        assert evidence.trajectory_root == committed.root
        assert "seed's noise" in reason, reason
        assert len(dispatcher.reputation.get(acct.address).strikes) == 1
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        payable = [r.receipt for r in dispatcher.store.unsettled_receipts()]
        assert job_id in [r.job_id for r in payable]
        for r in payable:
            if r.job_id == job_id:
                assert eip712.same_address(r.worker, honest.wallet.address)
        *_, failed, released = checks_of(net.tmp)
        assert failed["verdict"] == "fail" and failed["step"] == 0
        assert eip712.same_address(failed["verifier"], honest.wallet.address)
        assert failed["tolerance"] == SEED_TOLERANCE
        assert failed["distance"] > 0.5  # independent noise: about sqrt(2)
        assert released["verdict"] == "skipped"
        assert eip712.same_address(released["worker"], honest.wallet.address)
        beats.cancel_scope.cancel()
