"""Our hosts speak Noise only: a plaintext (or any non-Noise) dialer gets no connection."""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux

from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from sogni_net import Host
    from tests.net.conftest import Server


async def test_plaintext_dialer_is_refused(server: Server, client: Host) -> None:
    key_pair = create_new_key_pair()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    plaintext = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    plaintext.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
    target = info_from_p2p_addr(multiaddr.Multiaddr(server.host.addrs[0]))
    with trio.fail_after(15):
        async with plaintext.run(listen):
            with pytest.raises(SwarmException) as refused:
                await plaintext.connect(target)
            chain = "".join(traceback.format_exception(refused.value))
            assert "failed to negotiate the secure protocol" in chain
            assert plaintext.get_connected_peers() == []
            await plaintext.close()
        assert plaintext.get_id().to_base58() not in server.host.connected_peers()

        # The refused dial left the host healthy: a Noise peer is served as usual.
        async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
            await channel.send(Heartbeat(seq=1))
            assert await channel.receive(timeout=5) == Heartbeat(seq=1)
