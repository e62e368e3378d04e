"""Fetch a coordinator's published epochs into the node's cache, check them; relay claims.

Why: `sogni-node rewards` used to need the coordinator's own data folder on the node's disk.
Now it asks the coordinators it trusts (`epoch_sources`, else `coordinators`), over libp2p
(`/sogni/epochs/1.0.0`) or their HTTP listener (`GET /epochs`, `GET /epochs/{name}`), and
keeps a copy per source under `data_dir/epochs/<peer id or host>`. Nothing fetched is
trusted: the files are written into a staging folder, every receipts batch must hash to its
name, and `sogni_protocol.epoch_audit.audit_folder` must recompute every epoch from them
before the staging folder replaces the cached copy. A source that serves files failing the
check is refused (`EpochsRejected`, naming the first problem), and the cache keeps the
last copy that passed. When no source answers, the last checked copy is used (and said so).

Every read has a deadline (`timeout` per frame or request, `file_timeout` per file) and a
size cap (`ids.EPOCH_FILE_LIMIT`): a file announced or delivered bigger is cut off.

`relay_claim` asks a coordinator to submit a claim (`/sogni/relay/1.0.0` or
`POST /relay/claim`) and pay its gas; the tokens go to the claiming account regardless.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from sogni_protocol import ids
from sogni_protocol.airdrop import evidence_filename
from sogni_protocol.epoch_files import content_hash
from sogni_protocol.errors import DECODE_ERRORS, ProtocolError
from sogni_protocol.json_depth import check_depth
from sogni_protocol.relay_messages import (
    EpochFileChunk,
    EpochFileRequest,
    EpochFileStart,
    EpochIndex,
    EpochIndexRequest,
    EpochRefused,
    EpochSummary,
    RelayClaim,
    RelayDone,
    RelayRefused,
    check_file_name,
    decode,
    encode,
    epoch_file_names,
)

if TYPE_CHECKING:
    from sogni_net import Channel, Host

__all__ = [
    "EpochFetchError",
    "EpochsRejected",
    "FetchedEpochs",
    "RelayFailed",
    "fetch_epochs",
    "is_http",
    "relay_claim",
    "source_key",
]

READ_TIMEOUT = 30.0
"""Deadline for each answer (an index page, a file's first frame, each chunk)."""
FILE_TIMEOUT = 300.0
"""Deadline for a whole file (64 MiB at ~220 KB/s)."""
RELAY_TIMEOUT = 120.0
"""Deadline for a relayed claim's answer: the coordinator waits for the transaction."""
MAX_INDEX_PAGES = 10_000


T = TypeVar("T")


class EpochFetchError(Exception):
    """No source could be read (and no checked copy is cached)."""


class EpochsRejected(EpochFetchError):
    """A source served files that fail the node's check: nothing of it was kept."""


class EpochCacheError(Exception):
    """The fetched epochs could not be written here (this machine's disk or permissions,
    not the coordinator): `todo` says what to do."""

    def __init__(self, message: str, todo: str) -> None:
        super().__init__(message)
        self.todo = todo


def _local_fault(exc: OSError, cache_root: Path) -> EpochCacheError:
    where = exc.filename or cache_root
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free space on this machine's disk ({cache_root}), or pass --epochs-dir"
    else:
        todo = (
            f"check the owner and permissions of {cache_root} (data_dir/epochs) on this "
            "machine, or pass --epochs-dir"
        )
    return EpochCacheError(
        f"cannot keep the published epochs here: {where}: {reason} (a local write failed; "
        "the coordinator is not at fault)",
        todo,
    )


async def _locally(cache_root: Path, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread: a file operation on this machine, whose OSError is an
    `EpochCacheError` (never counted as the source's failure)."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise _local_fault(exc, cache_root) from None


class RelayFailed(Exception):
    """The claim was not relayed: `code` as in `RelayRefused` (`transport`: none answered)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class FetchedEpochs:
    """A checked copy of one source's published epochs."""

    path: Path
    source: str
    epochs: int
    fetched: list[str] = field(default_factory=list)
    """Files downloaded this time (the rest were already cached, byte for byte)."""
    stale: str | None = None
    """Set when no source answered and this is the copy cached earlier: why."""


def is_http(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def source_key(source: str) -> str:
    """The cache folder name of a source: its peer id, or its HTTP host and port."""
    if is_http(source):
        netloc = urllib.parse.urlsplit(source).netloc
        return "http-" + re.sub(r"[^A-Za-z0-9.-]", "_", netloc)[:100]
    peer = source.rstrip("/").rsplit("/p2p/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9]", "_", peer)[:128]


# --- sources ----------------------------------------------------------------------------------
class _P2PSource:
    """One `/sogni/epochs/1.0.0` stream to a coordinator, requests one after another."""

    def __init__(self, host: Host, addr: str, timeout: float, file_timeout: float) -> None:
        self.host, self.addr = host, addr
        self.timeout, self.file_timeout = timeout, file_timeout
        self._channel: Channel | None = None

    async def _open(self) -> Channel:
        if self._channel is None:
            self._channel = await self.host.open_channel(
                self.addr, ids.EPOCHS_PROTOCOL, timeout=self.timeout
            )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _ask(self, request: EpochIndexRequest | EpochFileRequest) -> Any:
        channel = await self._open()
        await channel.send_raw(encode(request), timeout=self.timeout)
        return await self._answer(channel)

    async def _answer(self, channel: Channel) -> Any:
        payload = await channel.receive_raw(limit=ids.EPOCHS_FRAME_LIMIT, timeout=self.timeout)
        message = decode(payload)
        if isinstance(message, EpochRefused):
            raise EpochFetchError(f"{self.addr} refused: {message.code}: {message.reason}")
        return message

    async def index(self, after: int) -> EpochIndex:
        answer = await self._ask(EpochIndexRequest(after=after))
        if not isinstance(answer, EpochIndex):
            raise ProtocolError(f"expected an epoch index, got {type(answer).__name__}")
        return answer

    async def file(self, name: str, limit: int) -> bytes:
        start = await self._ask(EpochFileRequest(name=name))
        if not isinstance(start, EpochFileStart) or start.name != name:
            raise ProtocolError(f"expected the start of {name}, got {type(start).__name__}")
        if start.size > limit:
            await self._drop()
            raise EpochFetchError(f"{name} is {start.size} bytes, over the limit of {limit}")
        channel = await self._open()
        data = bytearray()
        try:
            with trio.fail_after(self.file_timeout):
                while len(data) < start.size:
                    chunk = await self._answer(channel)
                    if not isinstance(chunk, EpochFileChunk):
                        raise ProtocolError(f"expected a chunk of {name}")
                    data += chunk.data
                    if len(data) > start.size:
                        await self._drop()
                        raise EpochFetchError(
                            f"{name}: more bytes than the {start.size} announced (cut off)"
                        )
        except trio.TooSlowError:
            await self._drop()
            raise EpochFetchError(f"{name} not received within {self.file_timeout}s") from None
        if content_hash(bytes(data)) != start.digest:
            raise EpochFetchError(f"{name} arrived damaged (its hash is not the one announced)")
        return bytes(data)

    async def _drop(self) -> None:
        if self._channel is not None:
            await self._channel.reset()
            self._channel = None


class _HttpSource:
    """A coordinator's HTTP listener; each request runs in a worker thread (urllib)."""

    def __init__(self, base: str, timeout: float, file_timeout: float) -> None:
        self.base = base.rstrip("/")
        self.timeout, self.file_timeout = timeout, file_timeout

    async def close(self) -> None:
        pass

    async def _get(self, path: str, limit: int, deadline: float) -> bytes:
        url = self.base + path

        def get() -> bytes:
            return _http_request(url, None, limit, self.timeout)

        try:
            with trio.fail_after(deadline):
                return await trio.to_thread.run_sync(get, abandon_on_cancel=True)  # type: ignore[call-arg]
        except trio.TooSlowError:
            raise EpochFetchError(f"{url}: no answer within {deadline}s") from None

    async def index(self, after: int) -> EpochIndex:
        raw = await self._get(f"/epochs?after={after}", ids.EPOCHS_FRAME_LIMIT, self.timeout)
        try:
            page = msgspec.json.decode(raw, type=_HttpIndex)
        except DECODE_ERRORS as exc:
            raise ProtocolError(f"{self.base}/epochs: not an epoch index: {exc}") from None
        return EpochIndex(epochs=page.epochs, more=page.more)

    async def file(self, name: str, limit: int) -> bytes:
        return await self._get(f"/epochs/{name}", limit, self.file_timeout)


class _HttpIndex(msgspec.Struct, forbid_unknown_fields=True):
    epochs: list[EpochSummary]
    more: bool = False


def _http_request(url: str, body: bytes | None, limit: int, timeout: float) -> bytes:
    """GET (or POST `body` as JSON) `url`; at most `limit` bytes of answer, else cut off."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST" if body is not None else "GET",
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise EpochFetchError(f"{url}: answer of {declared} bytes, over {limit}")
            data = bytes(response.read(limit + 1))
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read(4096))
        raise _HttpRefused(exc.code, detail.get("error", ""), detail.get("reason", "")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"{url}: {reason}") from None
    if len(data) > limit:
        raise EpochFetchError(f"{url}: answer over {limit} bytes (cut off)")
    return data


class _HttpRefused(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(f"HTTP {status} {code}: {reason}".strip())
        self.status, self.code, self.reason = status, code, reason


def _error_detail(body: bytes) -> dict[str, str]:
    try:
        check_depth(body)  # an untyped decode of deep nesting crashes, not raises
        value = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: str(v)[:500] for k, v in value.items() if k in ("error", "reason")}


_Source = _P2PSource | _HttpSource


# --- fetch -----------------------------------------------------------------------------------
async def fetch_epochs(
    sources: Sequence[str],
    cache_root: Path,
    *,
    timeout: float = READ_TIMEOUT,
    file_timeout: float = FILE_TIMEOUT,
    file_limit: int = ids.EPOCH_FILE_LIMIT,
) -> FetchedEpochs:
    """Bring the first answering source's epochs into `cache_root/<source>`, checked.

    `EpochsRejected` when a source's files fail the check; `EpochFetchError` when no source
    answers and none has a checked copy cached.
    """
    if not sources:
        raise EpochFetchError("no source of published epochs")
    failures: list[str] = []
    outcome: FetchedEpochs | BaseException | None = None

    async def attempt(src: _Source, source: str) -> FetchedEpochs:
        try:
            return await _sync(src, source, Path(cache_root), file_limit)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await src.close()

    async def run_all(host: Host | None) -> FetchedEpochs | None:
        for source in sources:
            src: _Source
            if is_http(source):
                src = _HttpSource(source, timeout, file_timeout)
            else:
                assert host is not None
                src = _P2PSource(host, source, timeout, file_timeout)
            try:
                return await attempt(src, source)
            except (EpochsRejected, EpochCacheError):  # the next source would fare no better
                raise
            except _HttpRefused as exc:
                failures.append(f"{source}: {exc}")
            except (EpochFetchError, ProtocolError, ConnectionError, OSError) as exc:
                failures.append(f"{source}: {exc}")
            except Exception as exc:  # sogni_net.TransportError and its family
                if type(exc).__module__.startswith("sogni_net"):
                    failures.append(f"{source}: {exc}")
                else:
                    raise
        return None

    if all(is_http(s) for s in sources):
        outcome = await run_all(None)
    else:
        from sogni_net import open_host

        async with open_host(key_path=None, listen=()) as host:
            try:  # leave the host's nursery with a plain exception, not a group
                outcome = await run_all(host)
            except (EpochFetchError, EpochCacheError, ProtocolError) as exc:
                outcome = exc
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome is not None:
        return outcome
    why = "; ".join(failures) or "no source answered"
    for source in sources:  # the last checked copy, if any
        cached = Path(cache_root) / source_key(source)
        if any(cached.glob("epoch-*.json")):
            count = len([p for p in cached.glob("epoch-*.json") if ".tree." not in p.name])
            return FetchedEpochs(cached, source, count, stale=why)
    raise EpochFetchError(f"cannot fetch published epochs: {why}")


async def _sync(src: _Source, source: str, cache_root: Path, limit: int) -> FetchedEpochs:
    entries = await _full_index(src, source)
    dest = cache_root / source_key(source)
    staging = await _locally(cache_root, _fresh_dir, cache_root, source_key(source))
    fetched: list[str] = []

    async def place(name: str, digest: bytes | None, *, reuse: bool = False) -> bool:
        """Put `name` into staging: the cached copy when it is the same, else downloaded.
        `digest` None: reuse the cached copy when `reuse` (the audit checks it anyway)."""
        cached = dest / name
        same = (
            await trio.to_thread.run_sync(_has_digest, cached, digest)
            if digest is not None
            else reuse and cached.is_file()
        )
        if same:
            await _locally(cache_root, _link, cached, staging / name)
            return True
        data = await src.file(name, limit)
        if digest is not None and content_hash(data) != digest:
            problem = (
                f"{name} does not hash to its name"
                if name.startswith("receipts/")
                else f"{name} is not the file the index describes (its hash differs)"
            )
            raise EpochsRejected(f"epochs from {source} are refused: {problem}")
        await _locally(cache_root, _write, staging / name, data)
        fetched.append(name)
        return False

    try:
        for e in entries:
            kept = await place(e.file, _hex32(e.digest))
            await place(e.receipts_file, _hex32(e.receipts_hash))
            if e.tree_file is not None:  # the tree of the leaves: the same when the file is
                await place(e.tree_file, None, reuse=kept)
        if entries:
            from sogni_protocol.epoch_audit import PublishedFolderError, audit_folder

            try:
                report = await trio.to_thread.run_sync(audit_folder, staging)
            except PublishedFolderError as exc:
                raise EpochsRejected(f"epochs from {source} are refused: {exc}") from None
            if not report.ok:
                raise EpochsRejected(f"epochs from {source} fail the check: {report.first_problem}")
        await _locally(cache_root, _swap, staging, dest)
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, staging, True)
    return FetchedEpochs(dest, source, len(entries), fetched)


async def _full_index(src: _Source, source: str) -> list[EpochSummary]:
    entries: list[EpochSummary] = []
    after = 0
    for _ in range(MAX_INDEX_PAGES):
        page = await src.index(after)
        for e in page.epochs:
            problem = _entry_problem(e, after)
            if problem is not None:
                raise EpochsRejected(f"the epoch index of {source} is refused: {problem}")
            entries.append(e)
            after = e.epoch
        if not page.more or not page.epochs:
            return entries
    raise EpochFetchError(f"{source}: the epoch index does not end")


def _entry_problem(e: EpochSummary, after: int) -> str | None:
    """Why an index entry names files other than the ones its epoch and hashes give."""
    if e.epoch != after + 1:  # a gap, or epoch 10^11 alone: the audit would walk to it
        return f"epoch {e.epoch} listed after epoch {after} (epochs run 1, 2, 3, ... in order)"
    file_name, tree_name = epoch_file_names(e.epoch)
    receipts = evidence_filename(e.receipts_file, _hex32(e.receipts_hash))
    for name in (e.file, e.receipts_file, e.tree_file):
        if name is not None:
            try:
                check_file_name(name)
            except ValueError as exc:
                return str(exc)
    if e.file != file_name or e.receipts_file != receipts or e.tree_file not in (None, tree_name):
        return f"epoch {e.epoch} names files {e.file}, {e.receipts_file}, {e.tree_file}"
    return None


# --- files (blocking, in worker threads) ------------------------------------------------------
def _hex32(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


def _fresh_dir(cache_root: Path, key: str) -> Path:
    """A new staging folder of its own (two runs at once do not share one)."""
    cache_root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=cache_root))
    (path / "receipts").mkdir()
    return path


def _has_digest(path: Path, digest: bytes) -> bool:
    try:
        return path.is_file() and content_hash(path.read_bytes()) == digest
    except OSError:
        return False


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)  # airdrops/season-N/
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # airdrops/season-N/
    with open(path, "xb") as f:
        f.write(data)


def _swap(staging: Path, dest: Path) -> None:
    """Replace `dest` with `staging` (a crash in between leaves `dest.old`, reused next time)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# --- relay -----------------------------------------------------------------------------------
async def relay_claim(
    sources: Sequence[str], claim: RelayClaim, *, timeout: float = RELAY_TIMEOUT
) -> tuple[str, RelayDone]:
    """Have the first coordinator that answers submit `claim`: (its source, the result).

    A refusal that is about the claim (bad proof, nothing to claim, ...) ends the attempt;
    one that is about the coordinator (no chain, out of gas money, busy, its minimum) or a
    network failure moves on to the next source. `RelayFailed` when none relayed it.
    """
    if not sources:
        raise RelayFailed("transport", "no coordinator to relay the claim")
    failures: list[str] = []
    codes: list[str] = []  # of the coordinators' refusals, for the one error at the end
    outcome: tuple[str, RelayDone] | RelayFailed | None = None

    async def one(source: str, host: Host | None) -> RelayDone:
        if is_http(source):
            return await _relay_http(source, claim, timeout)
        assert host is not None
        return await _relay_p2p(host, source, claim, timeout)

    async def run_all(host: Host | None) -> tuple[str, RelayDone] | None:
        for source in sources:
            try:
                return source, await one(source, host)
            except RelayFailed as exc:
                if exc.code not in _TRY_NEXT:
                    raise
                codes.append(exc.code)
                failures.append(f"{source}: {exc.code}: {exc.reason}")
            except Exception as exc:
                if not _is_transport(exc):
                    raise
                failures.append(f"{source}: {exc}")
        return None

    if all(is_http(s) for s in sources):
        outcome = await run_all(None)
    else:
        from sogni_net import open_host

        async with open_host(key_path=None, listen=()) as host:
            try:
                outcome = await run_all(host)
            except RelayFailed as exc:
                outcome = exc
    if isinstance(outcome, RelayFailed):
        raise outcome
    if outcome is None:  # the code every coordinator gave, if they agree (below_minimum...)
        code = codes[0] if len(set(codes)) == 1 and len(codes) == len(failures) else "transport"
        raise RelayFailed(code, "no coordinator relayed the claim: " + "; ".join(failures))
    return outcome


_TRY_NEXT = frozenset(
    {
        "no_chain",
        "relayer_unfunded",
        "busy",
        "unavailable",
        "bad_request",
        "transport",
        "below_minimum",  # another coordinator may relay smaller claims
    }
)


def _is_transport(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError | OSError | ProtocolError | trio.TooSlowError) or (
        type(exc).__module__.startswith("sogni_net")
    )


async def _relay_p2p(host: Host, addr: str, claim: RelayClaim, timeout: float) -> RelayDone:
    channel = await host.open_channel(addr, ids.RELAY_PROTOCOL, timeout=min(timeout, 15.0))
    async with channel:
        await channel.send_raw(encode(claim), limit=ids.RELAY_FRAME_LIMIT, timeout=15.0)
        answer = decode(await channel.receive_raw(limit=ids.RELAY_FRAME_LIMIT, timeout=timeout))
    if isinstance(answer, RelayRefused):
        raise RelayFailed(answer.code, answer.reason)
    if not isinstance(answer, RelayDone):
        raise ProtocolError(f"expected the relay's answer, got {type(answer).__name__}")
    return answer


async def _relay_http(base: str, claim: RelayClaim, timeout: float) -> RelayDone:
    body = json.dumps(
        {
            "account": claim.account,
            "cumulativeAmount": claim.cumulative_amount,
            "proof": ["0x" + p.hex() for p in claim.proof],
            "stakeBps": claim.stake_bps,
            "deadline": claim.deadline,
            "signature": "0x" + claim.signature.hex(),
        }
    ).encode()
    url = base.rstrip("/") + "/relay/claim"

    def post() -> bytes:
        return _http_request(url, body, ids.RELAY_FRAME_LIMIT, timeout)

    try:
        with trio.fail_after(timeout):
            raw = await trio.to_thread.run_sync(post, abandon_on_cancel=True)  # type: ignore[call-arg]
    except _HttpRefused as exc:
        raise RelayFailed(exc.code or f"http_{exc.status}", exc.reason or str(exc)) from None
    try:
        answer = json.loads(raw)
        return RelayDone(
            tx_hash=_hex32(answer["txHash"]),
            account=answer["account"],
            epoch=int(answer["epoch"]),
            amount=str(answer["amount"]),
            staked=str(answer.get("staked", "0")),
            paid=str(answer.get("paid", "0")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"{url}: not a relay answer: {exc}") from None
