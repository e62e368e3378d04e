"""Shared pieces of the rogue-node and verification tests: what a rogue sends (a flat image,
made-up but correctly committed trajectories, faithful openings), how its stream stays alive,
a rogue with a client waiting on its job (`rogue_rendering`), and where the coordinator's
check log is."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import torch
import trio
from PIL import Image

from sogni_coordinator.dispatch import Dispatcher
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import Channel
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.render.trajectory import Trajectory, TrajectoryRecorder
from sogni_node.worker import _render_job
from sogni_protocol import eip712
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    ChallengeAnswer,
    Heartbeat,
    JobParams,
    Offer,
    Ready,
    Receipt,
    RenderMeta,
    Result,
    ResultAck,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    VerifyRefused,
    VerifyStep,
)

from .conftest import Net, receive_skipping, rogue_node

T = TypeVar("T")

EVERY = VerificationConfig(rate=1.0, challenge_timeout=30.0, verify_timeout=30.0)
"""Check every receipt."""


def checks_of(tmp: Path) -> list[dict[str, Any]]:
    """The coordinator's `verifications.jsonl`, one dict per check."""
    path = tmp / "coordinator" / "verifications.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def peer_of(dispatcher: Dispatcher, wallet: str) -> str:
    peers = [p for p, link in dispatcher.nodes.items() if eip712.same_address(link.wallet, wallet)]
    assert len(peers) == 1
    return peers[0]


def stored_receipt(dispatcher: Dispatcher, job_id: bytes) -> Receipt:
    stored = dispatcher.store.receipt(job_id)
    assert stored is not None
    return stored.receipt


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def made_up_trajectory(steps: int, seed: int, shape: tuple[int, ...] = (1, 4, 8, 8)) -> Trajectory:
    """A correctly committed trajectory of noise: every Merkle proof holds, no step is real."""
    rec = TrajectoryRecorder()
    gen = torch.Generator("cpu").manual_seed(seed)
    for k in range(steps + 1):
        rec.record(k, torch.randn(shape, generator=gen), timestep=None if k == 0 else 1.0)
    return rec.finish()


def wire(t: Trajectory, step: int, tamper: bool = False) -> StepOpeningWire:
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


async def take_offer(channel: Channel) -> Offer:
    """Ask for one job and take the offer."""
    await channel.send(Ready(slots=1))
    offer: Offer = await receive_skipping(channel, (Offer,))
    return offer


async def submit_result(
    net: Net,
    channel: Channel,
    acct: Any,
    offer: Offer,
    image: bytes,
    committed: Trajectory,
    *,
    dtype: str = "float32",
    backend: str = "rogue",
) -> bytes:
    """Sign a receipt for `offer` naming `image` and `committed`'s root, send it and see it
    accepted; the job id."""
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
    meta = RenderMeta(backend=backend, device="cpu", dtype=dtype, threads=1)
    result = Result(job_id=receipt.job_id, image=image, receipt=receipt, signature=sig, meta=meta)
    await channel.send(result, limit=RESULT_FRAME_LIMIT)
    ack = await receive_skipping(channel, (ResultAck,))
    assert ack.accepted, ack.reason
    return receipt.job_id


async def rogue_result(net: Net, channel: Channel, acct: Any, committed: Trajectory) -> bytes:
    """Take one job, 'render' it (a flat image) and get a receipt naming `committed`'s root."""
    offer = await take_offer(channel)
    image = png(offer.params.width, offer.params.height)
    return await submit_result(net, channel, acct, offer, image, committed)


async def heartbeats(channel: Channel) -> None:
    """What keeps a rogue's stream alive (the coordinator drops a silent node)."""
    seq = 0
    while True:
        seq += 1
        await channel.send(Heartbeat(seq=seq))
        await trio.sleep(0.5)


@dataclass
class RogueRun:
    """A rogue node's stream and wallet, a nursery for its background tasks (cancelled when
    the run ends), and the client's render results (one, once the run's block is left)."""

    channel: Channel
    acct: Any
    tasks: trio.Nursery
    results: list[Any] = field(default_factory=list)


@asynccontextmanager
async def rogue_rendering(net: Net, request: Any, timeout: float = 150) -> AsyncIterator[RogueRun]:
    """A heartbeating rogue node, and a client rendering `request` meanwhile; leaving the
    block waits (at most `timeout` s in all) for the client's result."""
    from sogni_app.api import render

    async with rogue_node(net) as (channel, acct), trio.open_nursery() as tasks:
        tasks.start_soon(heartbeats, channel)
        run = RogueRun(channel, acct, tasks)

        async def client() -> None:
            run.results.append(await render(net.addr, request))

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                yield run
        tasks.cancel_scope.cancel()


async def honest_joins(net: Net, backend: Any) -> Any:
    """An honest node joins (the verifier of the rogue's job, then its re-renderer); returns
    its handle once the coordinator has both nodes."""
    honest = await net.add_node(backend, "honest")
    while len(net.coordinator.dispatcher.nodes) < 2:
        await trio.sleep(0.05)
    return honest


async def open_faithfully(
    channel: Channel, job_id: bytes, committed: Trajectory, steps: list[int]
) -> None:
    """Answer a challenge with the committed leaves (every Merkle proof holds)."""
    answer = ChallengeAnswer(job_id=job_id, openings=[wire(committed, k) for k in steps])
    await channel.send(answer, limit=RESULT_FRAME_LIMIT)


async def refuse_next_step(channel: Channel) -> None:
    """The rogue, asked to verify the honest node's re-render, refuses (saying nothing
    about that node: it is released anyway)."""
    ask = await receive_skipping(channel, (VerifyStep,), timeout=120, limit=RESULT_FRAME_LIMIT)
    await channel.send(VerifyRefused(check_id=ask.check_id, reason="no"))


def spy_verifier_replies(monkeypatch: Any, net: Net, kind: type[T]) -> list[T]:
    """Every reply of type `kind` (`StepVerified`, `DecodeVerified`) a verifier sends the
    coordinator, in order."""
    pending = net.coordinator.dispatcher.verifications
    seen: list[T] = []
    original = pending.answered

    def answered(peer_id: str, reply: Any) -> bool:
        if isinstance(reply, kind):
            seen.append(reply)
        return original(peer_id, reply)

    monkeypatch.setattr(pending, "answered", answered)
    return seen


async def real_render(backend: DiffusersBackend, params: JobParams) -> tuple[bytes, Trajectory]:
    """A real render of `params` with the test backend: its image and trajectory."""
    job = _render_job(params, None)
    out = await trio.to_thread.run_sync(backend.render, job, lambda _: None, lambda: False)
    assert out.trajectory is not None
    return out.image, out.trajectory


async def another_seeds_render(
    backend: DiffusersBackend, params: JobParams
) -> tuple[bytes, Trajectory]:
    """A real render of the job with the next seed: an image the rogue had, not this job's."""
    return await real_render(backend, msgspec.structs.replace(params, seed=params.seed + 1))
