"""The coordinator's end of an app's stream (`/sogni/client/1.0.0`).

One stream per request: the app sends a `RenderRequest`; the coordinator validates it,
commits the request and its jobs, answers `RequestAccepted`, then streams progress, images
with their verified receipts, and `RequestDone`. If the app goes away the request still
runs to completion (the work was accepted and nodes are paid for it); its images are kept
on disk under the coordinator's results folder.

The first frame may instead be a signed `DailyBoostClaim` or `BalanceQuery`: one answer
(`BoostGranted`, `BalanceReport` or `RequestRefused`), then the stream closes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import trio

from sogni_coordinator.billing import Refusal
from sogni_coordinator.dispatch import Dispatcher, Job, RequestState
from sogni_net import Channel, ChannelClosed, ReadTimeout, TransportError
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.image_types import extension_of
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    BalanceQuery,
    CancelRequest,
    DailyBoostClaim,
    JobImage,
    Message,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    RequestRefused,
    split_request,
)
from sogni_protocol.pricing import work_units

log = get_logger(__name__)


def orphan_saver(results_dir: Path) -> Callable[[bytes, int, bytes], None]:
    """Where images go when their client has disconnected."""

    def save(request_id: bytes, index: int, image: bytes) -> None:
        folder = results_dir / request_id.hex()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:04d}.{extension_of(image)}").write_bytes(image)

    return save


def refusal_for(req: RenderRequest, dispatcher: Dispatcher, allowed: set[str]) -> str | None:
    """A configured model list is a promise (jobs wait for nodes); without one, only models
    some connected node has are accepted."""
    if allowed:
        if req.model_id not in allowed:
            return f"unknown model {req.model_id!r}: this coordinator serves {sorted(allowed)}"
    elif req.model_id not in dispatcher.known_models():
        return f"unknown model {req.model_id!r}: no connected node has it"
    elif not dispatcher.can_serve(req.network, req):
        loras = f" with LoRAs {[lora.id for lora in req.loras]}" if req.loras else ""
        return (
            f"no connected node can serve {req.network} {req.model_id} at "
            f"{req.width}x{req.height}{loras} now"
        )
    return None


async def serve_client(
    channel: Channel,
    dispatcher: Dispatcher,
    *,
    allowed_models: set[str],
    results_dir: Path,
) -> None:
    peer = channel.remote_peer_id
    try:
        req = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10.0)
    except ProtocolError as exc:
        log.warning("client_request_invalid", peer=peer, error=str(exc))
        await _refuse(channel, "invalid_request", str(exc))
        return
    except TransportError as exc:
        log.info("client_gone_before_request", peer=peer, error=type(exc).__name__)
        return
    if isinstance(req, DailyBoostClaim | BalanceQuery):
        await _answer_account(channel, dispatcher, req)
        return
    if not isinstance(req, RenderRequest):
        await _refuse(
            channel,
            "invalid_request",
            f"expected renderRequest, dailyBoostClaim or balanceQuery, got {type(req).__name__}",
        )
        return
    fault = refusal_for(req, dispatcher, allowed_models)
    if fault is not None:
        log.info("client_request_refused", peer=peer, error=fault)
        await _refuse(channel, "unknown_model", fault)
        return

    request_id = os.urandom(32)
    cost = 0
    if dispatcher.billing is not None:
        try:
            cost = dispatcher.billing.admit(req, request_id)
        except Refusal as exc:
            log.info("client_request_refused", peer=peer, code=exc.code, error=exc.reason)
            await _refuse(channel, exc.code, exc.reason)
            return
    jobs = []
    for i, params in enumerate(split_request(req)):
        jobs.append(
            Job(os.urandom(32), request_id, i, params, work_units(params), network=req.network)
        )
    dispatcher.store.add_request(
        request_id,
        model_id=req.model_id,
        network=req.network,
        token_type=req.token_type,
        client_peer=peer,
        jobs=[(j.job_id, j.params, j.work_units) for j in jobs],
    )
    out_send, out_recv = trio.open_memory_channel[Message](math.inf)
    state = RequestState(request_id, len(jobs), out_send, orphan_saver(results_dir))
    dispatcher.add_request(state, jobs)
    log.info("request_accepted", peer=peer, request=request_id.hex()[:16], image_count=len(jobs))
    try:
        await channel.send(
            RequestAccepted(
                request_id=request_id,
                job_ids=[j.job_id for j in jobs],
                chain_id=dispatcher.domain.chain_id,
                verifying_contract=dispatcher.domain.verifying_contract,
                cost_micro=cost,
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, channel, dispatcher, request_id, nursery.cancel_scope)
            await _stream_events(channel, out_recv, state)
            nursery.cancel_scope.cancel()
    except TransportError as exc:
        log.info("client_gone", request=request_id.hex()[:16], error=type(exc).__name__)
    finally:
        dispatcher.detach_client(request_id)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


async def _stream_events(
    channel: Channel, events: trio.MemoryReceiveChannel[Message], state: RequestState
) -> None:
    async with trio.open_nursery() as nursery:

        async def close_when_finished() -> None:
            await state.finished.wait()
            # everything for this request is already in the channel: drain, then stop
            if state.outbox is not None:
                state.outbox.close()

        nursery.start_soon(close_when_finished)
        async for msg in events:
            limit = RESULT_FRAME_LIMIT if isinstance(msg, JobImage) else CONTROL_FRAME_LIMIT
            await channel.send(msg, limit=limit, timeout=60.0)
        await channel.send(
            RequestDone(
                request_id=state.request_id,
                delivered=state.delivered,
                failed=state.failed,
                cancelled=state.cancelled,
            )
        )
        nursery.cancel_scope.cancel()


async def _watch_client(
    channel: Channel, dispatcher: Dispatcher, request_id: bytes, scope: trio.CancelScope
) -> None:
    """After its request the client may only cancel; a closed stream means it went away."""
    while True:
        try:
            msg = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=30.0)
        except ReadTimeout:
            continue
        except (ChannelClosed, TransportError, ProtocolError):
            scope.cancel()
            return
        if isinstance(msg, CancelRequest) and msg.request_id == request_id:
            log.info("request_cancelled", request=request_id.hex()[:16])
            dispatcher.cancel_request(request_id)


async def _answer_account(
    channel: Channel, dispatcher: Dispatcher, req: DailyBoostClaim | BalanceQuery
) -> None:
    """A payer's Daily Boost claim or balance query: one answer, then the stream closes."""
    billing = dispatcher.billing
    try:
        if billing is None:
            raise Refusal("billing_off", "billing is off on this coordinator: renders are free")
        if isinstance(req, DailyBoostClaim):
            reply: Message = billing.claim_boost(req)
        else:
            reply = billing.report(req, channel.remote_peer_id)
    except Refusal as exc:
        log.info("account_request_refused", kind=type(req).__name__, code=exc.code)
        await _refuse(channel, exc.code, exc.reason)
        return
    try:
        await channel.send(reply)
    except TransportError as exc:
        log.info("client_gone", error=type(exc).__name__)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


async def _refuse(channel: Channel, code: str, reason: str) -> None:
    try:
        await channel.send(RequestRefused(code=code, reason=reason[:2000]))
    except TransportError:
        pass
    finally:
        await channel.close()
