"""Coordinator keys this node trusts because a trusted key handed over to them, or because
its network's operator listed them (`NetworkSigners`, at the end).

Why persisted: a coordinator rotates its offer key by a chain of `KeyRotation` links, each
signed by the key it replaces (`sogni_protocol.rotation_chain`). Once a node has checked the
chain, it keeps the new key here (`coordinator_keys.json` in `data_dir`, mode 0600), so it
still trusts the key after a restart, and logs `coordinator_key_rotated`.

Each entry names the configured key (`trusted_coordinators`) it derives from, its `root`: an
entry whose root is no longer configured is ignored, so removing a key from
`trusted_coordinators` also drops every key trusted through it.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec

from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.eip712 import Domain
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import Address
from sogni_protocol.signer_set import (
    MAX_FILE_BYTES as MAX_SET_BYTES,
)
from sogni_protocol.signer_set import (
    SignedSignerSet,
    SignerSetError,
    check_signer_set,
    decode_signer_set,
    encode_signer_set,
    replaces,
)

__all__ = ["TRUST_FILE", "NetworkSigners", "RotatedKey", "TrustFileError", "TrustedKeys"]

log = get_logger(__name__)

SIGNER_SET_PATH = "/v1/network/signers"
"""Where a coordinator's HTTP listener serves its network's signer set."""

TRUST_FILE = "coordinator_keys.json"
MAX_KEYS = 256
"""Entries kept (the oldest go first): far above any real rotation history."""
MAX_FILE_BYTES = 1 << 20

_lock = threading.Lock()
"""One read-modify-write at a time: sessions to several coordinators run side by side."""


class TrustFileError(Exception):
    """The trust file is unreadable (the node then trusts its configured keys only)."""


class RotatedKey(msgspec.Struct, kw_only=True, rename="camel"):
    key: Address
    handed_over_by: Address
    """The key that signed the rotation to `key`."""
    root: Address
    """The configured trusted key this one derives from."""
    trusted_at: float


class _File(msgspec.Struct, kw_only=True):
    version: int = 1
    keys: list[RotatedKey] = []


class TrustedKeys:
    """The persisted rotated keys of one node (`data_dir/coordinator_keys.json`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_dir(cls, data_dir: Path) -> TrustedKeys:
        return cls(Path(data_dir) / TRUST_FILE)

    def _read(self) -> list[RotatedKey]:
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise TrustFileError(f"{self.path} is larger than {MAX_FILE_BYTES} bytes")
            return msgspec.json.decode(self.path.read_bytes(), type=_File).keys
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError) as exc:
            raise TrustFileError(f"cannot read {self.path}: {exc}") from None

    def load(self, configured: Collection[str]) -> dict[str, str]:
        """Rotated keys still trusted: lower-case key -> lower-case root, for entries whose
        root is in `configured` (lower-case)."""
        with _lock:
            entries = self._read()
        return {e.key.lower(): e.root.lower() for e in entries if e.root.lower() in configured}

    def add(
        self, links: Sequence[tuple[str, str]], configured: Collection[str]
    ) -> list[RotatedKey]:
        """Trust the new key of each (old, new) link, in order, each deriving from the root
        of its old key (a configured key is its own root). Returns the entries added; a
        link whose old key is not trusted (now, or by an earlier link) is skipped."""
        added: list[RotatedKey] = []
        with _lock:
            entries = self._read()
            roots = {e.key.lower(): e.root for e in entries if e.root.lower() in configured}
            for old, new in links:
                root = old if old.lower() in configured else roots.get(old.lower())
                if root is None or new.lower() in configured or new.lower() in roots:
                    continue
                entry = RotatedKey(key=new, handed_over_by=old, root=root, trusted_at=time.time())
                added.append(entry)
                roots[new.lower()] = root
            if added:
                keep = [e for e in entries if e.key.lower() not in {a.key.lower() for a in added}]
                data = msgspec.json.encode(_File(keys=[*keep, *added][-MAX_KEYS:]))
                atomic_write_bytes(self.path, data + b"\n", mode=0o600)
        return added


class NetworkSigners:
    """The network signer set this node holds (`sogni_protocol.signer_set`).

    Why kept: the set with the highest serial the node ever accepted is written to
    `data_dir/network_signers.json`, so a replayed older set (an old file put back, a
    coordinator serving a stale copy) cannot bring back a key the operator removed. Every
    candidate is checked against the configured operators, network and domain; a refused one
    is logged (one line) and changes nothing.
    """

    def __init__(
        self,
        held_path: Path,
        domain: Domain,
        operators: Sequence[str],
        network_id: str,
        source: Path | None = None,
    ) -> None:
        self.held_path = Path(held_path)
        self.domain = domain
        self.operators = list(operators)
        self.network_id = network_id
        self.source = Path(source).expanduser() if source is not None else None

    def _held(self) -> SignedSignerSet | None:
        """The kept set, checked again (the configured operators may have changed)."""
        try:
            held = decode_signer_set(self.held_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, SignerSetError) as exc:
            log.error("signer_set_unreadable", path=str(self.held_path), error=str(exc))
            return None
        fault = check_signer_set(self.domain, held, self.operators, self.network_id)
        if fault is not None:
            log.warning("signer_set_dropped", reason=fault)
            return None
        return held

    def offer(self, data: bytes, origin: str) -> SignedSignerSet | None:
        """Take a candidate set's bytes from `origin` (a file, a coordinator): kept if it is
        valid and newer than the held one. Returns the set now held (None: none)."""
        try:
            candidate = decode_signer_set(data)
        except SignerSetError as exc:
            log.error("signer_set_refused", origin=origin, reason=str(exc))
            with _lock:
                return self._held()
        return self.take(candidate, origin)

    def take(self, candidate: SignedSignerSet, origin: str) -> SignedSignerSet | None:
        """`offer` for a decoded set (a coordinator's `Welcome` carries one): checked, kept
        if newer; a refused or older one is one log line. Returns the set now held."""
        with _lock:
            held = self._held()
            fault = check_signer_set(self.domain, candidate, self.operators, self.network_id)
            if fault is not None:
                log.error("signer_set_refused", origin=origin, reason=fault)
                return held
            if replaces(held, candidate):
                atomic_write_bytes(self.held_path, encode_signer_set(candidate), mode=0o600)
                log.info(
                    "signer_set_accepted",
                    origin=origin,
                    network=candidate.set.network_id,
                    serial=candidate.set.serial,
                    signers=len(candidate.set.signers),
                )
                return candidate
            if held is not None and candidate.set.serial < held.set.serial:
                log.warning(
                    "signer_set_outdated",
                    origin=origin,
                    serial=candidate.set.serial,
                    held=held.set.serial,
                )
            return held

    def current(self) -> frozenset[str]:
        """Lower-case signer addresses of the held set, after reading `source` (blocking:
        call it off the trio thread). Empty without operators or a valid set."""
        if not self.operators:
            return frozenset()
        held: SignedSignerSet | None
        if self.source is not None:
            try:
                with self.source.open("rb") as f:  # never more than the limit in memory
                    data = f.read(MAX_SET_BYTES + 1)
            except OSError as exc:
                log.error("signer_set_unreadable", path=str(self.source), error=type(exc).__name__)
                with _lock:
                    held = self._held()
            else:
                held = self.offer(data, str(self.source))
        else:
            with _lock:
                held = self._held()
        return frozenset(s.lower() for s in held.set.signers) if held is not None else frozenset()

    def fetch(self, base_url: str, timeout: float = 10.0) -> SignedSignerSet | None:
        """GET `<base_url>/v1/network/signers` (a coordinator's HTTP listener) and `offer` it
        (blocking: call it off the trio thread). A failure is one log line; returns the set
        now held."""
        url = base_url.rstrip("/") + SIGNER_SET_PATH
        try:
            data = _get(url, timeout)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError: OSError
            log.warning("signer_set_not_fetched", url=url, error=type(exc).__name__)
            with _lock:
                return self._held()
        return self.offer(data, url)


def _get(url: str, timeout: float) -> bytes:
    """The body of `url`, at most `MAX_SET_BYTES + 1` bytes, within `timeout` seconds in all:
    urllib's timeout bounds each socket operation only, so a server trickling its answer a
    byte at a time would hold the thread (and the daemon's shutdown) for as long as it liked.
    Raises `TimeoutError`, urllib's errors and `http.client.HTTPException` (a malformed
    status line, a broken chunk)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while len(out) <= MAX_SET_BYTES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no whole answer within {timeout:g} s")
            chunk = response.read1(MAX_SET_BYTES + 1 - len(out))
            if not chunk:
                break
            out += chunk
    return bytes(out)
