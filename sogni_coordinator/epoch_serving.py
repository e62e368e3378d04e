"""Serve the coordinator's published epoch folder to nodes, over libp2p and HTTP.

Why: a node checks and claims its rewards from the epoch files (`epoch-N.json`, its tree dump,
and the content-addressed `receipts/0x<keccak>.json` batches) that `Settler` writes into
`publish_dir`. Before this, a node needed the coordinator's data folder on its own disk; now
it fetches them from any coordinator it trusts and checks them itself (the files prove
themselves: the batch's hash is its name and is posted on chain with the root), so serving
them needs no authentication.

`EpochFolder` is the one reader for both transports: strict names (`check_file_name`: no
`..`, no absolute path, nothing outside the folder, no symlink), a size cap, and an index
of the epochs cached by file (modification time and size), so listing a long history decodes
each epoch file once. Its methods block (file reads): callers run them in worker threads.
`serve_epochs` is the `/sogni/epochs/1.0.0` handler (`ids.EPOCHS_PROTOCOL`).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from sogni_net import Channel, ReadTimeout
from sogni_protocol import ids
from sogni_protocol.airdrop import evidence_filename
from sogni_protocol.epoch_files import content_hash, decode_epoch
from sogni_protocol.logs import get_logger
from sogni_protocol.relay_messages import (
    EpochFileChunk,
    EpochFileRequest,
    EpochFileStart,
    EpochIndex,
    EpochIndexRequest,
    EpochRefused,
    EpochSummary,
    check_file_name,
    decode,
    encode,
    epoch_file_names,
)

__all__ = ["EpochFileError", "EpochFolder", "serve_epochs"]

log = get_logger(__name__)

REQUEST_TIMEOUT = 30.0
"""How long a stream may sit idle between requests before it is closed."""
SEND_TIMEOUT = 30.0
"""Deadline for each frame of an answer (a peer that stops reading loses its stream)."""
MAX_REQUESTS_PER_STREAM = 100_000
CONCURRENT_TRANSFERS = 4
"""Files held in memory and sent at once (all streams together); others wait their turn."""
TRANSFER_WAIT = 30.0
MIN_TRANSFER_RATE = 256 * 1024
"""Bytes per second a file transfer must keep up on average (after `TRANSFER_GRACE`), over
libp2p and over HTTP (`http_api`, `GET /epochs/{name}`): the transfer slots are few, and four
readers trickling a byte before each send deadline held them all (every node's fetch
refused "busy")."""
TRANSFER_GRACE = 10.0
"""Seconds every transfer gets on top of its size at `MIN_TRANSFER_RATE` (`transfer_deadline`)."""

_EPOCH_JSON = re.compile(r"^epoch-([0-9]{6,18})\.json$")


class EpochFileError(Exception):
    """A file request that cannot be served: `code` as in `EpochRefused`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class _Cached:
    key: tuple[int, int]
    summary: EpochSummary | None


class EpochFolder:
    """A read-only view of `publish_dir` (it may not exist yet: then it lists nothing)."""

    def __init__(self, path: Path, *, file_limit: int = ids.EPOCH_FILE_LIMIT) -> None:
        self.path = Path(path)
        self.file_limit = file_limit
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self.limiter = trio.CapacityLimiter(4)
        """Worker threads reading this folder at once (both transports)."""
        self.transfers = trio.Semaphore(CONCURRENT_TRANSFERS)
        self.fetching: set[str] = set()
        """The libp2p peers fetching a file now: one each (HTTP counts its client addresses
        apart: `http_api.EPOCH_TRANSFERS_PER_ADDRESS`)."""

    def hold(self, who: str) -> bool:
        """Take `who`'s one transfer (False: it has one running); `let_go` gives it back."""
        if who in self.fetching:
            return False
        self.fetching.add(who)
        return True

    def let_go(self, who: str) -> None:
        self.fetching.discard(who)

    @staticmethod
    def transfer_deadline(size: int) -> float:
        """Seconds a file of `size` bytes may take to send (`MIN_TRANSFER_RATE`), by either
        transport."""
        return TRANSFER_GRACE + size / MIN_TRANSFER_RATE

    # --- index ---------------------------------------------------------------------------
    def index(
        self, after: int = 0, limit: int = ids.EPOCH_INDEX_PAGE
    ) -> tuple[list[EpochSummary], bool]:
        """Epochs numbered above `after`, oldest first, at most `limit`; and whether more
        follow. An epoch file that does not decode is left out (and logged)."""
        try:
            entries = list(os.scandir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return [], False
        found: list[EpochSummary] = []
        seen: set[str] = set()
        for entry in entries:
            match = _EPOCH_JSON.match(entry.name)
            if match is None or int(match.group(1)) <= after:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            seen.add(entry.name)
            summary = self._summary(entry.name, (st.st_mtime_ns, st.st_size))
            if summary is not None:
                found.append(summary)
        with self._lock:
            if after == 0:  # a full listing: forget files that are gone
                for name in set(self._cache) - seen:
                    del self._cache[name]
        found.sort(key=lambda s: s.epoch)
        return found[:limit], len(found) > limit

    def _summary(self, name: str, key: tuple[int, int]) -> EpochSummary | None:
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached.key == key:
            return cached.summary
        summary: EpochSummary | None = None
        try:
            data = self._read_regular(self.path / name)
            ef = decode_epoch(data)
            digest = bytes.fromhex(ef.receipts_hash.removeprefix("0x"))
            receipts = evidence_filename(ef.receipts_file, digest)
            expected_name, tree_name = epoch_file_names(ef.epoch)
            if expected_name != name:
                raise ValueError(f"it says it is epoch {ef.epoch}")
            summary = EpochSummary(
                epoch=ef.epoch,
                root=ef.root,
                total=ef.total,
                receipts_hash=ef.receipts_hash,
                file=name,
                digest="0x" + content_hash(data).hex(),
                receipts_file=receipts,
                tree_file=tree_name if (self.path / tree_name).is_file() else None,
                closed_at=max(ef.closed_at, 0),
                size=len(data),
            )
        except (OSError, ValueError, EpochFileError) as exc:
            log.warning("epoch_file_unreadable", file=name, error=str(exc))
        with self._lock:
            self._cache[name] = _Cached(key, summary)
        return summary

    # --- files ---------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        """The bytes of published file `name`; `EpochFileError` (`bad_name`, `not_found`,
        `too_large`) otherwise."""
        try:
            check_file_name(name)
        except ValueError as exc:
            raise EpochFileError("bad_name", str(exc)) from None
        return self._read_regular(self.path / name)

    def _read_regular(self, path: Path) -> bytes:
        """A regular file inside the folder (never through a symlink), size-capped."""
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or not path.resolve().is_relative_to(
                self.path.resolve()
            ):
                raise FileNotFoundError(path)
            if st.st_size > self.file_limit:
                raise EpochFileError(
                    "too_large", f"{path.name} is {st.st_size} bytes, over {self.file_limit}"
                )
            with open(path, "rb") as f:
                data = f.read(self.file_limit + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise EpochFileError("not_found", f"no published file {path.name}") from None
        if len(data) > self.file_limit:
            raise EpochFileError("too_large", f"{path.name} is over {self.file_limit} bytes")
        return data

    # --- async wrappers (worker threads) -------------------------------------------------
    async def index_async(self, after: int = 0) -> tuple[list[EpochSummary], bool]:
        return await trio.to_thread.run_sync(self.index, after, limiter=self.limiter)

    async def read_async(self, name: str) -> bytes:
        return await trio.to_thread.run_sync(self.read, name, limiter=self.limiter)


async def serve_epochs(channel: Channel, folder: EpochFolder) -> None:
    """`/sogni/epochs/1.0.0`: answer index and file requests until the peer closes or idles.

    A frame that does not decode raises `InvalidMessage` (the host logs and resets the
    stream); a request for a bad name or a missing file is answered with `EpochRefused`.
    """
    for _ in range(MAX_REQUESTS_PER_STREAM):
        try:
            payload = await channel.receive_raw(
                limit=ids.CONTROL_FRAME_LIMIT, timeout=REQUEST_TIMEOUT
            )
        except ReadTimeout:
            return  # idle: close gracefully
        request = decode(payload)
        if isinstance(request, EpochIndexRequest):
            epochs, more = await folder.index_async(request.after)
            await _send(channel, EpochIndex(epochs=epochs, more=more))
        elif isinstance(request, EpochFileRequest):
            await _send_file(channel, folder, request.name)
        else:
            await _send(
                channel,
                EpochRefused(code="bad_request", reason=f"{type(request).__name__} is no request"),
            )
            return


async def _send_file(channel: Channel, folder: EpochFolder, name: str) -> None:
    peer = channel.remote_peer_id
    if not folder.hold(peer):
        reason = "one file at a time per peer: this peer is fetching one already"
        await _send(channel, EpochRefused(code="unavailable", reason=reason))
        return
    try:
        with trio.move_on_after(TRANSFER_WAIT) as waited:
            await folder.transfers.acquire()
        if waited.cancelled_caught:
            reason = "busy: try again shortly"
            await _send(channel, EpochRefused(code="unavailable", reason=reason))
            return
        try:
            await _transfer(channel, folder, name)
        finally:
            folder.transfers.release()
    finally:
        folder.let_go(peer)


async def _transfer(channel: Channel, folder: EpochFolder, name: str) -> None:
    try:
        data = await folder.read_async(name)
    except EpochFileError as exc:
        await _send(channel, EpochRefused(code=exc.code, reason=exc.reason))
        return
    with trio.move_on_after(folder.transfer_deadline(len(data))) as late:
        await _send(channel, EpochFileStart(name=name, size=len(data), digest=content_hash(data)))
        for offset in range(0, len(data), ids.EPOCH_CHUNK_BYTES):
            chunk = data[offset : offset + ids.EPOCH_CHUNK_BYTES]
            await _send(channel, EpochFileChunk(data=chunk))
    if late.cancelled_caught:  # too slow a reader: its slot goes to the next
        log.info("epoch_transfer_too_slow", file=name, bytes=len(data))
        await channel.reset()


_Answer = EpochIndex | EpochFileStart | EpochFileChunk | EpochRefused


async def _send(channel: Channel, message: _Answer) -> None:
    await channel.send_raw(encode(message), limit=ids.EPOCHS_FRAME_LIMIT, timeout=SEND_TIMEOUT)
