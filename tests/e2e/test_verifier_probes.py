"""A lazy verifier over libp2p, caught by a known-answer probe (docs/VERIFICATION.md,
"Checking the verifiers").

Two honest nodes (real `run_node`, the tiny model) render and verify one job: its checked
steps become known answers. One of them leaves; a lazy verifier (a bare libp2p stream that
answers every `VerifyStep` at once without running anything) joins. The remaining honest
node renders a second job; the lazy verifier, the only other wallet, fails it. With no third
wallet to re-run the step, the coordinator probes the lazy verifier with a step of the first
job (whose answer it holds): the lazy answer is over tolerance, the verifier loses standing,
its fail is discarded, and the honest worker is paid, unstruck (the check is `skipped`: no
verifier with standing is left). `lazy_verifier` is shared with `test_rogue_models.py`.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sogni_app.api import render
from sogni_coordinator.checks import PROBE_FAILED
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import Channel
from sogni_protocol import eip712
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    StepVerified,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
    VerifyStep,
)

from .conftest import receive_skipping, rogue_node, tiny_request
from .rogue_kit import checks_of, heartbeats

pytestmark = pytest.mark.filterwarnings("ignore")

POLICY = VerificationConfig(
    rate=1.0, challenge_timeout=30.0, verify_timeout=30.0, image_check=False, probe_rate=0.0
)
"""Every receipt checked; probes only where a fail needs confirming (deterministic)."""


async def lazy_verifier(channel: Channel, answer: str, asked: list[VerifyStep]) -> None:
    """Answer every `VerifyStep` at once without computing: leaf k echoed back
    (`echoes_leaf_k`, d = 1.0) or zeros (`zeros`); refuse anything else asked to verify."""
    while True:
        msg = await receive_skipping(
            channel, (VerifyStep, VerifyDecode), timeout=120, limit=RESULT_FRAME_LIMIT
        )
        if isinstance(msg, VerifyDecode):
            await channel.send(VerifyRefused(check_id=msg.check_id, reason="no"))
            continue
        asked.append(msg)
        await channel.send(lazy_reply(msg, answer), limit=RESULT_FRAME_LIMIT)


def lazy_reply(ask: VerifyStep, answer: str) -> StepVerified:
    """What a verifier that computes nothing answers (see `lazy_verifier`)."""
    leaf = next(t for t in ask.opening.tensors if t.name == "latents")
    data = leaf.data if answer == "echoes_leaf_k" else bytes(len(leaf.data))
    lazy = TensorEntry(name="latents", dtype="float32", shape=leaf.shape, data=data)
    d0 = 0.0 if ask.k == 0 else None  # it claims the seed check passed, too
    return StepVerified(check_id=ask.check_id, latents=lazy, start_distance=d0)


async def test_a_lazy_verifier_fails_a_known_answer_probe_in_a_two_wallet_network(
    net_factory: Any, backend: Any
) -> None:
    async with net_factory(verification=POLICY) as net:
        dispatcher = net.coordinator.dispatcher
        checks = dispatcher.checks
        honest = await net.add_node(backend, "honest")
        leaving = await net.add_node(backend, "leaving")
        with trio.fail_after(60):
            await render(net.addr, tiny_request(1, scheduler="euler"))
            while len(checks_of(net.tmp)) < 1:
                await trio.sleep(0.05)
        (first,) = checks_of(net.tmp)
        assert first["verdict"] == "pass", first
        assert len(checks.known) >= 1  # its verified steps are known answers now
        leaving.stop.set()
        await leaving.done.wait()
        while len(dispatcher.nodes) > 1:
            await trio.sleep(0.05)
        # the second job must be rendered by the honest node: was it the first job's worker?
        async with rogue_node(net) as (channel, acct), trio.open_nursery() as beats:
            beats.start_soon(heartbeats, channel)
            asked: list[VerifyStep] = []
            beats.start_soon(lazy_verifier, channel, "zeros", asked)
            with trio.fail_after(60):
                result = await render(net.addr, tiny_request(1, scheduler="euler", seed=7))
            beats.cancel_scope.cancel()
        (image,) = result.images
        assert eip712.same_address(image.receipt.worker, honest.wallet.address)
        second = checks_of(net.tmp)[1]
        assert eip712.same_address(second["worker"], honest.wallet.address)
        assert second["verdict"] == "skipped" and "no verifier" in second["reason"], second
        assert PROBE_FAILED in second["reason"]
        assert len(asked) == 2  # the real step, then the probe (indistinguishable to it)
        assert asked[0].check_id != asked[1].check_id
        assert asked[1].params.seed != 7  # the probe is a step of the first job
        assert not checks.standing.has_standing(acct.address)
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        assert dispatcher.store.failed_receipts(image.job_id) == []
        payable = {r.receipt.job_id for r in dispatcher.store.unsettled_receipts()}
        assert image.job_id in payable
        work = dispatcher.store.verifier_work([image.job_id])
        assert image.job_id not in work  # the lazy answer and the probe are not paid
