"""Coordinator keys this node trusts because a trusted key handed over to them.

Why persisted: a coordinator rotates its offer key by a chain of `KeyRotation` links, each
signed by the key it replaces (`sogni_protocol.rotation_chain`). Once a node has checked the
chain, it keeps the new key here (`coordinator_keys.json` in `data_dir`, mode 0600), so it
still trusts the key after a restart, and logs `coordinator_key_rotated`.

Each entry names the configured key (`trusted_coordinators`) it derives from, its `root`: an
entry whose root is no longer configured is ignored, so removing a key from
`trusted_coordinators` also drops every key trusted through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec

from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.messages import Address

__all__ = ["TRUST_FILE", "RotatedKey", "TrustFileError", "TrustedKeys"]

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
