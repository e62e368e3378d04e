"""The coordinator's end of a node's pull stream (`/sogni/jobs/1.0.0`).

Handshake: the node's capabilities must be bound, by its wallet's EIP-712 signature, to the
peer id that Noise authenticated on this very connection; otherwise anyone could claim a
wallet's work. After the handshake a reader handles the node's messages and a writer sends
offers, acks and heartbeats; when the node goes silent past the heartbeat timeout, or the
stream breaks, its jobs go back to the queue.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import trio

from sogni_coordinator.dispatch import Dispatcher, NodeLink, ResultRefused
from sogni_net import Channel, TransportError
from sogni_protocol import eip712
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    Goodbye,
    HandBack,
    Heartbeat,
    Message,
    NodeHello,
    OfferDeclined,
    Progress,
    Ready,
    Result,
    ResultAck,
    Welcome,
)

log = get_logger(__name__)


class HandshakeRefused(Exception):
    pass


def _check_hello(hello: Message, channel: Channel, dispatcher: Dispatcher) -> NodeHello:
    if not isinstance(hello, NodeHello):
        raise HandshakeRefused(f"first message must be nodeHello, got {type(hello).__name__}")
    fault = eip712.check_binding(
        dispatcher.domain,
        hello.capabilities,
        hello.binding_signature,
        channel.remote_peer_id,
        time.time(),
    )
    if fault is not None:
        raise HandshakeRefused(fault)
    return hello


async def serve_node(
    channel: Channel,
    dispatcher: Dispatcher,
    *,
    heartbeat_interval: float,
    heartbeat_timeout: float,
) -> None:
    peer = channel.remote_peer_id
    try:
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10.0)
        hello = _check_hello(first, channel, dispatcher)
        await channel.send(
            Welcome(
                coordinator=dispatcher.address,
                chain_id=dispatcher.domain.chain_id,
                verifying_contract=dispatcher.domain.verifying_contract,
                heartbeat_interval=heartbeat_interval,
            )
        )
    except (HandshakeRefused, ProtocolError, TransportError) as exc:
        log.warning("node_refused", peer=peer, error=str(exc))
        await channel.close()
        return

    caps = hello.capabilities
    if dispatcher.reputation.blacklisted(caps.wallet):
        log.warning("node_refused", peer=peer, error="wallet is blacklisted")
        await channel.close()
        return
    out_send, out_recv = trio.open_memory_channel[Message](math.inf)
    link = NodeLink(
        peer_id=peer,
        wallet=caps.wallet,
        models=frozenset(caps.models),
        slots=max(caps.slots, 1),
        outbox=out_send,
        device=caps.device,
        max_pixels=caps.max_pixels,
        loras=frozenset(caps.loras),
    )
    dispatcher.node_joined(link)
    log.info("node_joined", peer=peer, wallet=caps.wallet, slots=caps.slots, models=caps.models)
    reason = "stream closed"
    try:
        async with trio.open_nursery() as nursery:

            async def guarded(fn: Callable[[], Awaitable[str]]) -> None:
                nonlocal reason
                try:
                    reason = await fn()
                except (TransportError, ProtocolError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                nursery.cancel_scope.cancel()

            nursery.start_soon(guarded, lambda: _writer(channel, out_recv, heartbeat_interval))
            nursery.start_soon(
                guarded, lambda: _reader(channel, link, dispatcher, heartbeat_timeout)
            )
    finally:
        dispatcher.node_left(link, reason)
        log.info("node_left", peer=peer, reason=reason)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


async def _writer(
    channel: Channel, outbox: trio.MemoryReceiveChannel[Message], interval: float
) -> str:
    seq = 0
    while True:
        with trio.move_on_after(interval):
            try:
                msg = await outbox.receive()
            except trio.EndOfChannel:
                return "node replaced or removed"
            await channel.send(msg, timeout=30.0)
            continue
        seq += 1
        await channel.send(Heartbeat(seq=seq), timeout=interval * 3)


async def _reader(channel: Channel, link: NodeLink, dispatcher: Dispatcher, timeout: float) -> str:
    while True:
        msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=timeout)
        if isinstance(msg, Ready):
            link.warm = frozenset(msg.warm_models)
            dispatcher.add_credit(link, msg.slots)
        elif isinstance(msg, Progress):
            dispatcher.progress(link, msg.job_id, msg.step)
        elif isinstance(msg, Result):
            await _on_result(link, dispatcher, msg)
        elif isinstance(msg, OfferDeclined):
            log.info("offer_declined", peer=link.peer_id, reason=msg.reason)
            dispatcher.declined(link, msg.job_id, msg.reason)
        elif isinstance(msg, HandBack):
            dispatcher.handed_back(link, msg.job_id, msg.reason)
        elif isinstance(msg, Goodbye):
            return f"node said goodbye: {msg.reason}"
        elif isinstance(msg, Heartbeat):
            pass
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} on the jobs stream")


async def _on_result(link: NodeLink, dispatcher: Dispatcher, msg: Result) -> None:
    try:
        await dispatcher.accept_result(link, msg)
    except (ResultRefused, ProtocolError) as exc:
        log.warning("receipt_refused", peer=link.peer_id, job=msg.job_id.hex()[:16], error=str(exc))
        if msg.job_id in link.inflight:  # a bad result from the node holding the job
            dispatcher.bad_result(link, msg.job_id, str(exc))
        ack = ResultAck(job_id=msg.job_id, accepted=False, reason=str(exc))
    else:
        ack = ResultAck(job_id=msg.job_id, accepted=True)
    try:
        link.outbox.send_nowait(ack)
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        pass
