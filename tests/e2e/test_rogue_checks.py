"""Held receipts over libp2p (`sogni_coordinator.checks`, rate = 1): real nodes, real steps.

Two honest nodes of different wallets check each other: every check passes and every image
is delivered. A rogue worker (a bare libp2p stream, `conftest.rogue_node`) that commits to
made-up latents and opens them faithfully (its Merkle proofs hold: only the honest node's
re-run of the step catches it), or that refuses to reveal, is caught: its receipt becomes
evidence, it earns nothing, it is struck, and the job is rendered again by the honest node,
which is never refused (its own check is skipped when the only other wallet, the rogue,
will not verify).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sogni_app.api import render
from sogni_protocol import eip712
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
)

from .conftest import receive_skipping, tiny_request
from .rogue_kit import (
    EVERY,
    checks_of,
    honest_joins,
    made_up_trajectory,
    refuse_next_step,
    rogue_rendering,
    rogue_result,
    wire,
)

pytestmark = pytest.mark.filterwarnings("ignore")

LATENTS = (1, 4, 16, 16)
"""The tiny model's latent for 64 x 64 (its VAE downsamples by 4)."""


async def test_honest_nodes_pass_every_check_and_every_image_is_delivered(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory(verification=EVERY) as net:
        a = await net.add_node(backend, "alice")
        b = await net.add_node(backend, "bob")
        with trio.fail_after(120):
            result = await render(net.addr, tiny_request(4))
        assert len(result.images) == 4
        dispatcher = net.coordinator.dispatcher
        checks = checks_of(net.tmp)
        assert len(checks) == 4
        assert all(c["verdict"] == "pass" for c in checks), checks
        for c in checks:
            assert not eip712.same_address(c["verifier"], c["worker"])
            assert {c["worker"].lower(), c["verifier"].lower()} == {
                a.wallet.address.lower(),
                b.wallet.address.lower(),
            }
            assert c["distance"] <= c["tolerance"]
            assert dispatcher.store.check_state(bytes.fromhex(c["jobId"][2:])) == "passed"
        assert len(dispatcher.store.unsettled_receipts()) == 4  # all payable
        for w in (a, b):
            assert dispatcher.reputation.get(w.wallet.address).strikes == []


@pytest.mark.parametrize("rogue", ["made_up_latents", "malformed_leaves", "refuses_to_reveal"])
async def test_a_rogue_worker_is_caught_unpaid_and_its_job_rendered_again(
    net_factory: Any, backend: Any, rogue: str
) -> None:
    async with net_factory(verification=EVERY) as net:
        dispatcher = net.coordinator.dispatcher
        async with rogue_rendering(net, tiny_request(1, scheduler="euler")) as run:
            channel, acct = run.channel, run.acct
            # "rendered" without the model: noise of the job's latent size, or (malformed)
            # latents of another size, which the verifier cannot even re-run
            shape = (1, 4, 8, 8) if rogue == "malformed_leaves" else LATENTS
            committed = made_up_trajectory(3, seed=11, shape=shape)
            job_id = await rogue_result(net, channel, acct, committed)
            assert dispatcher.store.check_state(job_id) == "pending"
            challenge = await receive_skipping(channel, (Challenge,))
            honest = await honest_joins(net, backend)  # the verifier, then worker
            if rogue == "refuses_to_reveal":
                answer: Any = ChallengeRefused(job_id=job_id, reason="not telling")
            else:  # faithful openings of what it committed: the Merkle check passes
                openings = [wire(committed, k) for k in challenge.steps]
                answer = ChallengeAnswer(job_id=job_id, openings=openings)
            await channel.send(answer, limit=RESULT_FRAME_LIMIT)
            # the honest node renders the job again; the rogue, the only other wallet,
            # is asked to verify it and will not: the honest node is released anyway
            await refuse_next_step(channel)
        (result,) = run.results
        (image,) = result.images
        assert eip712.same_address(image.receipt.worker, honest.wallet.address)
        stored = dispatcher.store.receipt(job_id)
        assert stored is not None
        assert eip712.same_address(stored.receipt.worker, honest.wallet.address)
        ((_, worker, evidence, reason),) = dispatcher.store.failed_receipts(job_id)
        assert eip712.same_address(worker, acct.address)
        assert evidence.trajectory_root == committed.root
        assert len(dispatcher.reputation.get(acct.address).strikes) == 1
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        payable = [r.receipt.worker for r in dispatcher.store.unsettled_receipts()]
        assert [w.lower() for w in payable] == [honest.wallet.address.lower()]
        failed, released = checks_of(net.tmp)
        assert failed["verdict"] == "fail" and eip712.same_address(failed["worker"], acct.address)
        if rogue == "made_up_latents":
            assert eip712.same_address(failed["verifier"], honest.wallet.address)
            assert failed["distance"] > 100 * failed["tolerance"]
            assert "over" in reason
        elif rogue == "malformed_leaves":
            assert eip712.same_address(failed["verifier"], honest.wallet.address)
            assert "could not re-run the step" in reason
        else:
            assert "not telling" in reason
        assert released["verdict"] == "skipped"
        assert eip712.same_address(released["worker"], honest.wallet.address)
