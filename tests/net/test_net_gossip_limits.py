"""What one gossip RPC and one gossip peer can cost a host is bounded.

With py-libp2p 0.8.1 alone, one 1 MiB pubsub RPC of ~6,600 tiny messages with junk signatures
froze the host's event loop for ~25 s (a service task per message, each spawn walking every
task), its sender was never penalised, and it could replay the RPC at will.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.utils.varint import encode_uvarint

from sogni_net import open_host

TOPIC = "sogni-test/gossip/1"
MESHSUB = "/meshsub/1.1.0"


def _frame(rpc: rpc_pb2.RPC) -> bytes:
    body = rpc.SerializeToString()
    return encode_uvarint(len(body)) + body


def _message(key: Any, seqno: int, *, signed: bool) -> rpc_pb2.Message:
    msg = rpc_pb2.Message(
        from_id=ID.from_pubkey(key.public_key).to_bytes(),
        data=b"x" * 16,
        seqno=seqno.to_bytes(8, "big"),
        topicIDs=[TOPIC],
    )
    if signed:
        msg.signature = key.private_key.sign(
            PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
        )
    else:
        msg.signature = b"\x01" * 64
    return msg


def _junk_batch(size: int = (1 << 20) - 64) -> tuple[bytes, int]:
    """One pubsub RPC of about `size` bytes, all tiny messages with junk signatures."""
    key = create_new_key_pair()
    one = _message(key, 0, signed=False).ByteSize() + 3  # field tag and length
    count = size // one
    rpc = rpc_pb2.RPC(publish=[_message(key, i, signed=False) for i in range(count)])
    return _frame(rpc), count


async def _max_lag(done: trio.Event, lags: list[float]) -> None:
    """Sleep 50 ms at a time until `done`; record how late each wake-up was."""
    while not done.is_set():
        before = trio.current_time()
        await trio.sleep(0.05)
        lags.append(trio.current_time() - before - 0.05)


async def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_megabyte_of_badly_signed_gossip_costs_little_and_drops_its_sender() -> None:
    frame, count = _junk_batch()
    assert count > 6_000 and len(frame) <= 1 << 20
    async with (
        open_host(key_path=None, pubsub_topics=[TOPIC]) as server,
        open_host(key_path=None, listen=(), pubsub_topics=[TOPIC]) as hostile,
    ):
        channel = await hostile.open_channel(server.addrs[0], MESHSUB)
        lags: list[float] = []
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_max_lag, done, lags)
            await trio.sleep(0.1)
            with trio.fail_after(15):
                await channel.send_unframed(frame, timeout=15)
                await _wait_until(lambda: server.strikes(hostile.peer_id) >= 1, timeout=15)
                await _wait_until(lambda: hostile.peer_id not in server.connected_peers())
            done.set()
        print(f"max loop lag {max(lags) * 1000:.1f} ms")
        assert max(lags) < 1.0, f"event loop stalled {max(lags):.2f} s"
        assert server.strikes(hostile.peer_id) == 1


async def test_well_signed_gossip_in_bulk_is_capped_not_punished() -> None:
    """Validly signed messages beyond an RPC's cap are dropped; the sender is not penalised
    and the rest is delivered."""
    from sogni_net import gossip

    key = create_new_key_pair()
    total = gossip.MAX_MESSAGES_PER_RPC + 50
    rpc = rpc_pb2.RPC(publish=[_message(key, i, signed=True) for i in range(total)])
    async with (
        open_host(key_path=None, pubsub_topics=[TOPIC]) as server,
        open_host(key_path=None, listen=(), pubsub_topics=[TOPIC]) as sender,
        server.subscribe(TOPIC) as received,
    ):
        channel = await sender.open_channel(server.addrs[0], MESHSUB)
        await channel.send_unframed(_frame(rpc))
        got = 0
        with trio.move_on_after(3):
            async for _origin, data in received:
                assert data == b"x" * 16
                got += 1
                if got == gossip.MAX_MESSAGES_PER_RPC:
                    break
        assert got == gossip.MAX_MESSAGES_PER_RPC
        pubsub: Any = server._pubsub
        await _wait_until(lambda: pubsub.dropped >= 50)
        assert server.strikes(sender.peer_id) == 0
        assert sender.peer_id in server.connected_peers()


async def test_an_iwant_naming_one_message_many_times_gets_it_once() -> None:
    async with (
        open_host(key_path=None, pubsub_topics=[TOPIC]) as server,
        open_host(key_path=None, listen=(), pubsub_topics=[TOPIC]) as asker,
    ):
        await asker.connect(server.addrs[0])
        await server.publish(TOPIC, b"advert")
        router: Any = server._pubsub.router
        pubsub: Any = server._pubsub
        [msg_id] = [mid for mid in router.mcache.msgs]
        sent: list[rpc_pb2.RPC] = []
        router.send_rpc = lambda peer, rpc, priority=False: sent.append(rpc)
        peer = ID.from_base58(asker.peer_id)
        many = rpc_pb2.RPC(
            control=rpc_pb2.ControlMessage(
                iwant=[rpc_pb2.ControlIWant(messageIDs=[msg_id] * 20_000)] * 3
            )
        )
        await router.handle_rpc(many, peer)
        assert [len(rpc.publish) for rpc in sent] == [1]
        for _ in range(5):  # asked again and again: answered a few times, then no more
            router.iwant_request_limits[peer]["requests"].clear()  # py-libp2p's 10/s limit
            again = rpc_pb2.ControlIWant(messageIDs=[msg_id])
            await router.handle_rpc(
                rpc_pb2.RPC(control=rpc_pb2.ControlMessage(iwant=[again])), peer
            )
        assert len(sent) == 3
        assert pubsub.get_message_id(sent[0].publish[0]) == msg_id


async def test_control_messages_for_unknown_topics_are_ignored() -> None:
    async with open_host(key_path=None, pubsub_topics=[TOPIC]) as server:
        router: Any = server._pubsub.router
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        control = rpc_pb2.ControlMessage(
            ihave=[rpc_pb2.ControlIHave(topicID=f"t{i}", messageIDs=[b"m"]) for i in range(500)],
            graft=[rpc_pb2.ControlGraft(topicID=f"t{i}") for i in range(500)],
            prune=[rpc_pb2.ControlPrune(topicID=f"t{i}") for i in range(500)],
        )
        await router.handle_rpc(rpc_pb2.RPC(control=control), peer)
        assert not router.ihave_message_limits.get(peer)
        assert not router.graft_flood_tracking.get(peer)
        assert not any(topic.startswith("t") for topic in router.back_off)


async def test_a_peer_reads_on_at_most_two_pubsub_streams_at_once() -> None:
    """Each stream could hold a 1 MiB RPC in hand: a peer's newest streams push out its
    oldest (py-libp2p opens one per peer, go-libp2p-pubsub keeps one)."""
    from sogni_net import ReadTimeout, gossip

    async with (
        open_host(key_path=None, pubsub_topics=[TOPIC]) as server,
        open_host(key_path=None, listen=()) as peer,
    ):
        channels = []
        for _ in range(4):
            channel = await peer.open_channel(server.addrs[0], MESHSUB)
            await channel.send_unframed(_frame(rpc_pb2.RPC()))  # an empty RPC: harmless
            await trio.sleep(0.1)
            channels.append(channel)
        pubsub: Any = server._pubsub
        assert len(pubsub._reading[ID.from_base58(peer.peer_id)]) == gossip.MAX_STREAMS_PER_PEER
        for channel in channels[:2]:
            assert "reset" in await channel.drain(timeout=5)
        for channel in channels[2:]:
            try:
                await channel.drain(timeout=0.2)
            except ReadTimeout:
                pass  # still open: as it should be
            else:
                raise AssertionError("a stream within the cap was ended")
        assert server.strikes(peer.peer_id) == 0


async def test_a_peer_past_its_message_rate_has_the_excess_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sogni_net import gossip

    monkeypatch.setattr(gossip, "MESSAGE_BURST", 10)
    monkeypatch.setattr(gossip, "MESSAGE_RATE", 0.01)
    key = create_new_key_pair()
    rpc = rpc_pb2.RPC(publish=[_message(key, i, signed=True) for i in range(50)])
    async with (
        open_host(key_path=None, pubsub_topics=[TOPIC]) as server,
        open_host(key_path=None, listen=()) as sender,
        server.subscribe(TOPIC) as received,
    ):
        channel = await sender.open_channel(server.addrs[0], MESHSUB)
        await channel.send_unframed(_frame(rpc))
        pubsub: Any = server._pubsub
        await _wait_until(lambda: pubsub.dropped >= 40)
        got = 0
        with trio.move_on_after(0.5):
            async for _ in received:
                got += 1
        assert got == 10
        assert server.strikes(sender.peer_id) == 0


def test_only_messages_signed_by_the_key_inline_in_their_origin_id_pass() -> None:
    from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair

    from sogni_net.gossip import origin_signed

    key = create_new_key_pair()
    assert origin_signed(_message(key, 1, signed=True))
    assert not origin_signed(_message(key, 1, signed=False))
    unsigned = _message(key, 1, signed=True)
    unsigned.ClearField("signature")
    assert not origin_signed(unsigned)
    tampered = _message(key, 1, signed=True)
    tampered.data = b"y" * 16
    assert not origin_signed(tampered)
    # A hashed peer id (an RSA key, carried in the message): refused before any check.
    rsa = create_rsa_key_pair(2048)
    message = _message(rsa, 1, signed=True)
    message.key = rsa.public_key.serialize()
    assert not origin_signed(message)
