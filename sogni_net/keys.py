"""The node key: the Ed25519 key whose hash is the libp2p peer id.

The peer id is what coordinators bind to a wallet (the signed capability advert), so it must
survive restarts: the key is created once, written atomically with mode 0600, and reloaded.
The file holds the libp2p protobuf encoding of the private key (the format go-libp2p and
py-libp2p's own `save_identity` use), so it can be inspected with standard libp2p tools.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from sogni_protocol.atomic import FileExists, atomic_write_bytes

_log = logging.getLogger("sogni_net.keys")


@dataclass(frozen=True, eq=False)
class NodeKey:
    """An Ed25519 libp2p identity; opaque outside `sogni_net` apart from its peer id."""

    key_pair: KeyPair

    @property
    def peer_id(self) -> str:
        """Base58 peer id (`12D3KooW...`), as peers see it after the Noise handshake."""
        return ID.from_pubkey(self.key_pair.public_key).to_base58()

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random identity (tests, clients that need no stable peer id)."""
        return cls(create_new_key_pair())


def load_or_create_node_key(path: Path) -> NodeKey:
    """Load the node key at `path`, creating it (mode 0600) if it does not exist.

    Creation is atomic (temp file + hard link), so two processes starting at once end up
    with the same key instead of one overwriting the other. A file readable by others is
    tightened to 0600 with a warning rather than refused, so an upgrade does not brick a node.
    """
    path = Path(path)
    if not path.exists():
        _create(path, create_new_key_pair())
    return NodeKey(_load(path))


class NodeKeyError(ValueError):
    """The node key file is not an Ed25519 libp2p key (damaged, or another kind of file)."""


def _load(path: Path) -> KeyPair:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name != "nt" and mode & 0o077:
        _log.warning("node key %s had mode %o; tightening to 0600", path, mode)
        path.chmod(0o600)
    try:
        private_key = deserialize_private_key(path.read_bytes())
    except Exception as exc:
        raise NodeKeyError(f"{path} is not a libp2p private key: {exc}") from None
    if private_key.get_type() != KeyType.Ed25519:
        raise NodeKeyError(f"{path} holds a {private_key.get_type().name} key, not Ed25519")
    return KeyPair(private_key, private_key.get_public_key())


def _create(path: Path, key_pair: KeyPair) -> None:
    # replace=False: if `path` appeared meanwhile, the other writer's key wins.
    with contextlib.suppress(FileExists):
        atomic_write_bytes(path, key_pair.private_key.serialize(), mode=0o600, replace=False)
