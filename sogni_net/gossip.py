"""Bound what one gossip RPC, and one gossip peer, can cost the host.

py-libp2p 0.8.1's `Pubsub.continuously_read_stream` starts one service task per message of an
RPC, and its service manager walks every task it has for each new one (`_find_parent_task`):
one 1 MiB RPC of ~6,600 tiny messages froze the event loop for ~25 s. A message whose
signature fails is dropped without being marked seen and without a word to the scorer, so the
same RPC could be replayed for free. Control messages were as open: an IWANT naming one
message id 20,000 times got 20,000 copies of the message back, IHAVE/GRAFT/PRUNE for made-up
topics each grew per-topic bookkeeping.

`GuardedPubsub` (a `Pubsub` subclass: only the read loop is ours) handles an RPC's messages in
the reading task, one after the other, yielding between them:

* at most `MAX_MESSAGES_PER_RPC` messages of one RPC are looked at; the rest are dropped;
* at most `MAX_STREAMS_PER_PEER` inbound pubsub streams per peer: a newer one resets the
  oldest;
* messages already seen cost a hash and a lookup; each peer may make us check at most
  `MESSAGE_RATE` unseen messages a second (bursts of `MESSAGE_BURST`); the excess is dropped
  (gossip's IHAVE/IWANT recovers what an honest peer loses so);
* a message not signed by its origin, or whose origin key is not inline in its peer id (every
  Sogni key is Ed25519; a hashed id means an RSA key, costly to check), ends the RPC, and the
  peer is penalised (`containment.PeerPenalties`: scored down, disconnected);
* signed peer records riding on RPCs (`senderRecord`, a signature check per RPC) are ignored:
  they only feed peer exchange, which we do not do.

`GuardedGossipSub` trims control messages before py-libp2p sees them: IHAVE/GRAFT/PRUNE only
for our topics, IHAVE ids and IWANT ids capped per RPC, IWANT ids de-duplicated and each
message answered at most `MAX_IWANT_REPLIES` times per peer, PX peers dropped, IDONTWANT and
observe messages (protocol versions we do not speak) dropped.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IOException, MessageTooLarge
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import GossipsubEvent, Pubsub
from libp2p.pubsub.utils import safe_bytes_from_hex
from libp2p.pubsub.validators import signature_validator
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from sogni_net._log import log_event
from sogni_net.containment import PeerPenalties

MAX_MESSAGES_PER_RPC = 128
"""Messages of one RPC looked at; py-libp2p's own peers send one per RPC, more only when
answering an IWANT or catching a new peer up."""
MESSAGE_RATE = 100.0
"""Unseen messages a second one peer may make us check (signature, validator): twice what
py-libp2p's gossip carries at best (~50 messages a second)."""
MESSAGE_BURST = 256
MAX_STREAMS_PER_PEER = 2
"""Inbound pubsub streams read at once per peer (py-libp2p opens one, two when its new-peer
handling races itself; go-libp2p-pubsub keeps one): what a peer has in hand is at most this
many RPCs, whatever the streams it opens."""
MAX_TOPICS_PER_MESSAGE = 4
"""Ours carry one topic; a message naming more is dropped before any check."""
MAX_IHAVE_IDS = 1_000
"""Message ids of IHAVE considered per RPC (go-libp2p: 5,000)."""
MAX_IWANT_IDS = 256
"""Distinct message ids of IWANT answered per RPC."""
MAX_IWANT_REPLIES = 3
"""Times one message is sent to one peer in answer to its IWANTs (go-libp2p's
`GossipSubGossipRetransmission`)."""
MAX_CONTROL_ENTRIES = 64
"""GRAFT entries and PRUNE entries considered per RPC."""
_SERVED_LIMIT = 4_096


class GossipRejected(Exception):
    """A peer's gossip broke the rules (the reason is the message); it is penalised."""


class _Bucket:
    """A token bucket: `take` is True while the peer is within its rate."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = float(MESSAGE_BURST)
        self.stamp = now

    def refill(self, now: float) -> float:
        self.tokens = min(float(MESSAGE_BURST), self.tokens + (now - self.stamp) * MESSAGE_RATE)
        self.stamp = now
        return self.tokens

    def take(self, now: float) -> bool:
        if self.refill(now) < 1.0:
            return False
        self.tokens -= 1.0
        return True


def origin_signed(msg: rpc_pb2.Message) -> bool:
    """The message is signed by the key its origin peer id embeds (never a key it carries)."""
    if not msg.signature:
        return False
    try:
        if ID(msg.from_id).extract_public_key() is None:  # hashed id: an RSA key
            return False
        return bool(signature_validator(msg))
    except Exception:
        return False


class GuardedPubsub(Pubsub):
    """py-libp2p's `Pubsub` with a bounded, task-free read loop (see the module)."""

    def __init__(self, *args: Any, penalties: PeerPenalties | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalties = penalties
        self._buckets: dict[ID, _Bucket] = {}
        self._reading: dict[ID, list[INetStream]] = {}
        self.dropped = 0
        """Messages dropped unread (over an RPC's cap or a peer's rate), for tests/operators."""

    async def continuously_read_stream(self, stream: INetStream) -> None:
        """`Pubsub.continuously_read_stream` of py-libp2p 0.8.1, but messages are handled
        here (bounded) rather than in a task each, and sender records are ignored. A peer
        past `MAX_STREAMS_PER_PEER` inbound pubsub streams loses its oldest (reset)."""
        peer_id = stream.muxed_conn.peer_id
        streams = self._reading.setdefault(peer_id, [])
        streams.append(stream)
        if len(streams) > MAX_STREAMS_PER_PEER:
            with contextlib.suppress(Exception):
                await streams.pop(0).reset()
        try:
            await self._read_rpcs(peer_id, stream)
        finally:
            with contextlib.suppress(ValueError):
                streams.remove(stream)
            if not streams and self._reading.get(peer_id) is streams:
                del self._reading[peer_id]

    async def _read_rpcs(self, peer_id: ID, stream: INetStream) -> None:
        try:
            while self.manager.is_running:
                incoming: bytes = await read_varint_prefixed_bytes_limited(
                    stream, self.max_inbound_rpc_size
                )
                rpc = rpc_pb2.RPC()
                rpc.ParseFromString(incoming)
                rpc.ClearField("senderRecord")  # also skips GossipSub.handle_rpc's check
                event = GossipsubEvent()
                event.peer_id = peer_id.pretty()
                event.message_size = len(incoming)
                if rpc.publish:
                    event.publish = True
                    why = await self._handle_publish(peer_id, rpc.publish)
                    if why is not None:
                        await self._misbehaved(stream, peer_id, why)
                        return
                if rpc.subscriptions:
                    event.subopts = True
                    if len(rpc.subscriptions) <= self.max_subscriptions_per_rpc:
                        for sub in rpc.subscriptions:
                            self.handle_subscription(peer_id, sub)
                if rpc.HasField("control"):
                    event.control = True
                    await self.router.handle_rpc(rpc, peer_id)
                if stream.metric_send_channel is not None:
                    await stream.metric_send_channel.send(event)
                await trio.lowlevel.checkpoint()
        except MessageTooLarge:
            with contextlib.suppress(Exception):
                await stream.reset()
            self._handle_dead_peer(peer_id)
        except (StreamEOF, StreamError, IOException, RawConnError):
            pass  # the peer went away (py-libp2p logs these at debug and returns too)

    async def _handle_publish(self, peer_id: ID, messages: Any) -> str | None:
        """Push the RPC's messages on, one by one; the reason to penalise the peer, if any."""
        count = len(messages)
        if count > MAX_MESSAGES_PER_RPC:
            self._drop(peer_id, count - MAX_MESSAGES_PER_RPC, "messages over the RPC's cap")
        bucket = self._bucket(peer_id)
        over_rate = 0
        try:
            for msg in messages[:MAX_MESSAGES_PER_RPC]:
                if len(msg.topicIDs) > MAX_TOPICS_PER_MESSAGE:
                    continue
                if not self._is_subscribed_to_msg(msg) or self._is_msg_seen(msg):
                    continue
                if not bucket.take(trio.current_time()):
                    over_rate += 1
                    continue
                if not origin_signed(msg):
                    return "gossip message not signed by its origin"
                try:
                    await self.push_msg(peer_id, msg)
                except Exception as exc:
                    return f"gossip message failed: {type(exc).__name__}"
                await trio.lowlevel.checkpoint()
        finally:
            if over_rate:
                self._drop(peer_id, over_rate, "over the peer's message rate")
        return None

    def _bucket(self, peer_id: ID) -> _Bucket:
        now = trio.current_time()
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            if len(self._buckets) >= 1024:  # full buckets are as good as new ones
                for peer, old in list(self._buckets.items()):
                    if old.refill(now) >= MESSAGE_BURST:
                        del self._buckets[peer]
            bucket = self._buckets[peer_id] = _Bucket(now)
        return bucket

    def _drop(self, peer_id: ID, count: int, why: str) -> None:
        self.dropped += count
        log_event(logging.DEBUG, "gossip_dropped", peer=peer_id.to_base58(), n=count, why=why)

    async def _misbehaved(self, stream: INetStream, peer_id: ID, why: str) -> None:
        """Reset the stream, then score down and disconnect the peer."""
        with contextlib.suppress(Exception):
            await stream.reset()
        if self.penalties is not None:
            self.penalties.penalise(peer_id, "gossip", GossipRejected(why))
        else:
            log_event(logging.WARNING, "gossip_peer_misbehaved", peer=peer_id.to_base58(), why=why)


class GuardedGossipSub(GossipSub):
    """py-libp2p's `GossipSub`, with control messages trimmed first (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served: dict[ID, dict[bytes, int]] = {}

    async def handle_rpc(self, rpc: rpc_pb2.RPC, sender_peer_id: ID) -> None:
        self._trim_control(rpc.control)
        await super().handle_rpc(rpc, sender_peer_id)

    def _trim_control(self, control: rpc_pb2.ControlMessage) -> None:
        ours = self.pubsub.topic_ids if self.pubsub is not None else frozenset()
        trimmed = rpc_pb2.ControlMessage()
        budget = MAX_IHAVE_IDS
        for ihave in control.ihave:
            if budget <= 0:
                break
            if ihave.topicID in ours and ihave.messageIDs:
                ids = list(dict.fromkeys(ihave.messageIDs[:budget]))
                budget -= len(ids)
                trimmed.ihave.add(topicID=ihave.topicID, messageIDs=ids)
        wanted: dict[bytes, None] = {}
        for iwant in control.iwant:
            for msg_id in iwant.messageIDs:
                wanted[msg_id] = None
                if len(wanted) >= MAX_IWANT_IDS:
                    break
            if len(wanted) >= MAX_IWANT_IDS:
                break
        if wanted:  # one entry: py-libp2p's IWANT rate limit counts entries
            trimmed.iwant.add(messageIDs=list(wanted))
        for graft in control.graft[:MAX_CONTROL_ENTRIES]:
            if graft.topicID in ours:
                trimmed.graft.add(topicID=graft.topicID)
        for prune in control.prune[:MAX_CONTROL_ENTRIES]:
            if prune.topicID in ours:  # without its PX peers: we do not dial them
                trimmed.prune.add(topicID=prune.topicID, backoff=prune.backoff)
        control.CopyFrom(trimmed)

    async def handle_iwant(self, iwant_msg: rpc_pb2.ControlIWant, sender_peer_id: ID) -> None:
        """Answer each message we hold at most once per IWANT and `MAX_IWANT_REPLIES` times
        per peer (py-libp2p answered every id as often as it was named)."""
        served = self._served.setdefault(sender_peer_id, {})
        wanted: dict[bytes, bytes] = {}
        for wire in iwant_msg.messageIDs:
            msg_id = safe_bytes_from_hex(wire)
            if msg_id is None or msg_id in wanted or self.mcache.get(msg_id) is None:
                continue
            times = served.get(msg_id, 0)
            if times >= MAX_IWANT_REPLIES:
                continue
            served[msg_id] = times + 1
            wanted[msg_id] = wire
        if len(served) > _SERVED_LIMIT:  # forget what left the message cache
            for msg_id in [m for m in served if self.mcache.get(m) is None]:
                del served[msg_id]
        if wanted:
            answer = rpc_pb2.ControlIWant(messageIDs=list(wanted.values()))
            await super().handle_iwant(answer, sender_peer_id)

    def remove_peer(self, peer_id: ID) -> None:
        super().remove_peer(peer_id)
        self._served.pop(peer_id, None)
