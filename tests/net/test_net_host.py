"""Host level: ping, dialing, bootstrap, listen addresses, and GossipSub between hosts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from sogni_net import DialError, TransportError, open_host
from sogni_protocol.messages import Heartbeat

if TYPE_CHECKING:
    from sogni_net import Host
    from tests.net.conftest import Server

TOPIC = "sogni/capabilities/1"


async def test_ping_returns_a_positive_rtt(server: Server, client: Host) -> None:
    with trio.fail_after(10):
        first = await client.ping(server.host.addrs[0])  # dials
        second = await client.ping(server.host.peer_id)  # connected: a bare peer id will do
    assert 0 < first < 5
    assert 0 < second < 5


async def test_dial_failures_raise_dial_error(client: Host) -> None:
    with trio.fail_after(10):
        with pytest.raises(DialError, match="/p2p/"):
            await client.open_channel("/ip4/127.0.0.1/tcp/1", "/x/1")
        async with open_host(key_path=None) as other:
            addr = other.addrs[0]
            with pytest.raises(DialError):  # the peer does not speak the protocol
                await client.open_channel(addr, "/nobody/speaks/this/1")
        with pytest.raises(DialError):  # the peer is gone
            await client.open_channel(addr, "/x/1", timeout=3)


async def test_bootstrap_dials_and_tolerates_dead_peers(server: Server) -> None:
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQRsbaLxMeVRyceWUZDKMoxoqgRAtsN7WYpSJRm3sC3ne"
    with trio.fail_after(15):
        async with open_host(key_path=None, bootstrap=[dead, server.host.addrs[0]]) as host:
            assert host.connected_peers() == [server.host.peer_id]


async def _wait_for_topic_peer(host: Host, topic: str, peer_id: str) -> None:
    """Poll until `peer_id` is in `host`'s mesh (the caller's fail_after bounds the wait)."""
    while peer_id not in host.mesh_peers(topic):
        await trio.sleep(0.01)
    assert peer_id in host.topic_peers(topic)


async def test_gossip_reaches_a_subscriber_on_another_host() -> None:
    with trio.fail_after(15):
        async with (
            open_host(key_path=None, pubsub_topics=[TOPIC]) as publisher,
            open_host(
                key_path=None, bootstrap=[publisher.addrs[0]], pubsub_topics=[TOPIC]
            ) as subscriber,
            subscriber.subscribe(TOPIC) as messages,
        ):
            await _wait_for_topic_peer(publisher, TOPIC, subscriber.peer_id)
            await publisher.publish(TOPIC, b"advert-1")
            sender, data = await anext(messages)
    assert (sender, data) == (publisher.peer_id, b"advert-1")


async def test_validator_drops_rejected_gossip() -> None:
    with trio.fail_after(15):
        async with (
            open_host(key_path=None, pubsub_topics=[TOPIC]) as publisher,
            open_host(
                key_path=None, bootstrap=[publisher.addrs[0]], pubsub_topics=[TOPIC]
            ) as subscriber,
        ):
            subscriber.set_topic_validator(TOPIC, lambda peer, data: data.startswith(b"ok"))
            async with subscriber.subscribe(TOPIC) as messages:
                await _wait_for_topic_peer(publisher, TOPIC, subscriber.peer_id)
                await publisher.publish(TOPIC, b"spam")
                await publisher.publish(TOPIC, b"ok-2")
                assert await anext(messages) == (publisher.peer_id, b"ok-2")


async def test_publish_checks_topic_and_size() -> None:
    async with open_host(key_path=None, pubsub_topics=[TOPIC]) as host:
        with pytest.raises(ValueError, match="not one of"):
            await host.publish("other/topic", b"x")
        with pytest.raises(ValueError, match="exceeds"):
            await host.publish(TOPIC, b"x" * (64 * 1024 + 1))
        with pytest.raises(ValueError, match="not one of"):
            host.subscribe("other/topic")


async def test_fixed_port_already_in_use_is_refused() -> None:
    """py-libp2p listens with SO_REUSEPORT; we must not silently share a port."""
    async with open_host(key_path=None) as first:
        port = first.addrs[0].split("/tcp/")[1].split("/")[0]
        with pytest.raises(TransportError, match="in use"):
            async with open_host(key_path=None, listen=[f"/ip4/127.0.0.1/tcp/{port}"]):
                pass


async def test_listen_addresses_other_than_tcp_are_refused() -> None:
    for addr in ("/ip4/127.0.0.1/tcp/0/ws", "/ip4/127.0.0.1/udp/0/quic-v1"):
        with pytest.raises(ValueError, match="listen address"):
            async with open_host(key_path=None, listen=[addr]):
                pass


async def test_shutdown_ends_subscriptions() -> None:
    ended = trio.Event()

    async def consume(messages) -> None:  # type: ignore[no-untyped-def]
        async for _ in messages:
            pass
        ended.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_host(key_path=None, pubsub_topics=[TOPIC]) as host:
                subscription = host.subscribe(TOPIC)
                messages = await subscription.__aenter__()
                nursery.start_soon(consume, messages)
                await trio.testing.wait_all_tasks_blocked()
            await ended.wait()
            await subscription.__aexit__(None, None, None)


async def test_a_burst_of_gossip_is_not_dropped() -> None:
    """py-libp2p drops RPCs beyond 32 queued per peer; publish() applies back-pressure."""
    count = 100
    with trio.fail_after(20):
        async with (
            open_host(key_path=None, pubsub_topics=[TOPIC]) as publisher,
            open_host(
                key_path=None, bootstrap=[publisher.addrs[0]], pubsub_topics=[TOPIC]
            ) as subscriber,
            subscriber.subscribe(TOPIC) as messages,
        ):
            await _wait_for_topic_peer(publisher, TOPIC, subscriber.peer_id)
            for index in range(count):
                await publisher.publish(TOPIC, index.to_bytes(4, "big"))
            received = [int.from_bytes((await anext(messages))[1], "big") for _ in range(count)]
    assert sorted(received) == list(range(count))


async def test_a_host_that_does_not_listen_can_still_dial(server: Server) -> None:
    with trio.fail_after(10):
        async with open_host(key_path=None, listen=()) as client:
            assert client.addrs == []
            async with await client.open_channel(server.host.addrs[0], server.ECHO) as channel:
                await channel.send(Heartbeat(seq=3))
                assert await channel.receive(timeout=5) == Heartbeat(seq=3)
