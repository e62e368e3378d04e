"""Rogue workers that really render, and a lazy verifier, over libp2p (issue #12; rate = 1).

`test_rogue_checks.py` covers made-up latents and a worker that will not reveal. Here the rogue
(a bare libp2p stream, `conftest.rogue_node`) runs the real diffusers pipeline of the tiny model
on its own `DiffusersBackend`, records the trajectory exactly as an honest node does and opens
it faithfully (every Merkle proof holds), but cheats in the render:

- **another model**: a UNet with other weights (a fresh random init, or the served UNet with 1%
  weight noise, the bench's "near model"), while its hello and receipt name the served model;
- **skipped steps**: one UNet call skipped (the previous output reused, as the bench does), or
  the last step not run at all (its leaf a copy of the one before).

With `[verification]` rate = 1 the honest node's re-run of a drawn step catches it: the
receipt becomes evidence, the rogue is unpaid and struck, and the honest node renders the job
again. The honest node is never failed: its own check is `skipped`, because the only other
wallet (the rogue) will not verify it.

Measured on the tiny model (64 x 64, Euler, 3 and 4 steps, float32, tolerance 5e-5), d per
step: another random UNet 1.36-1.41 and the 1% near UNet 0.019-0.038 at every step (so any
drawn step catches them); the reused UNet output 0.24 at the skipped step and 0.0 at every
other; the copied last leaf d = inf at the last step and 0.0 elsewhere.

Last, a lazy verifier (it answers without computing) cannot fail an honest worker: its fail
is re-run on a third wallet's node, which overrules it, and it loses standing
(docs/VERIFICATION.md, "Checking the verifiers"; the two-wallet case, decided by a known-answer
probe, is `test_verifier_probes.py`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import trio

from sogni_app.api import render
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import Channel
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.render.trajectory import StepRecord, Trajectory
from sogni_node.worker import _render_job
from sogni_protocol import eip712
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    Challenge,
    VerifyStep,
)

from .conftest import MODEL, Net, NodeHandle, receive_skipping, rogue_node, tiny_request
from .rogue_kit import (
    checks_of,
    heartbeats,
    honest_joins,
    open_faithfully,
    refuse_next_step,
    submit_result,
    take_offer,
)
from .test_verifier_probes import POLICY as PROBES_OFF
from .test_verifier_probes import lazy_reply, lazy_verifier

pytestmark = pytest.mark.filterwarnings("ignore")


def _policy(pairs: int) -> VerificationConfig:
    return VerificationConfig(rate=1.0, pairs=pairs, challenge_timeout=30.0, verify_timeout=30.0)


@pytest.fixture(scope="module")
def rogue_backend(registry: Any) -> Iterator[DiffusersBackend]:
    """The rogue's own engine: the same tiny model, loaded into a pipeline of its own (the
    honest nodes' shared backend is never touched by the cheats below)."""
    b = DiffusersBackend(registry, device="cpu", threads=1)
    yield b
    b.close()


# --- cheats: context managers over the rogue's pipeline ------------------------------------
Cheat = Callable[[Any], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _swapped_unet(pipe: Any, unet: Any) -> Iterator[None]:
    served = pipe.unet
    pipe.unet = unet
    try:
        yield
    finally:
        pipe.unet = served


def another_random_unet(pipe: Any) -> contextlib.AbstractContextManager[None]:
    """The tiny UNet's architecture with weights from another seed: another model."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    return _swapped_unet(pipe, unet.eval())


def near_unet(pipe: Any) -> contextlib.AbstractContextManager[None]:
    """The served UNet plus Gaussian noise of 1% of each tensor's std (bench's near model)."""
    unet = copy.deepcopy(pipe.unet)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.01)
    return _swapped_unet(pipe, unet)


def reused_unet_output(skipped: int) -> Cheat:
    """UNet call `skipped` (0-based step) is not made: the previous step's output is reused
    (the bench's skipping cheat: it saves that step's UNet cost and still commits a latent)."""

    @contextlib.contextmanager
    def cheat(pipe: Any) -> Iterator[None]:
        unet = pipe.unet
        original = unet.forward
        calls = [0]
        last: list[Any] = [None]

        def forward(*args: Any, **kwargs: Any) -> Any:
            i = calls[0]
            calls[0] += 1
            if i != skipped or last[0] is None:
                last[0] = original(*args, **kwargs)
            return last[0]

        unet.forward = forward
        try:
            yield
        finally:
            del unet.forward

    return cheat


@contextlib.contextmanager
def honest_engine(pipe: Any) -> Iterator[None]:
    yield


def copied_last_leaf(t: Trajectory) -> Trajectory:
    """The last step not run: its leaf commits the latents of the one before."""
    records = list(t)
    last = records[-1]
    records[-1] = StepRecord(
        step=last.step,
        tensors={**last.tensors, "latents": records[-2].latents},
        dtypes=last.dtypes,
        scalars=last.scalars,
    )
    return Trajectory(records)


# --- the rogue worker ----------------------------------------------------------------------
async def _rogue_renders(
    net: Net,
    channel: Channel,
    acct: Any,
    engine: DiffusersBackend,
    cheat: Cheat,
    edit: Callable[[Trajectory], Trajectory] | None,
) -> tuple[bytes, Trajectory]:
    """Take one job, render it on the rogue's engine under `cheat` (then `edit` what it
    commits), and get a receipt naming the served model and the committed root."""
    offer = await take_offer(channel)
    job = _render_job(offer.params, None)

    def run() -> Any:
        with cheat(engine._get(job.model_id).pipe):
            return engine.render(job, lambda _: None, lambda: False)

    out = await trio.to_thread.run_sync(run)
    assert out.trajectory is not None and out.steps_done == offer.offer.steps
    committed = edit(out.trajectory) if edit is not None else out.trajectory
    job_id = await submit_result(
        net, channel, acct, offer, out.image, committed, dtype=out.dtype, backend=out.backend
    )
    return job_id, committed


@dataclass
class Caught:
    failed: dict[str, Any]
    """The rogue's check, as logged."""
    reason: str
    """The reason stored with the failed receipt (the evidence)."""
    honest: NodeHandle


async def _rogue_is_caught(
    net_factory: Any,
    backend: Any,
    engine: DiffusersBackend,
    cheat: Cheat,
    *,
    pairs: int,
    steps: int,
    edit: Callable[[Trajectory], Trajectory] | None = None,
) -> Caught:
    """The rogue takes the job alone, commits its cheat and opens it faithfully once an honest
    node (the verifier, then the re-renderer) is connected. Asserts what every cheat costs."""
    async with (
        net_factory(verification=_policy(pairs)) as net,
        rogue_node(net) as (channel, acct),
        trio.open_nursery() as beats,
    ):
        beats.start_soon(heartbeats, channel)
        dispatcher = net.coordinator.dispatcher
        results: list[Any] = []

        async def client() -> None:
            results.append(await render(net.addr, tiny_request(1, steps=steps, scheduler="euler")))

        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                job_id, committed = await _rogue_renders(net, channel, acct, engine, cheat, edit)
                assert dispatcher.store.check_state(job_id) == "pending"
                challenge = await receive_skipping(channel, (Challenge,))
                honest = await honest_joins(net, backend)
                await open_faithfully(channel, job_id, committed, challenge.steps)  # faithful
                await refuse_next_step(channel)
        (result,) = results
        (image,) = result.images
        assert eip712.same_address(image.receipt.worker, honest.wallet.address)
        ((_, worker, evidence, reason),) = dispatcher.store.failed_receipts(job_id)
        assert eip712.same_address(worker, acct.address)
        assert evidence.trajectory_root == committed.root
        assert evidence.model_id == MODEL  # it claimed the served model throughout
        assert len(dispatcher.reputation.get(acct.address).strikes) == 1
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        payable = [r.receipt.worker for r in dispatcher.store.unsettled_receipts()]
        assert [w.lower() for w in payable] == [honest.wallet.address.lower()]
        failed, released = checks_of(net.tmp)
        assert failed["verdict"] == "fail" and eip712.same_address(failed["worker"], acct.address)
        assert eip712.same_address(failed["verifier"], honest.wallet.address)
        assert "over 5e-05" in reason
        # the honest node is never failed: the sole other wallet (the rogue) would not verify
        assert released["verdict"] == "skipped", released
        assert eip712.same_address(released["worker"], honest.wallet.address)
        assert released["reason"] == "verifier refused: no"
        beats.cancel_scope.cancel()
    return Caught(failed, reason, honest)


# --- another model ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cheat", "pairs"),
    [(another_random_unet, 1), (near_unet, 2)],
    ids=["random_weights", "one_percent_weight_noise"],
)
async def test_a_worker_rendering_another_model_is_caught(
    net_factory: Any, backend: Any, rogue_backend: DiffusersBackend, cheat: Cheat, pairs: int
) -> None:
    """`pairs` is docs/VERIFICATION.md's "c for >= 99%" (measured on the shipped model: 1
    for a random model, 2 for the near one, whose zero-terminal-SNR step 0 can pass). On the
    tiny model every step of either is over tolerance (module docstring), so whichever steps
    are drawn the first one re-run fails: deterministic."""
    caught = await _rogue_is_caught(
        net_factory, backend, rogue_backend, cheat, pairs=pairs, steps=3
    )
    d = caught.failed["distance"]
    assert caught.failed["step"] in (0, 1, 2)
    if cheat is another_random_unet:
        assert d > 0.5  # measured 1.36-1.39
    else:
        assert 1e-3 < d < 0.5  # measured 0.020-0.038: 400x the tolerance, yet a near model


# --- skipped steps ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cheat", "edit", "faked"),
    [(reused_unet_output(2), None, 2), (honest_engine, copied_last_leaf, 3)],
    ids=["unet_output_reused", "last_step_not_run"],
)
async def test_a_worker_skipping_a_step_is_caught_when_that_step_is_checked(
    net_factory: Any,
    backend: Any,
    rogue_backend: DiffusersBackend,
    cheat: Cheat,
    edit: Callable[[Trajectory], Trajectory] | None,
    faked: int,
) -> None:
    """One step of 4 is faked; every other step is an honest step from the committed latent
    (the re-run of the step after it, from the faked leaf, reproduces exactly). So a checked
    pair catches it only if it lands on the faked step: probability 1/4 per pair, c/4 with c
    distinct pairs (docs/VERIFICATION.md: partial skipping needs about N - 1 pairs). Here
    pairs = 4 = every step, so it is caught, at exactly the faked step, every time; the steps
    re-run before it passed."""
    caught = await _rogue_is_caught(
        net_factory, backend, rogue_backend, cheat, pairs=4, steps=4, edit=edit
    )
    assert caught.failed["step"] == faked
    assert f"step {faked}: d = " in caught.reason
    if edit is copied_last_leaf:  # a leaf that did not move: d = inf (logged as null)
        assert caught.failed["distance"] is None and "d = inf" in caught.reason
    else:
        assert caught.failed["distance"] > 1e-2  # measured 0.24


# --- a lazy verifier -------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["echoes_leaf_k", "zeros"])
async def test_a_lazy_verifier_does_not_fail_an_honest_worker(
    net_factory: Any, backend: Any, answer: str
) -> None:
    """An honest node renders one job; the rogue, then the only other wallet, is asked to
    verify its step and answers at once without running the UNet: leaf k echoed back (it
    never sees leaf k + 1; d = 1.0) or zeros (d = |x_{k+1}| / |x_{k+1} - x_k|), over
    tolerance. Before it answers, a third wallet's honest node joins: the coordinator re-runs
    the step there, the third agrees with the worker, so the lazy verifier loses standing,
    its answer is discarded (and unpaid) and the honest worker is delivered, paid, unstruck."""
    async with (
        net_factory(verification=PROBES_OFF) as net,
        rogue_node(net) as (channel, acct),  # never Ready: it takes no job, only checks
        trio.open_nursery() as beats,
    ):
        beats.start_soon(heartbeats, channel)
        dispatcher = net.coordinator.dispatcher
        honest = await net.add_node(backend, "honest")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                results: list[Any] = []

                async def client() -> None:
                    results.append(await render(net.addr, tiny_request(1, scheduler="euler")))

                nursery.start_soon(client)
                ask = await receive_skipping(
                    channel, (VerifyStep,), timeout=50, limit=RESULT_FRAME_LIMIT
                )
                third = await net.add_node(backend, "third")  # joins while the check waits
                await channel.send(lazy_reply(ask, answer), limit=RESULT_FRAME_LIMIT)
                asked: list[VerifyStep] = []
                nursery.start_soon(lazy_verifier, channel, answer, asked)
                while not results:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        beats.cancel_scope.cancel()
        (image,) = results[0].images
        assert eip712.same_address(image.receipt.worker, honest.wallet.address)
        (check,) = checks_of(net.tmp)
        assert check["verdict"] == "pass" and "overruled a verifier's fail" in check["reason"]
        assert eip712.same_address(check["worker"], honest.wallet.address)
        assert eip712.same_address(check["verifier"], third.wallet.address)
        assert asked == []  # without standing it is not asked again
        assert not dispatcher.checks.standing.has_standing(acct.address)
        assert dispatcher.reputation.get(honest.wallet.address).strikes == []
        assert dispatcher.store.failed_receipts(image.job_id) == []
        payable = [r.receipt.job_id for r in dispatcher.store.unsettled_receipts()]
        assert payable == [image.job_id]
        ((paid, steps),) = dispatcher.store.verifier_work([image.job_id])[image.job_id]
        assert eip712.same_address(paid, third.wallet.address) and steps >= 1
