"""The coordinator's end of an app's stream (`/sogni/client/1.0.0`).

A render stream: the app sends a `RenderRequest`; the coordinator validates it, commits the
request and its jobs, answers `RequestAccepted` (with a resume token only the requester
gets), then streams progress, images with their verified receipts, and `RequestDone`. The app
acknowledges each image (`ImageAck`); an image is sent again on the next attachment until it
is. If the app goes away the request still runs to completion (the work was accepted and
nodes are paid for it) and its images wait in the results folder.

A resume stream: the first frame is `ResumeRequest{request_id, token}` (after a lost
connection, a coordinator restart, or `sogni collect` later); a wrong token is refused, the
right one gets `RequestResumed`, then every image not yet acknowledged and the rest as above.
Nothing is charged again: receipts were paid when stored.

The first frame may instead be a signed `DailyBoostClaim`, `BalanceQuery` or `ContentReport`
(`report_intake.py`): one answer (`BoostGranted`, `BalanceReport`, `ReportFiled` or
`RequestRefused`), then the stream closes.
"""

from __future__ import annotations

import traceback
from typing import Protocol, runtime_checkable

import trio

from sogni_coordinator.db import DATABASE_ERRORS, storage_fault
from sogni_coordinator.delivery import Cursor, short
from sogni_coordinator.dispatch import Dispatcher, Refusal
from sogni_coordinator.final_reply import send_final_reply
from sogni_coordinator.referral_intake import serve_referral
from sogni_coordinator.report_intake import serve_report
from sogni_net import Channel, ChannelClosed, ReadTimeout, TransportError
from sogni_net.channel import send_all
from sogni_protocol.crashpoints import crashpoint
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT, unsupported_version
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    BalanceQuery,
    CancelRequest,
    ContentReport,
    DailyBoostClaim,
    ImageAck,
    JobImage,
    Message,
    ReferralQuery,
    RenderRequest,
    RequestRefused,
    ResumeRequest,
    UnsupportedWireVersion,
)

log = get_logger(__name__)

__all__ = ["ACK_GRACE", "UNAVAILABLE", "RequestMeter", "serve_client"]

ACK_GRACE = 30.0
"""After `RequestDone`, how long the app gets to send its last acks and close."""
ERROR_LIMIT = 300
"""Characters of a refused frame's error text logged (the peer hears at most 2000)."""
UNAVAILABLE = (
    "the coordinator cannot store requests now ({fault}): nothing was charged; "
    "try again later or another coordinator"
)
"""The `RequestRefused` reason ("unavailable") when the database would not take the request."""
FAILED = (
    "the coordinator failed on this request (an internal error, logged for its operator): "
    "nothing was charged; try again later"
)
"""The `RequestRefused` reason ("internal") when accepting a request raised unexpectedly."""


@runtime_checkable
class RequestMeter(Protocol):
    """A dispatcher that counts requests (`metrics.MeteredDispatcher`): told of the render
    requests this session refuses before `submit` (which counts its own outcomes)."""

    def request_refused(self, code: str) -> None: ...


def _refused_here(dispatcher: Dispatcher, code: str) -> None:
    if isinstance(dispatcher, RequestMeter):
        dispatcher.request_refused(code)


async def serve_client(
    channel: Channel, dispatcher: Dispatcher, *, allowed_models: set[str]
) -> None:
    peer = channel.remote_peer_id
    try:
        req = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10.0)
    except UnsupportedWireVersion as exc:
        reason = unsupported_version(exc.version, "coordinator")
        log.info("client_request_refused", peer=peer, code="unsupported_version", error=reason)
        _refused_here(dispatcher, "unsupported_version")
        await _refuse(channel, "unsupported_version", reason)
        return
    except ProtocolError as exc:  # `messages.decode` cuts the values it quotes
        log.warning("client_request_invalid", peer=peer, error=str(exc)[:ERROR_LIMIT])
        _refused_here(dispatcher, "invalid_request")
        await _refuse(channel, "invalid_request", str(exc))
        return
    except TransportError as exc:
        log.info("client_gone_before_request", peer=peer, error=type(exc).__name__)
        return
    if isinstance(req, DailyBoostClaim | BalanceQuery):
        await _answer_account(channel, dispatcher, req)
        return
    if isinstance(req, ContentReport):  # docs/SAFETY.md, "Reports"
        await serve_report(channel, dispatcher, req)
        return
    if isinstance(req, ReferralQuery):  # docs/ECONOMICS.md, "Referral codes"
        await serve_referral(channel, dispatcher, req)
        return
    first: Message
    try:
        if isinstance(req, RenderRequest):
            submitted = await dispatcher.submit(
                req, client_peer=peer, allowed_models=allowed_models
            )
            first, events = submitted.accepted, submitted.events
            log.info(  # once per request: its jobs' ids, as `offer_sent` and receipts name them
                "request_accepted",
                peer=peer,
                request=short(first.request_id),
                image_count=len(first.job_ids),
                jobs=[short(job_id) for job_id in first.job_ids],
            )
        elif isinstance(req, ResumeRequest):
            resumed = await dispatcher.resume_anywhere(req.request_id, req.token)
            first, events = resumed.reply, resumed.events
            log.info(
                "request_resumed", peer=peer, request=short(req.request_id), acked=len(first.acked)
            )
        else:
            _refused_here(dispatcher, "invalid_request")
            raise Refusal(
                "invalid_request",
                "expected renderRequest, resumeRequest, dailyBoostClaim or balanceQuery, "
                f"got {type(req).__name__}",
            )
    except Refusal as exc:
        log.info("client_request_refused", peer=peer, code=exc.code, error=exc.reason)
        await _refuse(channel, exc.code, exc.reason)
        return
    except Exception as exc:
        fault = storage_fault(exc) if isinstance(exc, (*DATABASE_ERRORS, OSError)) else None
        if fault is not None:  # disk full, I/O error, locked, the database server lost
            log.error("client_request_unavailable", peer=peer, error=fault)
            await _refuse(channel, "unavailable", UNAVAILABLE.format(fault=fault))
            return
        log.error(  # a bug: formatted, not exc_info (a renderer would print the prompt)
            "client_request_failed",
            peer=peer,
            error=type(exc).__name__,
            traceback="".join(traceback.format_exception(exc)),
        )
        await _refuse(channel, "internal", FAILED)
        return
    await _serve_request(channel, dispatcher, first, events)


async def _serve_request(
    channel: Channel, dispatcher: Dispatcher, first: Message, events: Cursor
) -> None:
    """Send the answer, then what the request owes this client, reading its acks and cancel
    meanwhile; the images it does not acknowledge wait for the next attachment."""
    request_id = events.box.request_id
    try:
        await channel.send(first)
        async with trio.open_nursery() as nursery:
            closed = trio.Event()
            nursery.start_soon(
                _read_client, channel, dispatcher, request_id, closed, nursery.cancel_scope
            )
            await _stream(channel, events)
            if events.finished:  # the app acks and closes; a superseded stream just ends
                with trio.move_on_after(ACK_GRACE):
                    await closed.wait()
            nursery.cancel_scope.cancel()
    except TransportError as exc:
        log.info("client_gone", request=short(request_id), error=type(exc).__name__)
    finally:
        dispatcher.detach(events)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


_STREAM_BATCH_BYTES = 1 << 20
"""Messages ready at once go to the client together (one stream write) up to this size."""


async def _stream(channel: Channel, events: Cursor) -> None:
    """Send what the request owes, every message ready now in one batch (one write): under
    load one awaited write per image let images queue up for seconds behind node traffic."""
    async for msg in events:
        batch = [msg]
        size = len(msg.image) if isinstance(msg, JobImage) else 0
        while size < _STREAM_BATCH_BYTES:
            more = await events.next()
            if more is None:
                break
            batch.append(more)
            size += len(more.image) if isinstance(more, JobImage) else 0
        images = any(isinstance(m, JobImage) for m in batch)
        if images:
            crashpoint("coordinator_before_image_stream")
        frames = [
            (m, RESULT_FRAME_LIMIT if isinstance(m, JobImage) else CONTROL_FRAME_LIMIT)
            for m in batch
        ]
        await send_all(channel, frames, timeout=60.0)
        if images:
            crashpoint("coordinator_after_image_stream")


async def _read_client(
    channel: Channel,
    dispatcher: Dispatcher,
    request_id: bytes,
    closed: trio.Event,
    scope: trio.CancelScope,
) -> None:
    """The app acknowledges images and may cancel; a closed stream means it went away (the
    writer is then cancelled: nothing more is sent on this attachment)."""
    try:
        while True:
            try:
                msg = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=30.0)
            except ReadTimeout:
                continue
            if isinstance(msg, ImageAck) and msg.request_id == request_id:
                await dispatcher.ack_images(request_id, msg.job_ids)
            elif isinstance(msg, CancelRequest) and msg.request_id == request_id:
                log.info("request_cancelled", request=short(request_id))
                dispatcher.cancel_request(request_id)
    except (ChannelClosed, TransportError, ProtocolError):
        pass
    closed.set()
    scope.cancel()


async def _answer_account(
    channel: Channel, dispatcher: Dispatcher, req: DailyBoostClaim | BalanceQuery
) -> None:
    """A payer's Daily Boost claim or balance query: one answer, then the stream closes.
    In a worker thread: on PostgreSQL the ledger's reads and the boost's write are round
    trips to the server, which must not stall the event loop."""
    try:
        reply = await trio.to_thread.run_sync(dispatcher.account, req, channel.remote_peer_id)
    except Refusal as exc:
        log.info("account_request_refused", kind=type(req).__name__, code=exc.code)
        await _refuse(channel, exc.code, exc.reason)
        return
    await send_final_reply(channel, reply, log)


async def _refuse(channel: Channel, code: str, reason: str) -> None:
    try:
        await channel.send(RequestRefused(code=code, reason=reason[:2000]))
    except TransportError:
        pass
    finally:
        await channel.close()
