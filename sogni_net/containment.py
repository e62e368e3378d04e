"""Keep a hostile peer's bytes from ending the host: contain failures per stream and per peer.

py-libp2p 0.8.1 runs every inbound stream handler and many peer-triggered tasks under
service managers (the swarm's, pubsub's, gossipsub's) that treat any unexpected exception as
fatal: the manager cancels the whole service. So a few bytes that are not a valid pubsub RPC
(`DecodeError` out of `Pubsub.continuously_read_stream`) stopped the swarm, and with it every
connection of the daemon. See docs/upstream/ for each path and the fix proposed upstream.

Here, on one host's own objects (no class is patched), and only for the version we read:

* every inbound stream, whatever its protocol (identify, ping, meshsub, ours, any added later),
  runs under `guard_streams`: an exception resets that stream and penalises its peer;
* non-daemon tasks of the swarm, pubsub and gossipsub managers run under `contain_tasks`:
  an exception is logged, the peer it concerns is penalised, the service carries on;
* a penalised peer loses gossipsub score and is disconnected (as go-libp2p-pubsub and
  jvm-libp2p drop a peer that sends undecodable RPCs); it may reconnect and try again.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import libp2p
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.utils.connection_shutdown import is_expected_connection_shutdown

from sogni_net._log import describe, log_event

PATCHED_VERSION = "0.8.1"
"""The py-libp2p release whose internals these wrappers were written against."""

BEHAVIOUR_PENALTY = 10.0
"""Gossipsub behaviour penalty per contained failure (its score squares the counter)."""

StreamHandler = Callable[[INetStream], Awaitable[None]]


def supported() -> bool:
    """True when the installed py-libp2p is the version the wrappers were written for."""
    return getattr(libp2p, "__version__", None) == PATCHED_VERSION


def refuse_unknown_version() -> bool:
    """Log, once per host, that containment is off because py-libp2p is not 0.8.1."""
    if supported():
        return False
    log_event(
        logging.ERROR,
        "libp2p_containment_disabled",
        installed=getattr(libp2p, "__version__", "unknown"),
        expected=PATCHED_VERSION,
        reason="wrappers target py-libp2p internals of one version; a hostile peer may crash "
        "this daemon until sogni_net.containment is checked against the installed version",
    )
    return True


class PeerPenalties:
    """Scores down and disconnects peers whose input made a libp2p stream or task fail."""

    def __init__(self, network: Any, router: Any = None) -> None:
        self._network = network
        self._router = router
        self._nursery: trio.Nursery | None = None
        self._closing: set[ID] = set()
        self.strikes: Counter[str] = Counter()
        """Contained failures per peer id (base58), for tests and operators."""

    def attach(self, nursery: trio.Nursery, router: Any = None) -> None:
        """Disconnects run in `nursery` (the host's), never in the failing connection's."""
        self._nursery = nursery
        if router is not None:
            self._router = router

    def penalise(self, peer: ID, where: str, exc: BaseException) -> None:
        self.strikes[peer.to_base58()] += 1
        log_event(
            logging.WARNING,
            "libp2p_peer_misbehaved",
            peer=peer.to_base58(),
            where=where,
            error=describe(exc),
            strikes=self.strikes[peer.to_base58()],
        )
        scorer = getattr(self._router, "scorer", None)
        if scorer is not None:
            with contextlib.suppress(Exception):
                scorer.penalize_behavior(peer, BEHAVIOUR_PENALTY)
        if self._nursery is not None and peer not in self._closing:
            self._closing.add(peer)
            try:
                self._nursery.start_soon(self._disconnect, peer)
            except RuntimeError:  # host shutting down: its connections close anyway
                self._closing.discard(peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            with trio.move_on_after(5):
                await self._network.close_peer(peer)
        except Exception as exc:
            log_event(logging.DEBUG, "libp2p_disconnect_failed", error=describe(exc))
        finally:
            self._closing.discard(peer)


MAX_STREAMS_PER_PEER = 256
"""Inbound streams one peer may hold open at once; more are reset on arrival. py-libp2p has
one limit for the whole host (10,000 streams, inbound and outbound together): one peer
holding them all (say with idle pings) had every other peer's streams reset."""


def guard_streams(network: Any, inner: StreamHandler, penalties: PeerPenalties) -> None:
    """Install `inner` (the host's protocol dispatcher) behind a per-stream guard, which
    also caps each peer's open inbound streams at `MAX_STREAMS_PER_PEER`."""
    open_streams: dict[Any, int] = {}

    async def guarded(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        held = open_streams.get(peer, 0)
        if held >= MAX_STREAMS_PER_PEER:
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        open_streams[peer] = held + 1
        try:
            await inner(stream)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await stream.reset()
            if is_expected_connection_shutdown(exc):
                return
            penalties.penalise(peer, f"stream {stream.get_protocol()}", exc)
        finally:
            left = open_streams[peer] - 1
            if left:
                open_streams[peer] = left
            else:
                del open_streams[peer]

    network.set_stream_handler(guarded)


def contain_tasks(manager: Any, penalties: PeerPenalties, service: str) -> None:
    """Make `manager`'s non-daemon tasks fail alone instead of cancelling the service.

    The peer a failed task concerns is taken from its first `ID` argument (`push_msg`,
    `flush_pending_messages`, ...) or from the connection it serves (`muxed_conn.start`,
    `swarm_conn.start`, which is then closed).
    """
    original = manager.run_task

    def run_task(
        async_fn: Callable[..., Awaitable[Any]],
        *args: Any,
        daemon: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if daemon:
            original(async_fn, *args, daemon=daemon, name=name, **kwargs)
            return
        label = name or getattr(async_fn, "__name__", repr(async_fn))

        async def contained() -> None:
            try:
                await async_fn(*args)
            except Exception as exc:
                await _task_failed(exc, async_fn, args, f"{service} task {label}", penalties)

        original(contained, daemon=False, name=label, **kwargs)

    manager.run_task = run_task


async def _task_failed(
    exc: Exception,
    async_fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    where: str,
    penalties: PeerPenalties,
) -> None:
    owner = getattr(async_fn, "__self__", None)
    peer = next((arg for arg in args if isinstance(arg, ID)), None)
    if peer is None:
        peer = getattr(getattr(owner, "muxed_conn", owner), "peer_id", None)
    if owner is not None and (hasattr(owner, "muxed_conn") or hasattr(owner, "secured_conn")):
        # A connection's own task (SwarmConn.start, Yamux.start) failed: the connection is
        # unusable, so close it rather than leave it half-served.
        with contextlib.suppress(Exception), trio.move_on_after(5):
            await owner.close()  # type: ignore[union-attr]
    if is_expected_connection_shutdown(exc):
        return
    if isinstance(peer, ID):
        penalties.penalise(peer, where, exc)
    else:
        log_event(logging.ERROR, "libp2p_task_failed", where=where, error=describe(exc))


def ignore_peer_exchange(router: Any) -> None:
    """Drop PRUNE peer exchange (PX): a peer must not make us dial addresses it names.

    Our peers dial explicitly (the auto-connector is stopped for the same reason); py-libp2p
    dials every PX record whose signature checks out, and anyone can sign a record naming
    any address.
    """

    async def no_px(px_peers: list[Any]) -> None:
        if px_peers:
            log_event(logging.DEBUG, "gossip_px_ignored", peers=len(px_peers))

    router._do_px = no_px
