"""Admit inbound libp2p connections: a slot per live connection, caps per remote IP.

py-libp2p 0.8.1 takes one of 250 inbound slots (`Swarm._inbound_limiter`, max_connections -
min_connections) per accepted TCP connection and, once the connection is upgraded, holds it
until the whole swarm stops (`await self.manager.wait_finished()` in
`Swarm._do_handle_inbound_connection`): every connection ever accepted kept its slot after it
closed, and the 251st inbound connection of a host's life was refused, whoever made it (250
`sogni render` runs locked a coordinator out). Nor is there a per-IP limit: 250 silent TCP
sockets from one address held every slot for the 10 s upgrade timeout.

`InboundAdmission` replaces that handler on one swarm instance (no class is patched; the
listener calls `swarm._handle_inbound_connection` at each accept). A connection holds its
slot while it is open: the slot comes back when the connection closes or its upgrade fails.
One remote IP (an IPv6 /64 counts as one) may have at most `handshakes_per_ip` connections
in their Noise/yamux upgrade and `connections_per_ip` upgraded connections; more are closed
on accept.

Loopback is not exempt: the defaults leave room for the local devnets and tests (a few dozen
peers on 127.0.0.1). A host behind a local TCP proxy sees every peer as the proxy's address
and needs `InboundLimits` raised (`open_host(inbound_limits=...)`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection

from sogni_net._log import describe, log_event

_CHECK_INTERVAL = 30.0
"""How often a held slot checks that its connection is still the swarm's (a safety net: a
connection the swarm dropped without closing its muxer is closed then)."""

_REFUSAL_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class InboundLimits:
    """Caps on inbound libp2p connections (outbound dials are not counted)."""

    connections: int = 250
    """Open inbound connections, handshaking or upgraded, from everyone together
    (py-libp2p's own default: max_connections 300 - min_connections 50)."""
    handshakes_per_ip: int = 32
    """Connections from one IP still in their security/muxer upgrade (at most 10 s each)."""
    connections_per_ip: int = 128
    """Upgraded connections from one IP (a NAT may hide many honest peers)."""


class InboundAdmission:
    """The inbound connection handler of one swarm, with its counters."""

    def __init__(self, network: Any, limits: InboundLimits) -> None:
        self._network = network
        self.limits = limits
        self.slots = trio.CapacityLimiter(limits.connections)
        self.handshaking: Counter[str] = Counter()
        """Connections per remote IP in their upgrade."""
        self.established: Counter[str] = Counter()
        """Upgraded inbound connections per remote IP, until they close."""
        self.refused = 0
        """Connections closed on accept since the host started (any cap)."""
        self._logged: dict[str, float] = {}

    def install(self) -> None:
        """Take over `network`'s inbound handler (before it listens), and its slot count."""
        self._network._inbound_limiter = self.slots  # what py-libp2p's own stats read
        self._network._handle_inbound_connection = self.handle

    async def handle(self, read_write_closer: Any, maddr: Any) -> None:
        """One accepted connection, from accept to close (the listener closes the socket
        when this returns, so it returns only once the connection is over)."""
        ip = _remote_ip(read_write_closer)
        why = self._refusal(ip)
        if why is None:
            try:
                self.slots.acquire_nowait()
            except trio.WouldBlock:
                why = "inbound connection slots all taken"
        if why is not None:
            self._refuse(ip, why)
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return
        try:
            await self._serve(ip, read_write_closer, maddr)
        finally:
            self.slots.release()

    def _refusal(self, ip: str) -> str | None:
        if self.handshaking[ip] >= self.limits.handshakes_per_ip:
            return "too many handshakes from this IP"
        if self.established[ip] >= self.limits.connections_per_ip:
            return "too many connections from this IP"
        return None

    def _refuse(self, ip: str, why: str) -> None:
        self.refused += 1
        now = trio.current_time()
        if now - self._logged.get(ip, -_REFUSAL_LOG_INTERVAL) < _REFUSAL_LOG_INTERVAL:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[ip] = now
        log_event(logging.INFO, "libp2p_inbound_refused", ip=ip, reason=why, refused=self.refused)

    async def _serve(self, ip: str, read_write_closer: Any, maddr: Any) -> None:
        network = self._network
        self.handshaking[ip] += 1
        try:
            muxed = await self._upgrade(read_write_closer, maddr)
        finally:
            _decrement(self.handshaking, ip)
        if muxed is None:
            return
        self.established[ip] += 1
        try:
            await _until_closed(network, muxed)
        finally:
            _decrement(self.established, ip)

    async def _upgrade(self, read_write_closer: Any, maddr: Any) -> IMuxedConn | None:
        """What `Swarm._do_handle_inbound_connection` does before its wait: the connection
        gate, then the upgrade (under the swarm's inbound upgrade timeout) and `add_conn`."""
        network = self._network
        remote = network._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await network.connection_gate.is_allowed(remote):
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return None
        if isinstance(read_write_closer, IMuxedConn):  # QUIC and the like: no upgrade
            try:
                await network.add_conn(read_write_closer, direction="inbound")
            except Exception as exc:
                log_event(logging.DEBUG, "libp2p_inbound_failed", error=describe(exc))
                with contextlib.suppress(Exception):
                    await read_write_closer.close()
                return None
            return read_write_closer
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed: IMuxedConn = await network.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as exc:
            log_event(logging.DEBUG, "libp2p_inbound_failed", error=describe(exc))
            with contextlib.suppress(Exception):
                await raw_conn.close()
            return None
        return muxed


async def _until_closed(network: Any, muxed: Any) -> None:
    """Return when `muxed` has closed (or the swarm stops: the caller is cancelled)."""
    closed = getattr(muxed, "event_closed", None)
    if not isinstance(closed, trio.Event):  # a muxer we did not read: py-libp2p's own wait
        await network.manager.wait_finished()
        return
    while True:
        with trio.move_on_after(_CHECK_INTERVAL):
            await closed.wait()
            return
        peer = getattr(muxed, "peer_id", None)
        held = network.connections.get(peer, ()) if peer is not None else ()
        if not any(getattr(conn, "muxed_conn", None) is muxed for conn in held):
            with contextlib.suppress(Exception), trio.move_on_after(5):
                await muxed.close()
            return


def _decrement(counter: Counter[str], key: str) -> None:
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]


def _remote_ip(read_write_closer: Any) -> str:
    """The remote address key of an accepted connection ("" when it cannot say)."""
    try:
        address = read_write_closer.get_remote_address()
    except Exception:
        return ""
    if not address:
        return ""
    return address_key(str(address[0]))


def address_key(ip: str) -> str:
    """What per-IP caps count by: an IPv4 address, or an IPv6 address's /64 (one subscriber
    gets a whole /64, so counting single IPv6 addresses would cap nothing)."""
    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return ip
