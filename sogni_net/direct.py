"""Direct channels: one TCP connection per channel, Noise-secured, no yamux in between.

py-libp2p moves a small frame through yamux at ~8x the CPU of the same frame sealed with
Noise's cipher straight on a socket (BENCHMARKS.md, "Dispatch", transport floor): yamux's
per-frame locks, events and window bookkeeping in Python. The hot streams (a node's job
session, an app's request) need none of yamux: each is one long-lived stream. So a host can
also listen for direct channels:

1. The dialer, already connected over libp2p, asks for the direct port on
   `DIRECT_PROTOCOL` (the answer is 3 bytes: version 1, port big-endian).
2. It dials that port over TCP and runs libp2p's own Noise XX handshake
   (`libp2p.security.noise`), expecting the peer id it dialed over libp2p: the listener
   proves that identity and learns the dialer's, exactly as on a libp2p connection.
3. The first Noise message names the protocol (1 byte version, then the protocol id);
   the listener answers one byte, 1 (served) or 0 (not served here), and the connection then
   carries the channel's bytes as Noise transport messages (2-byte length, ciphertext,
   as libp2p's Noise framing). A half-close (TCP FIN) ends one direction; an abortive close
   (TCP RST) is a reset.

A channel over it is the same `Channel` (frames, limits, deadlines) as over libp2p; anything
that fails on the way (no direct listener, a firewall, a handshake error) falls back to a
libp2p stream (`Host.open_channel`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Container
from typing import Any

import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from sogni_net.errors import DialError

DIRECT_PROTOCOL = "/sogni/direct/1.0.0"
"""libp2p protocol answering where this host listens for direct channels."""

HANDSHAKE_TIMEOUT = 5.0
"""Seconds an inbound direct connection gets for Noise and protocol selection."""

DIRECT_BUDGET = 3.0
"""Most seconds a dialer spends on the direct dial (TCP, Noise, protocol) before libp2p."""

HANDSHAKES_PER_IP = 64
"""Inbound connections from one IP address in their handshake at once; more are closed on
accept (a dialer refused so falls back to libp2p)."""

RETRY_AFTER = 60.0
"""Seconds a dialer uses libp2p for a peer whose direct port did not answer."""


def _connection_cap() -> int:
    """Direct connections served at once: a quarter of the file-descriptor limit (libp2p,
    SQLite and the HTTP listener need the rest), at most 4,096."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 4))


MAX_DIRECT_CONNECTIONS = _connection_cap()
"""Direct connections a host serves at once; more are closed on accept."""

CONNECTIONS_PER_IP = max(64, MAX_DIRECT_CONNECTIONS // 4)
"""Direct connections one IP address may have open at once (handshaking or serving); more
are closed on accept, and their dialers fall back to libp2p streams."""

_VERSION = 1
_MAX_PROTOCOL_BYTES = 256
_NOISE_MAX_MESSAGE = 65535
_TAG = 16
_MAX_PLAINTEXT = _NOISE_MAX_MESSAGE - _TAG
_RECV_SIZE = 1 << 17


def encode_endpoint(port: int) -> bytes:
    """The `DIRECT_PROTOCOL` answer."""
    return struct.pack(">BH", _VERSION, port)


def decode_endpoint(data: bytes) -> int:
    """The port from a `DIRECT_PROTOCOL` answer; raises `DialError` on anything else."""
    if len(data) != 3:
        raise DialError(f"direct endpoint answer has {len(data)} bytes, expected 3")
    version, port = struct.unpack(">BH", data)
    if version != _VERSION or port == 0:
        raise DialError(f"direct endpoint answer not understood (version {version}, port {port})")
    return port


class _Conn:
    """What `Channel` reads as `stream.muxed_conn`: the Noise-verified peer."""

    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id


class DirectStream:
    """A Noise session straight on a TCP socket, with the `read`/`write`/`close_write`/
    `close`/`reset` a `Channel` uses of a libp2p stream. One reader task, one writer task."""

    def __init__(self, sock: trio.SocketStream, noise_state: Any, peer_id: ID) -> None:
        self.muxed_conn = _Conn(peer_id)
        self._sock = sock
        self._noise = noise_state
        self._inbox = bytearray()  # ciphertext received, not yet a whole message
        self._plain = bytearray()  # decrypted, not yet read

    async def read(self, n: int | None = None) -> bytes:
        """Up to `n` bytes (all that is decrypted when None); b"" at the peer's FIN."""
        while not self._plain:
            if not self._decrypt_one():
                try:
                    data = await self._sock.receive_some(_RECV_SIZE)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise StreamReset(f"direct connection reset ({exc})") from exc
                except trio.ClosedResourceError:
                    return b""
                if not data:
                    if self._inbox:
                        raise StreamReset("direct connection closed inside a Noise message")
                    return b""
                self._inbox += data
        size = len(self._plain) if n is None else min(n, len(self._plain))
        out = bytes(self._plain[:size])
        del self._plain[:size]
        return out

    def _decrypt_one(self) -> bool:
        if len(self._inbox) < 2:
            return False
        size = int.from_bytes(self._inbox[:2], "big")
        if len(self._inbox) < 2 + size:
            return False
        sealed = bytes(self._inbox[2 : 2 + size])
        del self._inbox[: 2 + size]
        try:
            self._plain += self._noise.decrypt(sealed)
        except Exception as exc:
            raise StreamReset("direct connection sent a message that does not decrypt") from exc
        return True

    async def write(self, data: bytes) -> None:
        """All of `data`, sealed in as many Noise messages as it needs, in one socket send."""
        parts: list[bytes] = []  # joined once: no growing buffer copied again into bytes
        for start in range(0, max(len(data), 1), _MAX_PLAINTEXT):
            sealed = self._noise.encrypt(data[start : start + _MAX_PLAINTEXT])
            parts += (len(sealed).to_bytes(2, "big"), sealed)
        try:
            await self._sock.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamReset(f"direct connection lost ({exc})") from exc

    async def close_write(self) -> None:
        """Our FIN: the peer reads the end of the stream, and may still send."""
        try:
            await self._sock.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamReset(f"direct connection lost ({exc})") from exc

    async def close(self) -> None:
        await self._sock.aclose()

    def close_now(self) -> None:
        """Synchronous close, for a channel whose task was cancelled (host shutdown)."""
        self._sock.socket.close()

    async def reset(self) -> None:
        """Abortive close: the peer's next read fails (TCP RST), as a yamux reset does."""
        self.abort_now()
        await self._sock.aclose()

    def abort_now(self) -> None:
        """`reset`, synchronously: it also wakes a send stuck on a peer that stopped reading
        (the channel's reset is queued behind that send, which would never return)."""
        with contextlib.suppress(OSError):
            linger = struct.pack("ii", 1, 0)
            self._sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self._sock.socket.close()


async def _session(
    sock: trio.SocketStream, noise: NoiseTransport, peer: ID | None
) -> tuple[Any, ID]:
    """Run the Noise XX handshake (initiator when `peer` is given); (noise state, peer)."""
    raw = RawConnection(TrioTCPStream(sock), peer is not None)
    if peer is None:
        secure = await noise.secure_inbound(raw)
    else:
        secure = await noise.secure_outbound(raw, peer)
    remote: ID = secure.get_remote_peer()
    if peer is not None and remote != peer:
        raise DialError("direct listener proved another identity than the peer dialed")
    return secure.conn.noise_state, remote  # type: ignore[attr-defined]


async def dial(
    host: str, port: int, peer: ID, protocol: str, noise: NoiseTransport
) -> DirectStream:
    """Connect, prove both identities, and select `protocol`. The caller sets the deadline;
    on any failure the socket is closed and `DialError` raised."""
    sock = await trio.open_tcp_stream(host, port)
    try:
        state, remote = await _session(sock, noise, peer)
        stream = DirectStream(sock, state, remote)
        name = protocol.encode()
        if len(name) > _MAX_PROTOCOL_BYTES:
            raise DialError(f"protocol id too long for a direct channel: {protocol!r}")
        await stream.write(bytes([_VERSION]) + name)
        answer = await stream.read(1)
        if answer != b"\x01":
            raise DialError(f"peer does not serve {protocol} on direct channels")
        return stream
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await sock.aclose()
        if isinstance(exc, DialError):
            raise
        if isinstance(exc, Exception):
            raise DialError(f"direct channel to {host}:{port} failed: {exc}") from exc
        raise


async def accept(
    sock: trio.SocketStream, noise: NoiseTransport, served: Container[str]
) -> tuple[DirectStream, str] | None:
    """The listener's side of `dial`: a stream and its protocol, or None after refusing a
    protocol not in `served`. Raises on a broken handshake; the caller sets the deadline."""
    state, remote = await _session(sock, noise, None)
    stream = DirectStream(sock, state, remote)
    select = await stream.read(1 + _MAX_PROTOCOL_BYTES)
    if not select or select[0] != _VERSION:
        raise DialError("direct channel: protocol selection not understood")
    try:
        protocol = select[1:].decode()
    except UnicodeDecodeError:
        raise DialError("direct channel: protocol id is not UTF-8") from None
    if protocol not in served:
        await stream.write(b"\x00")
        return None
    await stream.write(b"\x01")
    return stream, protocol
