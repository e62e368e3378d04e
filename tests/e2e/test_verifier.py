"""Verifier nodes over libp2p: a node of another wallet re-runs a challenged step.

Two real nodes of different wallets serve the tiny model. After a render, the coordinator
challenges the worker for leaves k and k + 1, sends leaf k to the other node (`VerifyStep`),
and measures the worker's leaf k + 1 against the verifier's x'_{k+1}: an honest step passes
(the same engine reproduces it exactly), another seed's latents fail, and with only the
worker's own wallet connected there is no verifier at all.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sogni_app.api import render
from sogni_coordinator.dispatch import Dispatcher
from sogni_coordinator.verifiers import StepVerdict, verify_step
from sogni_protocol import eip712
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import JobParams, StepOpeningWire, encode, job_params

from .conftest import tiny_request
from .rogue_kit import peer_of, stored_receipt

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red circle"  # tiny_request's prompt: it must never reach a log


async def _open(dispatcher: Dispatcher, job_id: bytes, leaves: list[int]) -> list[StepOpeningWire]:
    """Challenge the job's worker for `leaves`; the answer must open its receipt's root."""
    receipt = stored_receipt(dispatcher, job_id)
    peer = peer_of(dispatcher, receipt.worker)
    res = await dispatcher.challenge(peer, job_id, leaves, timeout=20)
    assert res.answer is not None, res.refused
    assert res.fault(receipt) is None
    return sorted(res.answer.openings, key=lambda o: o.step)


async def test_another_wallets_node_re_runs_a_challenged_step(
    net_factory: Any, backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with net_factory() as net:
        nodes = [await net.add_node(backend, "alice"), await net.add_node(backend, "bob")]
        request = tiny_request(2)
        with trio.fail_after(60):
            result = await render(net.addr, request)
        capsys.readouterr()  # from here on: what verification logs
        dispatcher = net.coordinator.dispatcher
        first, second = (im.job_id for im in result.images)
        params: JobParams = job_params(request, 0)
        worker = stored_receipt(dispatcher, first).worker
        worker_peer = peer_of(dispatcher, worker)
        leaves = await _open(dispatcher, first, [0, 1, 2])

        async def verify(k: int, nxt: StepOpeningWire, timeout: float = 30) -> StepVerdict:
            return await verify_step(
                dispatcher,
                params=params,
                scheduler=params.scheduler,
                worker=worker,
                opening_k=leaves[k],
                opening_next=nxt,
                dtype=backend.dtype_name,
                timeout=timeout,
            )

        with trio.fail_after(40):
            for k in (0, 1):  # step 0 scales leaf 0 by init_noise_sigma; step 1 does not
                verdict = await verify(k, leaves[k + 1])
                assert verdict.passed, verdict.reason
                assert verdict.step == k and verdict.tolerance == 5e-5
                assert verdict.distance is not None and verdict.distance < 5e-5
                assert verdict.verifier is not None and verdict.verifier != worker_peer
                other = dispatcher.nodes[verdict.verifier].wallet
                assert not eip712.same_address(other, worker)

            # another seed's leaf 2 (the second image, seed 2) in place of the worker's
            (other_next,) = [o for o in await _open(dispatcher, second, [2])]
            tampered = await verify(1, other_next)
            assert not tampered.passed
            assert tampered.distance is not None and tampered.distance > 100 * 5e-5
            assert "over 5e-05" in tampered.reason

            unmeasured = await verify_step(
                dispatcher,
                params=params,
                scheduler=params.scheduler,
                worker=worker,
                opening_k=leaves[1],
                opening_next=leaves[2],
                dtype="float16",
                timeout=5,
            )
            assert not unmeasured.passed and unmeasured.verifier is None
            assert "no tolerance measured" in unmeasured.reason
        assert len(dispatcher.verifications) == 0

        # only the worker's own wallet left connected: nobody may verify it
        for handle in nodes:
            if not eip712.same_address(handle.wallet.address, worker):
                handle.stop.set()
                with trio.fail_after(20):
                    await handle.done.wait()
        with trio.fail_after(10):
            while len(dispatcher.nodes) != 1:
                await trio.sleep(0.05)
        alone = await verify(1, leaves[2])
        assert not alone.passed and alone.verifier is None and alone.distance is None
        assert alone.reason.startswith("no verifier")
    logs = capsys.readouterr()
    assert "step_reverified" in logs.out + logs.err
    assert PROMPT not in logs.out + logs.err


async def test_a_leaf_above_a_control_frame_travels(net_factory: Any, backend: Any) -> None:
    """512 x 512: a latent of 64 KiB, so `VerifyStep` and `StepVerified` exceed a control
    frame and go under the result frame limit both ways."""
    async with net_factory() as net:
        await net.add_node(backend, "alice")
        await net.add_node(backend, "bob")
        request = tiny_request(1, width=512, height=512, steps=2)
        with trio.fail_after(60):
            result = await render(net.addr, request)
        dispatcher = net.coordinator.dispatcher
        job_id = result.images[0].job_id
        leaves = await _open(dispatcher, job_id, [1, 2])
        assert len(encode(leaves[0])) > CONTROL_FRAME_LIMIT
        with trio.fail_after(40):
            verdict = await verify_step(
                dispatcher,
                params=job_params(request, 0),
                scheduler="",
                worker=stored_receipt(dispatcher, job_id).worker,
                opening_k=leaves[0],
                opening_next=leaves[1],
                dtype=backend.dtype_name,
                timeout=30,
            )
        assert verdict.passed, verdict.reason
        assert verdict.distance is not None and verdict.distance < 5e-5
