"""The coordinator's end of a node's pull stream (`/sogni/jobs/1.0.0`).

Handshake: the node's capabilities must be bound, by its wallet's EIP-712 signature, to the
peer id that Noise authenticated on this very connection; otherwise anyone could claim a
wallet's work. A refused hello (another wire version, a bad binding, a blacklisted wallet)
is answered with `HelloRefused` naming the reason before the stream closes, so the node can
say why in one line. After the handshake a reader handles the node's messages and a writer sends
what the dispatcher queues (offers, cancels) and heartbeats; when the node goes silent past
the heartbeat timeout, or the stream breaks, its jobs go back to the queue.

Before the node joins, its wallet's chain standing is read (`StandingCache.warm`, off the
loop, bounded by its timeout), so routing and billing find it in memory.

During the session a node may send `CapabilitiesUpdate` (a model or LoRA added while it
runs): it is checked like the hello (same peer id, the session's wallet, the wallet's binding
signature, unexpired) and then routes from the next offer on; a bad one is answered with
`HelloRefused` naming why, and the session goes on under what it had. When the coordinator
ends a session for its own reason (a frame it must refuse, a node silent past the heartbeat
timeout, a replaced stream), it sends `Goodbye(reason)` first (1 s at most), so the node logs
that reason rather than a closed stream; not when the node said goodbye, the stream broke,
or the coordinator is shutting down.

Backpressure: the outbox is bounded (`outbox_size`; the writer takes up to `_WRITE_BATCH`
more off it for one stream write). Offers need credit, so at most `slots + MAX_LOOKAHEAD` are
outstanding; cancels are at most two per job held; acks at most `results_at_once` (each
result's task waits for its ack to be written, `_AckLane`: it rides with the next offer); so
a full outbox means the node has stopped reading. Then the dispatcher's non-blocking send
fails: an offer is not made (the job stays queued and the node's credit drops to zero), a
cancel is not queued (the node is past saving: its writer times out within 30 s and its
jobs are re-queued). A `ResultAck` is never dropped: its result's task queues it (waiting
for room) and holds one of the reader's `results_at_once` places until the writer has
written it, so a node that does not read its acks stops being read once that many wait,
and the write's timeout ends the session.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import msgspec
import trio

from sogni_coordinator.db import DatabaseBusy
from sogni_coordinator.dispatch import MAX_LOOKAHEAD, Dispatcher, Refusal, ResultRefused
from sogni_coordinator.gateway.limits import KeyBuckets
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.standing import StandingCache
from sogni_net import Channel, ReadTimeout, TransportError
from sogni_protocol import eip712
from sogni_protocol.crashpoints import crashpoint
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT, unsupported_version
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    SIGNER_SET_FEATURE,
    CapabilitiesUpdate,
    ChallengeAnswer,
    ChallengeRefused,
    DecodeVerified,
    Goodbye,
    HandBack,
    Heartbeat,
    HelloRefused,
    Message,
    NodeHello,
    OfferDeclined,
    Progress,
    Ready,
    Result,
    ResultAck,
    SignedKeyRotation,
    SignedSignerSet,
    StepVerified,
    UnsupportedWireVersion,
    VerifyDecode,
    VerifyRefused,
    VerifyStep,
    Welcome,
)

if TYPE_CHECKING:
    from sogni_coordinator.network_signers import WelcomeSet

log = get_logger(__name__)

ACK_TIMEOUT = 30.0
"""A node that has not taken its ack off the stream by then is dropped."""


def outbox_size(slots: int) -> int:
    """Room for every offer the node's credit allows, two cancels per job, and spare (the
    pending acks, at most `RESULTS_AT_ONCE`, fit in it)."""
    return 3 * (max(slots, 1) + MAX_LOOKAHEAD) + 16


class HandshakeRefused(Exception):
    pass


def _check_hello(hello: Message, channel: Channel, dispatcher: Dispatcher) -> NodeHello:
    if not isinstance(hello, NodeHello):
        raise HandshakeRefused(f"first message must be nodeHello, got {type(hello).__name__}")
    busy = dispatcher.hellos.allow(channel.remote_peer_id)  # before any work for it
    if busy is not None:
        raise HandshakeRefused(busy)
    fault = eip712.check_binding(
        dispatcher.domain,
        hello.capabilities,
        hello.binding_signature,
        channel.remote_peer_id,
        time.time(),
    )
    if fault is not None:
        raise HandshakeRefused(fault)
    busy = dispatcher.hellos.allow_bound()  # before the chain lookup and the wallet's state
    if busy is not None:
        raise HandshakeRefused(busy)
    return hello


async def _refuse(channel: Channel, reason: str) -> None:
    """Tell the node why (one `HelloRefused`), then close."""
    log.warning("node_refused", peer=channel.remote_peer_id, error=reason)
    try:
        await channel.send(HelloRefused(reason=reason[:2000]), timeout=5.0)
    except TransportError:
        pass
    finally:
        await channel.close()


async def serve_node(
    channel: Channel,
    dispatcher: Dispatcher,
    *,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    rotations: Sequence[SignedKeyRotation] = (),
    signer_set: WelcomeSet | None = None,
) -> None:
    """Serve one node's stream. `rotations`: the checked chain of offer-key rotations that
    ends at this coordinator's key (`key_rotation.chain_for`), sent in the `Welcome`, with
    the network's `signer_set` for a node that reads it (`SIGNER_SET_FEATURE`)."""
    peer = channel.remote_peer_id
    try:
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10.0)
        hello = _check_hello(first, channel, dispatcher)
        await _warm_standing(dispatcher, hello.capabilities.wallet)
        out_send, out_recv = trio.open_memory_channel[Message](
            outbox_size(hello.capabilities.slots)
        )
        link = dispatcher.node_joined(peer, hello.capabilities, out_send)
    except UnsupportedWireVersion as exc:
        await _refuse(channel, unsupported_version(exc.version, "coordinator"))
        return
    except (HandshakeRefused, ProtocolError) as exc:
        await _refuse(channel, str(exc))
        return
    except Refusal as exc:
        await _refuse(channel, exc.reason)
        return
    except TransportError as exc:
        log.warning("node_refused", peer=peer, error=str(exc))
        await channel.close()
        return

    caps = hello.capabilities
    served: SignedSignerSet | msgspec.UnsetType = msgspec.UNSET  # an older node refuses it
    if signer_set is not None and SIGNER_SET_FEATURE in caps.version.split():
        served = await trio.to_thread.run_sync(signer_set.get) or msgspec.UNSET
    reason = "stream closed"
    ended_here = False  # the coordinator ends it for its own reason: tell the node (Goodbye)
    try:
        await channel.send(
            Welcome(
                coordinator=dispatcher.address,
                chain_id=dispatcher.domain.chain_id,
                verifying_contract=dispatcher.domain.verifying_contract,
                heartbeat_interval=heartbeat_interval,
                rotations=list(rotations),
                signer_set=served,
            )
        )
        log.info(
            "node_joined",
            peer=peer,
            wallet=caps.wallet,
            slots=caps.slots,
            models=caps.models,
            machine_id=caps.machine_id or None,
            payout=caps.payout,
        )
        async with trio.open_nursery() as nursery:

            async def guarded(fn: Callable[[], Awaitable[str]]) -> None:
                nonlocal reason, ended_here
                try:
                    reason = await fn()
                    reason = link.removed_reason or reason  # dropped by the coordinator: why
                    ended_here = not reason.startswith(NODE_GOODBYE)  # e.g. node replaced
                except (TransportError, ProtocolError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    # a bad frame or a silent node: the node may still read why
                    ended_here = isinstance(exc, ProtocolError | ReadTimeout)
                nursery.cancel_scope.cancel()

            lane = _AckLane(out_send)
            nursery.start_soon(
                guarded, lambda: _writer(channel, out_recv, heartbeat_interval, lane)
            )
            nursery.start_soon(
                guarded, lambda: _reader(channel, link, dispatcher, heartbeat_timeout, lane)
            )
    except (TransportError, ProtocolError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    except trio.Cancelled:  # no goodbye: a restarted coordinator is back within seconds
        reason = "coordinator shutting down"
        raise
    finally:
        dispatcher.node_left(link, reason, goodbye=reason.startswith(NODE_GOODBYE))
        log.info("node_left", peer=peer, reason=reason)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            if ended_here:
                await _say_goodbye(channel, reason)
            await channel.close()


NODE_GOODBYE = "node said goodbye"
"""How `node_left`'s reason starts when the node ended the session itself."""


async def _say_goodbye(channel: Channel, reason: str) -> None:
    """Tell the node why the coordinator ends its session, so its log names the reason
    rather than a closed stream. Best effort: the stream may already be broken."""
    try:
        await channel.send(Goodbye(reason=reason[:512]), timeout=1.0)
    except (TransportError, ProtocolError):
        pass


async def _warm_standing(dispatcher: Dispatcher, wallet: str) -> None:
    """Read the wallet's standing into the router's cache (at most its timeout), so that
    `node_joined` classifies the node without touching the chain."""
    standing = dispatcher.router.standing
    if isinstance(standing, StandingCache):
        await standing.warm(wallet)


_WRITE_BATCH = 64
"""At most this many queued messages go to a node in one stream write."""


def _limit(msg: Message) -> int:
    large = isinstance(msg, VerifyStep | VerifyDecode)  # latents may pass 64 KiB
    return RESULT_FRAME_LIMIT if large else CONTROL_FRAME_LIMIT


class _AckLane:
    """Acks through the outbox, so the offer its credit brings rides in the same write.

    A result's task gives the credit back, queues the ack and waits until the writer has
    written it (holding its place among the reader's `results_at_once`: the backpressure of
    the module docstring). The writer, finding an ack, lets the match that the credit woke
    run once before it takes what is queued: ack and next offer leave in one stream write
    (one yamux frame and Noise record), where the ack used to be a write of its own."""

    def __init__(self, outbox: trio.MemorySendChannel[Message]) -> None:
        self.outbox = outbox
        self._waiting: deque[trio.Event] = deque()

    async def send(self, channel: Channel, ack: ResultAck) -> None:
        written = trio.Event()
        self._waiting.append(written)
        try:
            await self.outbox.send(ack)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._waiting.remove(written)  # the node was replaced: its writer is ending
            await channel.send(ack, timeout=ACK_TIMEOUT)
            return
        await written.wait()

    def written(self, batch: Sequence[tuple[Message, int]]) -> None:
        for msg, _ in batch:
            if isinstance(msg, ResultAck) and self._waiting:
                self._waiting.popleft().set()


async def _writer(
    channel: Channel,
    outbox: trio.MemoryReceiveChannel[Message],
    interval: float,
    lane: _AckLane,
) -> str:
    seq = 0
    while True:
        msg: Message | None = None
        with trio.move_on_after(interval):
            try:
                msg = await outbox.receive()
            except trio.EndOfChannel:
                return "node replaced or removed"
        if msg is None:  # nothing to send for `interval`
            seq += 1
            await channel.send(Heartbeat(seq=seq), timeout=interval * 3)
            continue
        if isinstance(msg, ResultAck):
            await trio.sleep(0)  # the match its credit woke queues the next offer behind it
        batch = [(msg, _limit(msg))]  # everything queued now leaves in one write
        while len(batch) < _WRITE_BATCH:
            try:
                more = outbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append((more, _limit(more)))
        await channel.send_many(batch, timeout=ACK_TIMEOUT)
        lane.written(batch)


async def _reader(
    channel: Channel,
    link: NodeLink,
    dispatcher: Dispatcher,
    timeout: float,
    lane: _AckLane,
) -> str:
    """Read the node's messages; results are settled concurrently (`results_at_once`).

    A session that ends on a bad frame or a silent node first lets the results it already
    read finish (committed and acked, or refused): what was received is not dropped
    half-way because of what came after it. A result whose ack cannot be written (the
    stream broke) ends the session with that error, as the reader's own would."""
    errors: list[Exception] = []
    reason = ""
    async with trio.open_nursery() as results:

        def failed(exc: Exception) -> None:
            errors.append(exc)
            results.cancel_scope.cancel()

        try:
            reason = await _read(channel, link, dispatcher, timeout, lane, results, failed)
        except (TransportError, ProtocolError) as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return reason


RESULTS_AT_ONCE = 8
"""The most results of one node verified and committed at the same time (`results_at_once`).
Each pending result holds its frame (up to `RESULT_FRAME_LIMIT`) until it is answered."""


def results_at_once(slots: int) -> int:
    """How many results of a node with `slots` (at its hello) are settled at a time: one per
    slot, at most `RESULTS_AT_ONCE`. A receipt waits for its group commit (tens of ms under
    load): one at a time, the results of slots that finish together (a batch of one request)
    waited for each other's commits. More than the node's slots gains nothing a real node
    sends (a slot's next result is a render away) and was measured to hurt: 8 per one-slot
    instant node made the commit groups 4x longer to wait for and images reach clients
    ~0.5 s after their receipts (BENCHMARKS, "Dispatch"). The reader reads nothing more
    while this many wait (the backpressure of the module docstring)."""
    return max(1, min(slots, RESULTS_AT_ONCE))


async def _read(
    channel: Channel,
    link: NodeLink,
    dispatcher: Dispatcher,
    timeout: float,
    lane: _AckLane,
    results: trio.Nursery,
    failed: Callable[[Exception], None],
) -> str:
    at_once = trio.Semaphore(results_at_once(link.slots))

    async def settle(msg: Result) -> None:
        try:
            await _on_result(channel, link, dispatcher, msg, lane)
        except (TransportError, ProtocolError) as exc:
            failed(exc)
        finally:
            at_once.release()

    updates = KeyBuckets(per_minute=CAPS_PER_MINUTE, burst=CAPS_BURST)
    dropped = 0
    while True:
        msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=timeout)
        if isinstance(msg, Ready):
            dispatcher.ready(link, msg.slots, msg.warm_models)
        elif isinstance(msg, Progress):
            dispatcher.progress(link, msg.job_id, msg.step)
        elif isinstance(msg, Result):
            await at_once.acquire()
            results.start_soon(settle, msg)
        elif isinstance(msg, OfferDeclined):
            log.info("offer_declined", peer=link.peer_id, reason=msg.reason)
            dispatcher.offer_declined(link, msg.job_id, msg.reason)
        elif isinstance(msg, HandBack):
            dispatcher.handed_back(link, msg.job_id, msg.reason)
        elif isinstance(msg, Goodbye):
            return f"{NODE_GOODBYE}: {msg.reason}"
        elif isinstance(msg, CapabilitiesUpdate):
            if updates.take("caps"):
                await _on_capabilities(channel, link, dispatcher, msg)
            elif (dropped := dropped + 1) > CAPS_DROPPED_LIMIT:  # no node changes that fast
                raise ProtocolError("capabilities updates far faster than a node changes")
        elif isinstance(msg, ChallengeAnswer | ChallengeRefused):
            dispatcher.challenges.answered(link.peer_id, msg)
        elif isinstance(msg, StepVerified | DecodeVerified | VerifyRefused):
            dispatcher.verifications.answered(link.peer_id, msg)
        elif isinstance(msg, Heartbeat):
            pass
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} on the jobs stream")


CAPS_BURST = 8
CAPS_PER_MINUTE = 30
"""`CapabilitiesUpdate`s a session may send: a burst of 8 (models installed together), then
one per 2 s. Each costs a signature recovery on the loop (4-9 ms for a long model list), a
log line and a database write; past the rate they are dropped unread."""
CAPS_DROPPED_LIMIT = 64
"""Updates dropped in one session before it is ended as misbehaving."""


async def _on_capabilities(
    channel: Channel, link: NodeLink, dispatcher: Dispatcher, msg: CapabilitiesUpdate
) -> None:
    """Check an update like a hello (bound to this stream's peer id, signed by the wallet,
    unexpired) and for the session's own wallet; apply it, or refuse it with the reason
    (`HelloRefused` mid-session: the session goes on under the capabilities it had)."""
    caps = msg.capabilities
    fault = eip712.check_binding(
        dispatcher.domain, caps, msg.binding_signature, channel.remote_peer_id, time.time()
    )
    if fault is None and not eip712.same_address(caps.wallet, link.wallet):
        fault = "capabilities update names another wallet than this session's"
    if fault is None:
        dispatcher.capabilities_changed(link, caps)
        return
    log.warning("capabilities_refused", peer=link.peer_id, error=fault)
    reason = f"capabilities update refused: {fault}"
    await channel.send(HelloRefused(reason=reason[:2000]), timeout=ACK_TIMEOUT)


def _storage_failed(
    link: NodeLink, dispatcher: Dispatcher, msg: Result, exc: Exception
) -> ResultAck:
    """The ack for a result whose handling hit a database error: accepted if its receipt
    is durable all the same (a later write failed), else refused and the job re-queued."""
    job = msg.job_id.hex()[:16]
    try:
        stored = dispatcher.store.receipt(msg.job_id)
    except (DatabaseBusy, sqlite3.Error):
        stored = None
    if stored is not None and stored.receipt == msg.receipt:
        log.error("write_after_receipt_failed", peer=link.peer_id, job=job, error=str(exc))
        return ResultAck(job_id=msg.job_id, accepted=True)
    log.error("receipt_not_stored", peer=link.peer_id, job=job, error=str(exc))
    try:  # re-queue it now rather than at its deadline (its state write may fail too)
        dispatcher.handed_back(link, msg.job_id, "the coordinator could not store its receipt")
    except (DatabaseBusy, sqlite3.Error) as again:
        log.error("job_state_not_stored", job=job, error=str(again))
    reason = f"coordinator storage unavailable, receipt not stored: {exc}"
    return ResultAck(job_id=msg.job_id, accepted=False, reason=reason[:512])


async def _on_result(
    channel: Channel,
    link: NodeLink,
    dispatcher: Dispatcher,
    msg: Result,
    lane: _AckLane,
) -> None:
    try:
        await dispatcher.accept_result(link, msg)
    except ResultRefused as exc:
        log.warning("receipt_refused", peer=link.peer_id, job=msg.job_id.hex()[:16], error=str(exc))
        ack = ResultAck(job_id=msg.job_id, accepted=False, reason=str(exc)[:512])
    except (DatabaseBusy, sqlite3.Error) as exc:  # the database failed: answer, keep the stream
        ack = _storage_failed(link, dispatcher, msg, exc)
    else:
        ack = ResultAck(job_id=msg.job_id, accepted=True)
    crashpoint("coordinator_before_ack")
    # the result gave its credit back (no Ready needed): the next offer leaves with the ack
    dispatcher.result_acked(link)
    await lane.send(channel, ack)  # backpressure: see the module docstring
    crashpoint("coordinator_after_ack")
