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

from pathlib import Path

import trio

from sogni_coordinator.dispatch import Dispatcher, Refusal
from sogni_coordinator.jobs import RequestState, orphan_saver
from sogni_net import Channel, ChannelClosed, ReadTimeout, TransportError
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT, unsupported_version
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    BalanceQuery,
    CancelRequest,
    DailyBoostClaim,
    JobImage,
    Message,
    RenderRequest,
    RequestDone,
    RequestRefused,
    UnsupportedWireVersion,
)

log = get_logger(__name__)

__all__ = ["orphan_saver", "serve_client"]  # orphan_saver: service.py imports it from here


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
    except UnsupportedWireVersion as exc:
        reason = unsupported_version(exc.version, "coordinator")
        log.info("client_request_refused", peer=peer, code="unsupported_version", error=reason)
        await _refuse(channel, "unsupported_version", reason)
        return
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
    try:
        submitted = dispatcher.submit(
            req,
            client_peer=peer,
            allowed_models=allowed_models,
            on_orphan=orphan_saver(results_dir),
        )
    except Refusal as exc:
        log.info("client_request_refused", peer=peer, code=exc.code, error=exc.reason)
        await _refuse(channel, exc.code, exc.reason)
        return
    request_id = submitted.accepted.request_id
    log.info(
        "request_accepted",
        peer=peer,
        request=request_id.hex()[:16],
        image_count=len(submitted.accepted.job_ids),
    )
    try:
        await channel.send(submitted.accepted)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, channel, dispatcher, request_id, nursery.cancel_scope)
            await _stream_events(channel, submitted.events, submitted.state)
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
    try:
        reply = dispatcher.account(req, channel.remote_peer_id)
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
