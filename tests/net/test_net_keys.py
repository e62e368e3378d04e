"""The node key file: created once with mode 0600, same peer id on every start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from sogni_net import load_or_create_node_key, open_host


def test_key_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = load_or_create_node_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.peer_id.startswith("12D3KooW")  # Ed25519 identity peer id
    again = load_or_create_node_key(path)
    assert again.peer_id == first.peer_id
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    peer_id = load_or_create_node_key(path).peer_id
    os.chmod(path, 0o644)
    assert load_or_create_node_key(path).peer_id == peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="not a libp2p private key"):
        load_or_create_node_key(path)


async def test_host_keeps_its_peer_id_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    with trio.fail_after(15):
        async with open_host(key_path=path) as host:
            first = host.peer_id
            assert all(addr.endswith(f"/p2p/{first}") for addr in host.addrs)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with open_host(key_path=path) as host:
            assert host.peer_id == first
        async with open_host(key_path=None) as host:
            assert host.peer_id != first
