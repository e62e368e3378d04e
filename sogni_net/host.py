"""The libp2p host behind a small interface: channels, ping and gossip, nothing else.

Built from py-libp2p 0.8.1 parts rather than its defaults, because the defaults are wrong for
us: `new_host()` also accepts plaintext, secio and TLS, offers mplex, waits 250 ms per dial
when it may open 3 connections per peer, and runs handlers inside its own per-connection
nurseries where an exception tears down the connection.

Every host runs under `sogni_net.containment`: a peer whose bytes make any libp2p stream or
task fail (identify, ping, pubsub, ...) loses that stream, is scored down and disconnected;
the host carries on.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
import traceback
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import gossipsub
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCP

from sogni_net import direct as direct_channels
from sogni_net._log import describe, log_event, quiet_libp2p_logging
from sogni_net.admission import InboundAdmission, InboundLimits, address_key
from sogni_net.channel import Channel
from sogni_net.containment import (
    PeerPenalties,
    contain_tasks,
    guard_streams,
    ignore_peer_exchange,
    refuse_unknown_version,
)
from sogni_net.errors import (
    AddressError,
    ChannelClosed,
    DialError,
    ListenError,
    ReadTimeout,
    TransportError,
    WriteTimeout,
)
from sogni_net.gossip import GuardedGossipSub, GuardedPubsub
from sogni_net.keys import NodeKey, load_or_create_node_key
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.settings import check_listen_addr, check_peer_id

Handler = Callable[[Channel], Awaitable[None]]
"""Serves one inbound channel. When it returns, or raises `ChannelClosed`, the channel is
closed gracefully; any other exception is logged and resets the channel."""

TopicValidator = Callable[[str, bytes], bool]
"""`(origin peer id, data) -> accept?`; rejected messages are neither delivered nor relayed."""

T = TypeVar("T")

GOSSIP_MESSAGE_LIMIT = CONTROL_FRAME_LIMIT
"""Largest gossip message accepted or published (capability adverts are a few hundred bytes)."""

_SUBSCRIBER_BUFFER = 256
_SHUTDOWN_GRACE = 5.0
_GOSSIP_DRAIN_WAIT = 2.0
# Not v1.2: py-libp2p then sends an IDONTWANT to every mesh peer for every message, its own
# included, doubling the per-peer queue load; IDONTWANT only pays off for large messages.
_GOSSIP_PROTOCOLS = (gossipsub.PROTOCOL_ID_V11, gossipsub.PROTOCOL_ID)


class Host:
    """A running libp2p host; obtain one from `open_host`, which owns its lifetime."""

    def __init__(
        self,
        libp2p_host: IHost,
        nursery: trio.Nursery,
        pubsub: Pubsub,
        topics: Iterable[str],
        penalties: PeerPenalties | None = None,
        noise: NoiseTransport | None = None,
        admission: InboundAdmission | None = None,
    ) -> None:
        self._lp = libp2p_host
        self._noise = noise
        self.inbound = admission
        """Inbound libp2p connection admission (slots, per-IP counts); None when containment
        is off (another py-libp2p version)."""
        self._direct_handlers: dict[str, Handler] = {}
        self.direct_port: int | None = None
        """Where this host listens for direct channels (`sogni_net.direct`); None: it does not."""
        self._direct_ports: dict[str, int] = {}
        self._direct_down: dict[str, float] = {}
        self._direct_limit = trio.CapacityLimiter(direct_channels.MAX_DIRECT_CONNECTIONS)
        self._handshaking: dict[str, int] = {}
        """Inbound direct connections per remote IP still in their handshake."""
        self._direct_open: dict[str, int] = {}
        """Inbound direct connections per remote IP, handshaking or serving."""
        self._nursery = nursery
        self._pubsub = pubsub
        self._penalties = penalties
        self._topics = frozenset(topics)
        self._subscribers: dict[str, set[trio.MemorySendChannel[tuple[str, bytes]]]] = {
            topic: set() for topic in self._topics
        }
        self._validators: dict[str, TopicValidator] = {}
        self.peer_id: str = libp2p_host.get_id().to_base58()

    # --- identity and addresses ---------------------------------------------------------
    @property
    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in `/p2p/<peer id>`, ready to give to peers."""
        suffix = f"/p2p/{self.peer_id}"
        out = []
        for addr in self._lp.get_addrs():
            text = str(addr)
            out.append(text if text.endswith(suffix) else text + suffix)
        return out

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection to us (either direction)."""
        return [peer.to_base58() for peer in self._lp.get_connected_peers()]

    def protocols(self) -> list[str]:
        """Every protocol id this host answers, libp2p's own (identify, ping, meshsub) included."""
        return sorted(str(p) for p in self._lp.get_mux().get_protocols() if p is not None)

    def known_protocols(self, peer_id: str) -> list[str]:
        """The protocol ids a connected peer announced over identify (empty until it has)."""
        try:
            return sorted(self._lp.get_peerstore().get_protocols(ID.from_base58(peer_id)))
        except Exception:
            return []

    def strikes(self, peer_id: str) -> int:
        """How many times this peer's input made a libp2p stream or task fail (then it was
        scored down and disconnected); 0 when containment is off."""
        return self._penalties.strikes[peer_id] if self._penalties is not None else 0

    # --- streams ------------------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: Handler, *, direct: bool = False) -> None:
        """Serve `protocol`: each inbound stream becomes a `Channel` passed to `handler`.

        The handler runs in this host's nursery, not py-libp2p's per-connection one, so an
        exception only resets its own stream (and is logged) and shutdown cancels it. With
        `direct`, the handler also serves direct channels (`sogni_net.direct`) when the host
        listens for them.
        """
        if direct:
            self._direct_handlers[protocol] = handler
        else:
            self._direct_handlers.pop(protocol, None)

        async def on_stream(stream: INetStream) -> None:
            channel = Channel(stream, protocol=protocol)
            done = trio.Event()
            try:
                self._nursery.start_soon(self._serve, handler, channel, done)
            except RuntimeError:  # host is shutting down
                await stream.reset()
                return
            await done.wait()

        self._lp.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve(self, handler: Handler, channel: Channel, done: trio.Event) -> None:
        fields = {"protocol": channel.protocol, "peer": channel.remote_peer_id}
        try:
            channel._start(self._nursery)
            try:
                await handler(channel)
            except ChannelClosed as exc:
                # The usual end of a serving loop: the peer closed. Answer with our FIN.
                log_event(logging.DEBUG, "channel_ended", error=describe(exc), **fields)
                await channel.close()
            except (ReadTimeout, WriteTimeout) as exc:
                log_event(logging.INFO, "channel_timed_out", error=describe(exc), **fields)
                await channel.reset()
            except ProtocolError as exc:
                log_event(logging.WARNING, "peer_protocol_error", error=describe(exc), **fields)
                await channel.reset()
            except Exception as exc:
                # A formatted traceback, not exc_info: rich/structlog renderers would print the
                # frames' local variables, which can hold prompts and images.
                log_event(
                    logging.ERROR,
                    "handler_failed",
                    error=describe(exc),
                    traceback="".join(traceback.format_exception(exc)),
                    **fields,
                )
                await channel.reset()
            else:
                await channel.close()
        finally:
            done.set()

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        """Dial `addr` (a multiaddr ending in /p2p/<id>) unless connected; returns the peer id."""
        peer = await self._detached(lambda: self._connect(addr), timeout, f"connect {addr}")
        return peer.to_base58()

    async def open_channel(
        self, addr: str, protocol: str, *, timeout: float = 10.0, direct: bool = False
    ) -> Channel:
        """Open a channel speaking `protocol` to a peer, dialing it first if needed.

        `addr` is a multiaddr ending in /p2p/<peer id>, or a bare peer id already connected
        or known. Raises `DialError` if the peer cannot be reached or refuses the protocol.
        With `direct` (and a multiaddr), the channel is a direct one when the peer serves the
        protocol so (`sogni_net.direct`: its own TCP connection, no yamux), else a libp2p
        stream as usual.
        """
        if direct and addr.startswith("/") and self._noise is not None:
            deadline = trio.current_time() + timeout
            try:
                return await self._open_direct(addr, protocol, timeout)
            except TransportError as exc:
                log_event(
                    logging.INFO, "direct_channel_unavailable", protocol=protocol, error=str(exc)
                )
            timeout = max(deadline - trio.current_time(), 1.0)

        async def opened() -> Channel:
            peer = await self._connect(addr)
            stream = await self._lp.new_stream(peer, [TProtocol(protocol)])
            channel = Channel(stream, protocol=protocol)
            channel._start(self._nursery)
            return channel

        async def orphan(channel: Channel) -> None:
            await channel.reset()

        return await self._detached(opened, timeout, f"open {protocol} to {addr}", orphan)

    async def _open_direct(self, addr: str, protocol: str, timeout: float) -> Channel:
        """A direct channel, or `TransportError`. The libp2p connection comes first (the
        fallback needs it too). The port query rides that connection, so it gets up to half
        of what is left: when it is slow, libp2p itself is slow (a coordinator that 50 nodes
        dial at once), and a short budget would send every node to the slower path for its
        whole session. The direct dial then gets at most `DIRECT_BUDGET` (a third of what is
        left), so a firewalled port leaves the fallback its time; a peer whose port did not
        answer is not tried directly again for a minute."""
        deadline = trio.current_time() + timeout
        peer = await self._detached(lambda: self._connect(addr), timeout, f"connect {addr}")
        key = peer.to_base58()
        if self._direct_down.get(key, 0.0) > trio.current_time():
            raise DialError("direct port unreachable a moment ago; using libp2p")
        port = self._direct_ports.get(key)
        if port is None:
            until = trio.current_time() + (deadline - trio.current_time()) / 2

            def left() -> float:
                return max(until - trio.current_time(), 0.1)

            query = await self.open_channel(key, direct_channels.DIRECT_PROTOCOL, timeout=left())
            async with query:
                answer = await query._receive_exact(3, timeout=left())
            port = direct_channels.decode_endpoint(answer)
        budget = min(direct_channels.DIRECT_BUDGET, (deadline - trio.current_time()) / 3)
        ip = _dial_host(addr)
        noise = self._noise
        assert noise is not None
        try:
            with trio.fail_after(max(budget, 0.1)):
                stream = await direct_channels.dial(ip, port, peer, protocol, noise)
        except (DialError, trio.TooSlowError, OSError) as exc:
            self._direct_ports.pop(key, None)  # a restarted peer may listen elsewhere now
            if isinstance(exc, DialError):
                raise
            self._direct_down[key] = trio.current_time() + direct_channels.RETRY_AFTER
            raise DialError(f"direct channel to {ip}:{port}: {describe(exc)}") from exc
        self._direct_ports[key] = port
        channel = Channel(stream, protocol=protocol)  # type: ignore[arg-type]
        channel._start(self._nursery)
        return channel

    async def _serve_direct(self, sock: trio.SocketStream) -> None:
        """One inbound direct connection: handshake under a deadline, then the handler. An
        IP gets at most `HANDSHAKES_PER_IP` handshakes at once: silent connections from one
        address cannot take every slot (each holds one for `HANDSHAKE_TIMEOUT`); and at most
        `CONNECTIONS_PER_IP` connections in all, so one address cannot hold every slot with
        connections it keeps open."""
        noise = self._noise
        assert noise is not None
        ip = address_key(_remote_ip(sock))  # an IPv6 /64 counts as one address
        if (
            self._handshaking.get(ip, 0) >= direct_channels.HANDSHAKES_PER_IP
            or self._direct_open.get(ip, 0) >= direct_channels.CONNECTIONS_PER_IP
        ):
            sock.socket.close()
            return
        try:
            self._direct_limit.acquire_nowait()
        except trio.WouldBlock:
            sock.socket.close()
            return
        self._handshaking[ip] = self._handshaking.get(ip, 0) + 1
        self._direct_open[ip] = self._direct_open.get(ip, 0) + 1
        try:
            try:
                with trio.fail_after(direct_channels.HANDSHAKE_TIMEOUT):
                    accepted = await direct_channels.accept(sock, noise, self._direct_handlers)
            except Exception as exc:
                log_event(logging.DEBUG, "direct_handshake_failed", error=describe(exc))
                return
            finally:  # also when cancelled mid-handshake
                _decrement(self._handshaking, ip)
            if accepted is None:
                return
            stream, protocol = accepted
            channel = Channel(stream, protocol=protocol)  # type: ignore[arg-type]
            await self._serve(self._direct_handlers[protocol], channel, trio.Event())
        finally:
            sock.socket.close()  # synchronous: also when shutdown cancels the handler
            _decrement(self._direct_open, ip)
            self._direct_limit.release()

    async def _answer_direct_port(self, channel: Channel) -> None:
        port = self.direct_port
        if port is not None:
            await channel.send_unframed(direct_channels.encode_endpoint(port))

    async def ping(self, peer_addr_or_id: str, *, timeout: float = 5.0) -> float:
        """Round-trip time in seconds of one libp2p ping (/ipfs/ping/1.0.0) to the peer.

        Our own client, not py-libp2p's `PingService`, which reports whole milliseconds
        (0 on a LAN). The first ping to a peer includes neither the dial nor the stream set-up.
        """
        deadline = trio.current_time() + timeout
        channel = await self.open_channel(peer_addr_or_id, PING_PROTOCOL, timeout=timeout)
        async with channel:
            payload = secrets.token_bytes(PING_LENGTH)
            remaining = max(deadline - trio.current_time(), 0.001)
            started = time.perf_counter()
            await channel.send_unframed(payload, timeout=remaining)
            echo = await channel._receive_exact(PING_LENGTH, timeout=remaining)
            rtt = time.perf_counter() - started
        if echo != payload:
            raise TransportError("ping echo does not match")
        return rtt

    async def _connect(self, addr: str) -> ID:
        info = peer_info(addr)
        if info.peer_id == self._lp.get_id():
            raise DialError("refusing to dial ourselves")
        network: Any = self._lp.get_network()
        if info.peer_id not in self._lp.get_connected_peers():
            # An explicit dial must not be refused by the swarm's 60 s negative cache.
            with contextlib.suppress(Exception):
                network.unblock_peer(info.peer_id)
        try:
            await self._lp.connect(info)
        except Exception as exc:
            raise DialError(f"cannot connect to {addr}: {describe(exc)}") from exc
        return info.peer_id

    async def _detached(
        self,
        operation: Callable[[], Awaitable[T]],
        timeout: float,
        what: str,
        orphan: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run a py-libp2p operation in the host nursery and wait for it with a deadline.

        Dials and stream negotiations write to the connection; cancelling them midway can
        desynchronise Noise for every stream on it. So the deadline only stops the wait: the
        operation finishes under py-libp2p's own timeouts and, if nobody wants the result any
        more, `orphan` disposes of it.
        """
        done = trio.Event()
        outcome: dict[str, Any] = {}
        abandoned = False

        async def runner() -> None:
            try:
                outcome["value"] = await operation()
            except Exception as exc:
                outcome["error"] = exc
            finally:
                done.set()
            if abandoned and "value" in outcome and orphan is not None:
                await orphan(outcome.pop("value"))

        try:
            self._nursery.start_soon(runner)
        except RuntimeError:
            raise TransportError("host is shut down") from None
        try:
            with trio.fail_after(timeout):
                await done.wait()
        except BaseException as exc:
            abandoned = True
            if "value" in outcome and orphan is not None:
                with contextlib.suppress(RuntimeError):  # nursery closed: shutdown cleans up
                    self._nursery.start_soon(orphan, outcome.pop("value"))
            if isinstance(exc, trio.TooSlowError):
                raise DialError(f"{what}: timed out after {timeout}s") from None
            raise
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, TransportError):
                raise error
            raise DialError(f"{what}: {describe(error)}") from error
        value: T = outcome["value"]
        return value

    # --- gossip -------------------------------------------------------------------------
    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip `data` on `topic` (one of the host's `pubsub_topics`)."""
        self._check_topic(topic)
        if len(data) > GOSSIP_MESSAGE_LIMIT:
            raise ValueError(f"gossip message of {len(data)} bytes exceeds {GOSSIP_MESSAGE_LIMIT}")
        await self._pubsub.publish(topic, bytes(data))
        await self._drain_gossip_queues()

    async def _drain_gossip_queues(self) -> None:
        """Back-pressure for publishers.

        py-libp2p queues at most 32 RPCs per peer and silently drops the rest, and its
        per-peer sender needs several scheduling rounds per RPC: a burst of publishes would
        mostly vanish. Wait (bounded) until every peer's queue is at most half full.
        """
        with trio.move_on_after(_GOSSIP_DRAIN_WAIT):
            while any(len(queue) > 16 for queue in self._pubsub.peer_queues.values()):
                await trio.sleep(0.001)

    def subscribe(
        self, topic: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[str, bytes]]]:
        """Receive `(origin peer id, data)` for messages on `topic` from other peers.

        Each subscriber gets its own buffer of 256 messages; a subscriber that falls further
        behind loses messages (logged) rather than stalling gossip for everyone.
        """
        self._check_topic(topic)
        return self._subscription(topic)

    @contextlib.asynccontextmanager
    async def _subscription(self, topic: str) -> AsyncIterator[AsyncIterator[tuple[str, bytes]]]:
        send, receive = trio.open_memory_channel[tuple[str, bytes]](_SUBSCRIBER_BUFFER)
        self._subscribers[topic].add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers[topic].discard(send)
            send.close()

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check every message on `topic` (ours included) before delivery and relay.

        Runs on the trio thread for each message: keep it fast and free of I/O. An exception
        counts as a rejection.
        """
        self._check_topic(topic)
        self._validators[topic] = validator

    def topic_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to `topic` (from their subscription announcements)."""
        return [peer.to_base58() for peer in self._pubsub.peer_topics.get(topic, ())]

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers our gossip on `topic` goes to directly (its GossipSub mesh).

        A peer can appear in `topic_peers` a moment before it is grafted; a message published
        in that window does not reach it (py-libp2p neither sends nor later gossips it), so
        wait for `mesh_peers` when the first message matters.
        """
        mesh = getattr(self._pubsub.router, "mesh", {})
        return [peer.to_base58() for peer in mesh.get(topic, ())]

    def _end_subscriptions(self) -> None:
        """On shutdown: end every subscriber's iteration instead of leaving it blocked."""
        for senders in self._subscribers.values():
            for send in senders:
                send.close()
            senders.clear()

    def _check_topic(self, topic: str) -> None:
        if topic not in self._topics:
            raise ValueError(f"topic {topic!r} is not one of this host's pubsub_topics")

    def _validate(self, topic: str, _forwarder: ID, msg: rpc_pb2.Message) -> bool:
        if len(msg.data) > GOSSIP_MESSAGE_LIMIT:
            return False
        validator = self._validators.get(topic)
        if validator is None:
            return True
        try:
            return bool(validator(ID(msg.from_id).to_base58(), bytes(msg.data)))
        except Exception as exc:
            log_event(logging.WARNING, "gossip_validator_failed", topic=topic, error=describe(exc))
            return False

    async def _join(self, topic: str, nursery: trio.Nursery) -> None:
        """Join the topic's mesh now (so we relay even with no local subscriber yet)."""
        self._pubsub.set_topic_validator(
            topic,
            lambda forwarder, msg: self._validate(topic, forwarder, msg),
            is_async_validator=False,
        )
        subscription = await self._pubsub.subscribe(topic)
        nursery.start_soon(self._dispatch, topic, subscription)

    async def _dispatch(self, topic: str, subscription: AsyncIterable[rpc_pb2.Message]) -> None:
        """Fan one py-libp2p subscription out to our subscribers, skipping our own messages."""
        async for msg in subscription:
            origin = ID(msg.from_id).to_base58()
            if origin == self.peer_id:
                continue
            item = (origin, bytes(msg.data))
            for send in list(self._subscribers[topic]):
                try:
                    send.send_nowait(item)
                except trio.WouldBlock:
                    log_event(logging.WARNING, "gossip_subscriber_lagging", topic=topic)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers[topic].discard(send)


@contextlib.asynccontextmanager
async def open_host(
    *,
    key_path: Path | None,
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    bootstrap: Sequence[str] = (),
    pubsub_topics: Sequence[str] = (),
    handlers: Mapping[str, Handler] | None = None,
    bootstrap_timeout: float = 10.0,
    direct: bool = False,
    direct_port: int = 0,
    inbound_limits: InboundLimits | None = None,
) -> AsyncIterator[Host]:
    """Run a libp2p host (TCP, Noise only, yamux, identify, ping, GossipSub) for the block.

    `key_path` is the persisted node key (created on first use); None means a throwaway
    identity. `handlers` are installed before the host listens, so no early stream is refused.
    Bootstrap peers are dialed concurrently before the block starts; a failure is logged,
    not raised. Leaving the block cancels every handler and channel, closes connections and
    listeners. With `direct`, the host also listens for direct channels (`sogni_net.direct`)
    on the first listen address's IP, port `direct_port` (0: any free port).
    `inbound_limits` caps inbound libp2p connections (`sogni_net.admission`; default
    `InboundLimits()`; like the other containment, only with py-libp2p 0.8.1).
    """
    quiet_libp2p_logging()
    _check_listen_addrs(listen)
    node_key = load_or_create_node_key(key_path) if key_path is not None else NodeKey.generate()
    key_pair = node_key.key_pair
    listen_addrs = [multiaddr.Multiaddr(addr) for addr in listen]
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    lp = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        transports=[TCP()],  # else listen addrs with /ws or /quic-v1 would add transports
        listen_addrs=listen_addrs,
        # 1, not the default 3: with 3 allowed, every dial waits out a 250 ms happy-eyeballs
        # delay for a second connection that never comes.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    network: Any = lp.get_network()
    penalties = None if refuse_unknown_version() else PeerPenalties(network)
    admission = None
    if penalties is not None:
        guard_streams(network, getattr(lp, "_swarm_stream_handler"), penalties)  # noqa: B009
        _contain_swarm_before_listening(network, penalties)
        admission = InboundAdmission(network, inbound_limits or InboundLimits())
        admission.install()
    # The guarded classes bound what one gossip RPC and one peer cost (`sogni_net.gossip`);
    # they override py-libp2p 0.8.1 internals, so only with containment on.
    router = (GossipSub if penalties is None else GuardedGossipSub)(
        protocols=list(_GOSSIP_PROTOCOLS),
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=1,
        # Per-peer rate limits and IP-diversity pruning misfire behind NAT and on one
        # machine; topic validators do the filtering instead.
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )
    # Always run pubsub, even without topics: py-libp2p opens a pubsub stream to every peer
    # it connects to and logs an error for each peer that does not speak it.
    topics = frozenset(pubsub_topics)
    if penalties is None:
        pubsub = Pubsub(lp, router, strict_signing=True, allowed_topics=topics)
    else:
        pubsub = GuardedPubsub(
            lp, router, strict_signing=True, allowed_topics=topics, penalties=penalties
        )
    if penalties is not None:
        ignore_peer_exchange(router)

    async with lp.run(listen_addrs):
        await _stop_auto_connector(lp)
        try:
            async with (
                background_trio_service(pubsub),
                background_trio_service(router),
                trio.open_nursery() as nursery,
            ):
                if penalties is not None:
                    contain_tasks(pubsub.manager, penalties, "pubsub")
                    contain_tasks(router.manager, penalties, "gossipsub")
                    penalties.attach(nursery, router)
                await pubsub.wait_until_ready()
                host = Host(lp, nursery, pubsub, pubsub_topics, penalties, noise, admission)
                if direct and listen_addrs:
                    first = listen_addrs[0]
                    ip = str(first.value_for_protocol(first.protocols()[0].name))
                    listeners = await nursery.start(
                        partial(trio.serve_tcp, host._serve_direct, direct_port, host=ip)
                    )
                    host.direct_port = int(listeners[0].socket.getsockname()[1])
                    host.set_stream_handler(
                        direct_channels.DIRECT_PROTOCOL, host._answer_direct_port
                    )
                for protocol, handler in (handlers or {}).items():
                    host.set_stream_handler(protocol, handler)
                for topic in dict.fromkeys(pubsub_topics):
                    await host._join(topic, nursery)
                await _bootstrap(host, bootstrap, bootstrap_timeout)
                log_event(logging.INFO, "host_started", peer=host.peer_id, addrs=host.addrs)
                try:
                    yield host
                finally:
                    nursery.cancel_scope.cancel()
                    host._end_subscriptions()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_SHUTDOWN_GRACE):
                await _close(lp, client=not listen_addrs)


async def _close(lp: Any, *, client: bool) -> None:
    """`lp.close()` (it also cancels py-libp2p's identify system tasks).

    py-libp2p pauses 0.2 s for every connection it closes (a `trio.sleep(0.1)` at the end
    of `Yamux.close` and another in `SwarmConn._cleanup`, for stream handlers to see their
    streams reset: ours were cancelled before this). A client host (no listeners: `render`,
    `collect`) stops waiting once every connection's socket is closed (GO_AWAY sent), so its
    teardown no longer adds 0.2 s to the end of every render (bench "overhead"); what is
    skipped is bookkeeping the host's exit cancels anyway (`SwarmConn.close` is idempotent,
    and the swarm's manager, stopped on leaving `lp.run`, goes over what is left). A host
    with listeners closes in full: they are closed after the connections."""
    muxers = [
        getattr(conn, "muxed_conn", None)
        for conns in getattr(lp.get_network(), "connections", {}).values()
        for conn in conns
    ]
    closed = [getattr(m, "event_closed", None) for m in muxers]
    if not client or not all(isinstance(e, trio.Event) for e in closed):
        await lp.close()
        return
    async with trio.open_nursery() as nursery:

        async def close_all() -> None:
            await lp.close()
            nursery.cancel_scope.cancel()

        nursery.start_soon(close_all)
        for event in closed:
            assert isinstance(event, trio.Event)
            await event.wait()
        nursery.cancel_scope.cancel()


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _remote_ip(sock: trio.SocketStream) -> str:
    """The remote address of an accepted socket ("" if the socket cannot say)."""
    try:
        return str(sock.socket.getpeername()[0])
    except (OSError, IndexError):
        return ""


def peer_info(addr: str) -> PeerInfo:
    """The peer id and addresses `addr` names (a /.../p2p/<id> multiaddr, or a bare peer id),
    or `AddressError` saying what is wrong with it (before anything is dialed).

    The peer id is checked to be one (`check_peer_id`): py-libp2p takes any base58 word,
    and `--coordinator garbage` would fail later, at the dial, as "unavailable"."""
    try:
        if addr.startswith("/"):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        else:
            info = PeerInfo(ID.from_base58(addr), [])
    except Exception as exc:
        why = str(exc).split(" (string: ")[0]  # multiaddr repeats the whole address
        if "P_P2P" in why:
            why = "it ends without /p2p/<peer id>"
        raise AddressError(
            f"{addr[:200]!r} is not a peer address: {why[:200]}",
        ) from None
    peer_id = info.peer_id.to_base58()
    try:
        check_peer_id(peer_id)
    except ValueError:
        shown = repr(peer_id[:80])
        why = "not a valid peer id either" if peer_id == addr else f"{shown} is not a peer id"
        raise AddressError(f"{addr[:200]!r} is not a peer address: {why}") from None
    return info


def _dial_host(addr: str) -> str:
    """The IP or DNS name in a peer's multiaddr, where its direct listener is too."""
    try:
        parsed = multiaddr.Multiaddr(addr)
        for proto in parsed.protocols():
            if proto.name in ("ip4", "ip6", "dns", "dns4", "dns6"):
                return str(parsed.value_for_protocol(proto.name))
    except Exception as exc:
        raise DialError(f"not a peer address: {addr!r}") from exc
    raise DialError(f"no IP or DNS name to dial directly in {addr!r}")


def _check_listen_addrs(listen: Sequence[str]) -> None:
    """Refuse listen addresses we cannot serve, and fixed ports that are already taken.

    Only `/ip4|ip6/<ip>/tcp/<port>` is served; py-libp2p would silently skip anything else.
    It listens with SO_REUSEPORT (for hole punching), so a second process on the same port
    starts without error and the kernel splits inbound connections between the two: a node
    started twice would serve half its peers from a stale process. A probe bind without
    SO_REUSEPORT collides with any existing listener, so the mistake surfaces here instead.
    """
    for text in listen:
        check_listen_addr(text)  # ValueError naming what it should be
        addr = multiaddr.Multiaddr(text)
        names = [proto.name for proto in addr.protocols()]
        port = int(addr.value_for_protocol("tcp") or 0)
        if port == 0:
            continue
        family = socket.AF_INET6 if names[0] == "ip6" else socket.AF_INET
        ip = addr.value_for_protocol(names[0])
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((str(ip), port))
            except OSError as exc:
                raise ListenError(f"cannot listen on {text}: {exc.strerror}") from exc


def _contain_swarm_before_listening(network: Any, penalties: PeerPenalties) -> None:
    """Contain the swarm's per-connection tasks from the first connection on.

    Its manager only exists once `lp.run` starts the swarm service, and `run` listens at
    once; wrapping `listen` (this instance's) patches the manager in between.
    """
    listen = network.listen

    async def contained_listen(*addrs: multiaddr.Multiaddr) -> bool:
        contain_tasks(network.manager, penalties, "swarm")
        return bool(await listen(*addrs))

    network.listen = contained_listen


async def _stop_auto_connector(lp: IHost) -> None:
    """Stop py-libp2p's auto-connector.

    Below 50 connections it re-dials, every 10 s and after each disconnect, any peer in the
    peerstore (fed by identify and gossip sender records) until it holds 150 connections:
    a coordinator would dial back every node it ever heard of. Our peers dial explicitly.
    """
    connector = getattr(lp.get_network(), "auto_connector", None)
    if connector is not None:
        await connector.stop()


async def _bootstrap(host: Host, peers: Sequence[str], timeout: float) -> None:
    async def dial(addr: str) -> None:
        try:
            await host.connect(addr, timeout=timeout)
        except TransportError as exc:
            log_event(logging.WARNING, "bootstrap_dial_failed", addr=addr, error=describe(exc))

    async with trio.open_nursery() as nursery:
        for addr in peers:
            nursery.start_soon(dial, addr)
