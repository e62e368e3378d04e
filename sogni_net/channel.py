"""A channel: one libp2p stream carrying length-prefixed frames of typed messages.

Why the channel owns two background tasks (a reader "pump" and a writer) instead of calling
`stream.read` / `stream.write` in the caller's task:

* py-libp2p 0.8.1 is not cancel-safe. A cancelled `YamuxStream.read` can drop bytes it has
  already taken from the buffer, or skip the window update that credits them (the stream then
  stalls). A cancelled write can stop between Noise encryption and the socket send, which
  desynchronises the Noise nonce and kills the whole connection, every channel on it
  included. Deadlines (`trio.fail_after`) are cancellations, so every read and write here has
  one and must never cut into py-libp2p's I/O.
* So the pump reads into the channel's own buffer and is only cancelled when the stream is
  being reset anyway, and the writer performs every write, FIN and RST to completion. Callers
  wait on those tasks with deadlines; waiting is cancel-safe, so a `ReadTimeout` loses no
  bytes and the next `receive` continues where the stream is.
* The pump reads in its own loop: py-libp2p's `read_exactly` with its default `retry_count`
  gives up on healthy streams above a few hundred KB.
* The writer writes every frame queued when it wakes in ONE `stream.write` (up to
  `_BATCH_BYTES`): each py-libp2p write costs a yamux frame, a Noise encryption, a trio lock
  round and a socket send whatever its size, so under load small frames (acks, offers,
  images to a client) ride together instead of paying that per frame. `send_many` queues
  several frames at once so they leave in one write; `writes` counts the writes.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.network.stream.net_stream import StreamState
from libp2p.stream_muxer.yamux import yamux

from sogni_net._log import describe
from sogni_net.errors import ChannelClosed, ReadTimeout, WriteTimeout
from sogni_protocol.errors import FrameTooLarge, InvalidMessage
from sogni_protocol.framing import HEADER_SIZE, body_length, encode_frame
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import Message, decode, encode

SLOWEST_LINK = 128 * 1024
"""Bytes a second a frame's body may take to arrive, on top of the receive's own timeout
(`Channel.receive_raw`): 1 Mbit/s, so the largest result frame (32 MiB) has ~4 minutes."""

_READ_SIZE = 1 << 20
"""Largest chunk asked of yamux per read; it returns what is buffered, up to this."""

_READ_AHEAD = 4 << 20
"""The pump reads ahead of `receive` up to this many bytes (or the frame being assembled).

Generous because a py-libp2p yamux writer whose send window stays shut for 5 s fails the
write: a typical result frame should fit even while the receiving task is busy elsewhere.
"""

_BATCH_BYTES = 1 << 20
"""The writer joins queued frames into one stream write up to about this many bytes."""

_RESET_WAIT = 1.0
"""How long `reset()` waits for the RST to leave before returning anyway."""

DEFAULT_LINGER = 10.0
"""After `close()`, how long the peer gets to close its side before the stream is reset."""


@dataclass(eq=False)
class _WriteOp:
    kind: Literal["data", "fin", "reset"]
    data: bytes = b""
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Channel:
    """One stream speaking frames; the peer's identity is `remote_peer_id` (Noise-verified).

    Use it as an async context manager: leaving the block closes it (resets it on an error).
    One task should receive at a time; sends from several tasks are serialised frame by frame.
    """

    def __init__(self, stream: INetStream, *, protocol: str, linger: float = DEFAULT_LINGER):
        self._stream = stream
        self.protocol = protocol
        self.remote_peer_id: str = stream.muxed_conn.peer_id.to_base58()
        self._linger = linger
        # receive side
        self._buf = bytearray()
        self._want = 0
        self._data_lot = trio.lowlevel.ParkingLot()
        self._space_lot = trio.lowlevel.ParkingLot()
        self._recv_lock = trio.Lock()
        self._read_end: str | None = None  # why no more bytes will arrive
        self._recv_closed: str | None = None  # set when we stopped receiving ourselves
        self._pump_scope = trio.CancelScope()
        self._fast_frames = 0
        # send side
        self._ops_send, self._ops_recv = trio.open_memory_channel[_WriteOp](math.inf)
        self._send_end: str | None = None  # why `send` refuses new frames
        self._aborted = False  # reset requested: drop queued frames, send RST
        self._peer_reset = False
        self._fin_sent = False
        self._finished = trio.Event()
        self.writes = 0
        """Data writes made to the stream (each may carry several frames)."""

    # --- lifecycle ---------------------------------------------------------------------
    def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._run)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            self._reset_nowait("aborted by an error")

    async def close(self, *, timeout: float = 10.0) -> None:
        """Graceful close: flush queued frames, send FIN, stop receiving.

        Returns once the FIN is written; the peer then has `linger` seconds to close its side
        before the stream is reset in the background. Idempotent; never raises for a channel
        that is already closed or reset.
        """
        self._stop_receiving("channel closed locally")
        # From now on the peer has `linger` seconds to send its FIN (the pump discards data).
        self._pump_scope.deadline = min(
            self._pump_scope.deadline, trio.current_time() + self._linger
        )
        if self._send_end is None:
            self._send_end = "channel closed locally"
            op = _WriteOp("fin")
            if self._enqueue(op):
                with trio.move_on_after(timeout) as scope:
                    await op.done.wait()
                if scope.cancelled_caught:
                    self._reset_nowait("close timed out")

    async def close_write(self, *, timeout: float = 10.0) -> None:
        """Half-close: send FIN after queued frames; frames from the peer can still be received."""
        if self._send_end is not None:
            return
        self._send_end = "channel closed for sending"
        op = _WriteOp("fin")
        if self._enqueue(op):
            with trio.move_on_after(timeout) as scope:
                await op.done.wait()
            if scope.cancelled_caught:
                self._reset_nowait("close timed out")
                raise WriteTimeout(f"FIN not written within {timeout}s")

    async def reset(self) -> None:
        """Abort both directions now; queued frames are dropped, the peer sees a reset."""
        op = self._reset_nowait("channel reset locally")
        if op is not None:
            with trio.move_on_after(_RESET_WAIT):
                await op.done.wait()

    def _reset_nowait(self, reason: str) -> _WriteOp | None:
        if self._aborted:
            return None
        self._aborted = True
        self._send_end = self._send_end or reason
        self._recv_closed = self._recv_closed or reason
        self._pump_scope.cancel()
        self._data_lot.unpark_all()
        abort_now = getattr(self._stream, "abort_now", None)
        if abort_now is not None:  # a direct channel's own socket: closed now, so a write
            abort_now()  # stuck on a peer that stopped reading ends (else never: task leaked)
        op = _WriteOp("reset")
        return op if self._enqueue(op) else None

    def _stop_receiving(self, reason: str) -> None:
        self._recv_closed = self._recv_closed or reason
        self._buf.clear()
        self._data_lot.unpark_all()
        self._space_lot.unpark_all()

    def _enqueue(self, op: _WriteOp) -> bool:
        try:
            self._ops_send.send_nowait(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    # --- sending ------------------------------------------------------------------------
    async def send(
        self, message: Message, *, limit: int = CONTROL_FRAME_LIMIT, timeout: float = 10.0
    ) -> None:
        """Send one typed message as one frame; `FrameTooLarge` if it exceeds `limit`."""
        await self._send_bytes(encode_frame(encode(message), limit), timeout)

    async def send_many(
        self, frames: Sequence[tuple[Message, int]], *, timeout: float = 10.0
    ) -> None:
        """Send several `(message, limit)` frames, queued together so that they leave in one
        stream write; returns when all are written. `FrameTooLarge` before any is queued."""
        payloads = [encode_frame(encode(message), limit) for message, limit in frames]
        await self.send_frames(payloads, timeout=timeout)

    async def send_frames(self, frames: Sequence[bytes], *, timeout: float = 10.0) -> None:
        """Send already framed payloads (`encode_frame`) together, in one write if they fit."""
        if not frames:
            return
        if self._send_end is not None:
            raise ChannelClosed(self._send_end)
        ops = [_WriteOp("data", frame) for frame in frames]
        for op in ops:
            if not self._enqueue(op):
                raise ChannelClosed(self._send_end or "channel is closed")
        # The writer answers ops in queue order (a batch, or the rest failed when the
        # stream ends), so once the last is done all are: one deadline for the whole send
        # (each `fail_after` costs a cancel scope and a deadline entry, ~12 us here), then
        # the first op's error, in order.
        for op in reversed(ops):
            if not op.done.is_set():
                await self._wait_done(op, timeout)
        for op in ops:
            self._raise_failed(op)

    async def send_raw(
        self, payload: bytes, *, limit: int = CONTROL_FRAME_LIMIT, timeout: float = 10.0
    ) -> None:
        """Send `payload` as one frame without encoding it (tests of a misbehaving peer)."""
        await self._send_bytes(encode_frame(payload, limit), timeout)

    async def send_unframed(self, data: bytes, *, timeout: float = 10.0) -> None:
        """Write bytes with no frame header at all (tests that fake a hostile peer)."""
        await self._send_bytes(bytes(data), timeout)

    async def _send_bytes(self, data: bytes, timeout: float) -> None:
        if self._send_end is not None:
            raise ChannelClosed(self._send_end)
        op = _WriteOp("data", data)
        if not self._enqueue(op):
            raise ChannelClosed(self._send_end or "channel is closed")
        await self._wait_written(op, timeout)

    async def _wait_written(self, op: _WriteOp, timeout: float) -> None:
        await self._wait_done(op, timeout)
        self._raise_failed(op)

    async def _wait_done(self, op: _WriteOp, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                await op.done.wait()
        except trio.TooSlowError:
            self._reset_nowait("write timed out")
            raise WriteTimeout(f"frame not written within {timeout}s") from None

    @staticmethod
    def _raise_failed(op: _WriteOp) -> None:
        if op.error is not None:
            if _window_stalled(op.error):
                raise WriteTimeout(
                    "peer stopped reading: yamux gives up after its send window stays shut for 5 s"
                ) from op.error
            raise ChannelClosed(f"send failed: {describe(op.error)}") from op.error

    # --- receiving ----------------------------------------------------------------------
    async def receive(self, *, limit: int = CONTROL_FRAME_LIMIT, timeout: float) -> Message:
        """Next typed message; `InvalidMessage` if the frame does not decode.

        The channel stays usable after `InvalidMessage` (the frame was read whole); whether
        to carry on is the caller's decision.
        """
        payload = await self.receive_raw(limit=limit, timeout=timeout)
        try:
            return decode(payload)
        except UnicodeDecodeError as exc:
            # msgspec raises this, not a DecodeError, for a string that is not UTF-8; it is
            # the peer's fault like any other undecodable frame (found by tests/fuzz).
            raise InvalidMessage(
                f"not a MessagePack message: invalid UTF-8 ({exc.reason})"
            ) from None

    async def receive_raw(self, *, limit: int = CONTROL_FRAME_LIMIT, timeout: float) -> bytes:
        """Next frame's payload, undecoded.

        The header is checked against `limit` before any of the body is waited for; a frame
        that is too large raises `FrameTooLarge` and resets the channel. `timeout` bounds the
        wait for a frame; once its header names the size, the body also gets the time that
        size takes at `SLOWEST_LINK` bytes a second (a result of 8 MB over a slow uplink is
        not a silent peer; a trickle still ends).
        """
        whole = self._buffered_frame(limit)
        if whole and self._fast_frames < _FAST_FRAMES:
            # A frame already here (the rest of a batched write): taken without a turn of
            # the event loop, which a lock and a deadline would cost per frame; every
            # `_FAST_FRAMES`th frame takes the slow path, so a flood cannot starve the loop.
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self._recv_lock.locked() and self._recv_closed is None:
                self._fast_frames += 1
                return self._take(whole, skip=HEADER_SIZE)
        self._fast_frames = 0
        try:
            with trio.fail_after(timeout) as deadline:
                async with self._recv_lock:
                    try:
                        await self._fill(HEADER_SIZE)
                        try:
                            size = body_length(bytes(self._buf[:HEADER_SIZE]), limit)
                        except FrameTooLarge:
                            self._reset_nowait("peer sent a frame above the limit")
                            raise
                        deadline.deadline += size / SLOWEST_LINK
                        await self._fill(HEADER_SIZE + size)
                        return self._take(HEADER_SIZE + size, skip=HEADER_SIZE)
                    finally:
                        self._want = 0
        except trio.TooSlowError:
            raise ReadTimeout(f"no complete frame within {timeout}s") from None

    def _buffered_frame(self, limit: int) -> int:
        """The length (header included) of a whole frame waiting at the buffer's front, if
        nobody else is receiving; 0 otherwise, or when its header needs the slow path (too
        large: that path resets the channel)."""
        if self._recv_lock.locked() or self._recv_closed is not None:
            return 0
        if len(self._buf) < HEADER_SIZE:
            return 0
        try:
            size = body_length(bytes(self._buf[:HEADER_SIZE]), limit)
        except FrameTooLarge:
            return 0
        return HEADER_SIZE + size if len(self._buf) >= HEADER_SIZE + size else 0

    async def _receive_exact(self, n: int, *, timeout: float) -> bytes:
        """Exactly `n` unframed bytes (ping's echo)."""
        try:
            with trio.fail_after(timeout):
                async with self._recv_lock:
                    try:
                        await self._fill(n)
                        return self._take(n)
                    finally:
                        self._want = 0
        except trio.TooSlowError:
            raise ReadTimeout(f"{n} bytes not received within {timeout}s") from None

    async def drain(self, *, timeout: float) -> str:
        """Discard whatever the peer sends until it ends the stream; returns how it ended
        ("closed by peer", "reset by peer", ...). For probes of protocols that are not ours.

        Raises `ReadTimeout` if the stream is still open after `timeout`.
        """
        try:
            with trio.fail_after(timeout):
                async with self._recv_lock:
                    while self._read_end is None:
                        if self._recv_closed is not None:
                            raise ChannelClosed(self._recv_closed)
                        self._buf.clear()
                        self._space_lot.unpark_all()
                        await self._data_lot.park()
                    self._buf.clear()
                    return self._read_end
        except trio.TooSlowError:
            raise ReadTimeout(f"stream still open after {timeout}s") from None

    async def _fill(self, n: int) -> None:
        """Wait until `n` bytes are buffered. Cancel-safe: nothing is consumed here."""
        self._want = n
        while len(self._buf) < n:
            if self._recv_closed is not None:
                raise ChannelClosed(self._recv_closed)
            if self._read_end is not None:
                if self._buf:
                    raise ChannelClosed(
                        f"{self._read_end} mid-frame ({len(self._buf)} of {n} bytes)"
                    )
                raise ChannelClosed(self._read_end)
            self._space_lot.unpark_all()
            await self._data_lot.park()
        if self._recv_closed is not None:
            raise ChannelClosed(self._recv_closed)

    def _take(self, n: int, *, skip: int = 0) -> bytes:
        """Consume `n` buffered bytes and return those after the first `skip`; synchronous."""
        if self._recv_closed is not None:
            raise ChannelClosed(self._recv_closed)
        out = bytes(self._buf[skip:n])
        del self._buf[:n]
        self._want = 0
        self._space_lot.unpark_all()
        return out

    # --- background tasks ---------------------------------------------------------------
    async def _run(self) -> None:
        released = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                await self._writer()
            await self._release()
            released = True
        finally:
            close_now = getattr(self._stream, "close_now", None)
            if not released and close_now is not None:
                close_now()  # cancelled (host shutdown): a direct channel owns its socket
            self._finished.set()

    async def _pump(self) -> None:
        reason = "closed by peer"
        with self._pump_scope:
            try:
                while True:
                    while self._recv_closed is None and len(self._buf) >= max(
                        _READ_AHEAD, self._want
                    ):
                        await self._space_lot.park()
                    data = await self._stream.read(_READ_SIZE)
                    if not data:
                        break
                    if self._recv_closed is None:
                        self._buf += data
                        self._data_lot.unpark_all()
            except StreamEOF:
                # Yamux drops a reset stream's bookkeeping on RST, and a later read then
                # reports EOF: only the muxed stream's flag tells a reset from a FIN.
                muxed = getattr(self._stream, "muxed_stream", None)
                if getattr(muxed, "reset_received", False):
                    reason = "reset by peer"
                    self._peer_reset = True
            except StreamReset:
                reason = "reset by peer"
                self._peer_reset = True
            except Exception as exc:
                reason = f"connection lost ({describe(exc)})"
                self._peer_reset = True
        if self._pump_scope.cancelled_caught:
            reason = self._recv_closed or "peer did not close in time"
            if not self._aborted:  # linger expired after our FIN
                self._aborted = True
        self._read_end = reason
        self._data_lot.unpark_all()
        if self._peer_reset:
            # Nothing can be written any more: fail queued frames and let the writer end.
            self._send_end = self._send_end or reason
            self._ops_send.close()

    async def _writer(self) -> None:
        with self._ops_recv:
            pending: _WriteOp | None = None
            while True:
                if pending is not None:
                    op, pending = pending, None
                else:
                    try:
                        op = await self._ops_recv.receive()
                    except trio.EndOfChannel:
                        break
                if op.kind == "data" and self._aborted:
                    op.error = ChannelClosed(self._send_end or "channel reset")
                    op.done.set()
                    continue
                if op.kind == "data":
                    pending = await self._write_batch(op)
                    continue
                try:
                    if op.kind == "fin":
                        # NetStream.close_write is a yamux half-close (FIN); INetStream
                        # does not declare it, and close() would also drop the stream.
                        await getattr(self._stream, "close_write", self._stream.close)()
                        self._fin_sent = True
                    elif not self._peer_reset:
                        await self._stream.reset()
                except Exception as exc:
                    op.error = exc
                finally:
                    op.done.set()
                break
            # Our side is finished: anything queued behind the FIN/RST (a late reset()) is
            # moot; `_release` sends the RST if one was asked for.
            self._ops_send.close()
            if pending is not None:
                pending.error = ChannelClosed(self._send_end or "channel is closed")
                pending.done.set()
            while True:
                try:
                    leftover = self._ops_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                leftover.error = ChannelClosed(self._send_end or "channel is closed")
                leftover.done.set()

    async def _write_batch(self, first: _WriteOp) -> _WriteOp | None:
        """Write `first` and every data frame queued behind it (up to `_BATCH_BYTES`) in one
        stream write; returns the op that stopped the batch (a FIN or RST), if any.

        One cancel-shielded yield first, so frames queued by tasks already runnable (the
        reader's ack, the dispatcher's next offer, a burst of images) join this write."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        batch = [first]
        size = len(first.data)
        stop: _WriteOp | None = None
        while size < _BATCH_BYTES:
            try:
                op = self._ops_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if op.kind != "data":
                stop = op
                break
            batch.append(op)
            size += len(op.data)
        try:
            self.writes += 1
            await _write(
                self._stream, first.data if len(batch) == 1 else b"".join(op.data for op in batch)
            )
        except Exception as exc:
            for op in batch:
                op.error = exc
            # A failed write may be half-done: the stream cannot be used again.
            self._reset_nowait(f"write failed ({describe(exc)})")
        finally:
            for op in batch:
                op.done.set()
        return stop

    async def _release(self) -> None:
        """Drop the stream from py-libp2p's bookkeeping; RST it if the peer never closed."""
        try:
            if self._aborted and not self._peer_reset:
                await self._stream.reset()
            elif self._fin_sent and not self._peer_reset:
                await self._stream.close()  # both sides closed: no bytes on the wire
            else:
                await self._stream.reset()  # peer reset or connection gone: local cleanup
        except Exception:
            pass


_FAST_FRAMES = 64
"""Frames `receive_raw` may take from the buffer in a row without a loop turn."""

_YAMUX_CHUNK = yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE

RELEASE_ON_READ = os.environ.get("PY_YAMUX_RELEASE_ON_READ", "0").upper() not in (
    "0",
    "FALSE",
    "NO",
)
"""Off unless `PY_YAMUX_RELEASE_ON_READ` says otherwise (read once, at import). py-libp2p's
yamux, with it on (its default), sends a WINDOW_UPDATE after every read: one more frame (a
Noise record and a socket send here, a read and a wake-up at the peer) for each batch of
frames a stream receives. Off, only its go-yamux-style rule sends one (when the credit not
yet returned is worth an update), which for small reads is every other read: half the frames
(tests/net/test_window_credit.py: 21 instead of 40 for 40 reads; BENCHMARKS.md, Dispatch).
tests/net and the js-libp2p interop test (tests/net/test_interop_hostile.py) pass with it
off. Set in py-libp2p's module, not in `os.environ`, so child processes (another commit's
benchmark) keep their own default."""


def _release_on_read() -> bool:
    return RELEASE_ON_READ


yamux._yamux_release_on_read = _release_on_read  # py-libp2p looks it up on every update


async def _write(stream: INetStream, data: bytes) -> None:
    """`stream.write(data)`, with what the yamux send window allows passed to the connection
    as one write of all its 64 KB yamux frames.

    py-libp2p's own write takes a stream lock, the window lock, the connection's write lock
    and a checkpoint for every 64 KB frame: on a busy event loop each of those awaits waits
    a full turn among every other stream, and a batch of images to a client took seconds
    (BENCHMARKS.md, Dispatch). The bytes on the wire are the same frames. Anything this
    cannot do so (another muxer, a stream not open for writing, no window) goes the usual
    way, which also raises the usual errors."""
    muxed = getattr(stream, "muxed_stream", None)
    if (
        len(data) <= _YAMUX_CHUNK
        or not isinstance(muxed, yamux.YamuxStream)
        or getattr(stream, "_state", None) not in (StreamState.OPEN, StreamState.CLOSE_READ)
    ):
        await stream.write(data)
        return
    frames = b""
    async with muxed.rw_lock.write_lock():
        n = min(muxed.send_window, len(data))
        if n > 0 and not (muxed.send_closed or muxed.closed):
            muxed.send_window -= n  # no await between the check and the update
            chunks = [data[i : min(i + _YAMUX_CHUNK, n)] for i in range(0, n, _YAMUX_CHUNK)]
            head = yamux.YAMUX_HEADER_FORMAT
            frames = b"".join(
                struct.pack(head, 0, yamux.TYPE_DATA, 0, muxed.stream_id, len(c)) + c
                for c in chunks
            )
    if frames:
        await muxed.conn._write_frame(frames)
        data = data[n:]
    if data:
        await stream.write(data)


def _window_stalled(exc: BaseException | None) -> bool:
    """py-libp2p reports a shut yamux window only as text inside a StreamReset's cause."""
    while exc is not None:
        if "waiting for window update" in str(exc):
            return True
        exc = exc.__cause__
    return False


async def send_all(
    channel: Channel, frames: Sequence[tuple[Message, int]], *, timeout: float = 10.0
) -> None:
    """`channel.send_many(frames)`; a stand-in channel without it (tests, benchmarks) gets
    the frames one `send` at a time."""
    many = getattr(channel, "send_many", None)
    if many is not None:
        await many(frames, timeout=timeout)
        return
    for message, limit in frames:
        await channel.send(message, limit=limit, timeout=timeout)
