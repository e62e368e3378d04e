"""The wire version is settled by a stream's first frame: a peer of another version hears
why (`HelloRefused`, `RequestRefused`), and a node says so in one line instead of a bare
"channel closed". Sessions run over a scripted channel, no libp2p."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from sogni_coordinator.client_session import serve_client
from sogni_coordinator.gateway.limits import KeyBuckets
from sogni_coordinator.node_session import serve_node
from sogni_net import Channel
from sogni_node.pull import NodeIdentity, PullSession, SessionRefused
from sogni_protocol import eip712
from sogni_protocol.ids import WIRE_VERSION
from sogni_protocol.messages import (
    Capabilities,
    HelloRefused,
    Message,
    NodeHello,
    RequestRefused,
    Welcome,
    encode,
)

from .conftest import DOMAIN, MODEL, SIGNER, Harness, ScriptedChannel

V2 = WIRE_VERSION + 1


def _as_version(message: Message, v: int, **extra: Any) -> bytes:
    raw = msgspec.to_builtins(message)
    return msgspec.msgpack.encode({**raw, "v": v, **extra})


def _caps(peer: str = "peer-x") -> Capabilities:
    return Capabilities(
        peer_id=peer,
        wallet=SIGNER.address,
        expiry=2_000_000_000,
        models=[MODEL],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=0,
    )


def _hello() -> NodeHello:
    caps = _caps()
    return NodeHello(
        capabilities=caps,
        binding_signature=eip712.sign_binding(bytes(SIGNER.key), DOMAIN, caps),
    )


async def test_coordinator_refuses_a_hello_of_another_version_saying_why(
    coord: Harness,
) -> None:
    channel = ScriptedChannel(_as_version(_hello(), V2, aFieldFromTheFuture=1))
    await serve_node(
        cast(Channel, channel), coord.dispatcher, heartbeat_interval=1, heartbeat_timeout=3
    )
    assert channel.sent == [
        HelloRefused(
            reason=f"wire version {V2} is not supported: this coordinator speaks {WIRE_VERSION}"
        )
    ]
    assert channel.closed and coord.dispatcher.nodes == {}


async def test_other_refused_hellos_are_explained_too(coord: Harness) -> None:
    signature = _hello().binding_signature  # bound to peer-x, claimed for another peer
    forged = NodeHello(capabilities=_caps("another-peer"), binding_signature=signature)
    channel = ScriptedChannel(encode(forged))
    await serve_node(
        cast(Channel, channel), coord.dispatcher, heartbeat_interval=1, heartbeat_timeout=3
    )
    (refused,) = channel.sent
    assert isinstance(refused, HelloRefused) and refused.reason
    assert channel.closed and coord.dispatcher.nodes == {}


async def test_a_peer_churning_hellos_is_refused_before_any_work_and_leaves_no_record(
    coord: Harness,
) -> None:
    """One connection could open stream after stream, each with a fresh self-signed wallet
    (the binding ties the peer id, not the wallet): each cost a signature recovery, a chain
    lookup, and a reputation record kept for ever. Hellos are rate-limited per peer (and in
    all), and a wallet that never worked leaves no record after a short session."""
    refused = []
    for _ in range(6):
        channel = ScriptedChannel(encode(_hello()))
        await serve_node(
            cast(Channel, channel), coord.dispatcher, heartbeat_interval=1, heartbeat_timeout=3
        )
        refused += [m.reason for m in channel.sent if isinstance(m, HelloRefused)]
    assert refused[-2:] == ["too many sessions from this peer: wait before connecting again"] * 2
    assert coord.dispatcher.nodes == {}
    wallet = _caps("peer-x").wallet
    assert wallet.lower() not in coord.reputation.records  # its blips left no record
    coord.reputation.get(wallet).score(0.0)  # scored for an offer: made one in memory
    coord.reputation.disconnected(wallet, 5.0)
    assert wallet.lower() not in coord.reputation.records


async def test_hellos_with_a_bad_binding_do_not_spend_the_total_limit(coord: Harness) -> None:
    """The total hello budget was spent before the binding was checked: fresh peer ids with
    junk bindings (free to make) could keep every honest node out after a restart."""
    coord.dispatcher.hellos.total = KeyBuckets(per_minute=1, burst=1)
    signature = _hello().binding_signature
    for n in range(3):  # bound to peer-x, claimed for other peers: refused, budget kept
        forged = NodeHello(capabilities=_caps(f"junk-{n}"), binding_signature=signature)
        await serve_node(
            cast(Channel, ScriptedChannel(encode(forged))),
            coord.dispatcher,
            heartbeat_interval=1,
            heartbeat_timeout=3,
        )
    honest = ScriptedChannel(encode(_hello()))
    await serve_node(
        cast(Channel, honest), coord.dispatcher, heartbeat_interval=1, heartbeat_timeout=3
    )
    assert any(isinstance(m, Welcome) for m in honest.sent), honest.sent


async def test_client_first_frame_of_another_version_is_refused(
    coord: Harness, tmp_path: Path
) -> None:
    frame = msgspec.msgpack.encode(
        {"type": "renderRequest", "v": V2, "modelId": MODEL, "positivePrompt": "p"}
    )
    channel = ScriptedChannel(frame)
    await serve_client(cast(Channel, channel), coord.dispatcher, allowed_models={MODEL})
    assert channel.sent == [
        RequestRefused(
            code="unsupported_version",
            reason=f"wire version {V2} is not supported: this coordinator speaks {WIRE_VERSION}",
        )
    ]
    assert channel.closed and coord.dispatcher.requests == {}


def _session() -> PullSession:
    identity = NodeIdentity(
        wallet_address=SIGNER.address,
        wallet_key=bytes(SIGNER.key),
        domain=DOMAIN,
        trusted=frozenset({SIGNER.address.lower()}),
    )
    return PullSession(None, "addr", identity, None, None, _caps())  # type: ignore[arg-type]


async def test_node_reports_the_coordinators_refusal_in_one_line() -> None:
    reason = f"wire version {V2} is not supported: this coordinator speaks {WIRE_VERSION}"
    # a newer coordinator's refusal, read although it carries another version
    channel = ScriptedChannel(_as_version(HelloRefused(reason=reason), V2))
    with pytest.raises(SessionRefused) as info:
        await _session()._handshake(cast(Channel, channel))
    assert str(info.value) == f"coordinator refused this node: {reason}"
    assert isinstance(channel.sent[0], NodeHello)


async def test_node_refuses_a_welcome_of_another_version() -> None:
    welcome = Welcome(
        coordinator=SIGNER.address,
        chain_id=DOMAIN.chain_id,
        verifying_contract=DOMAIN.verifying_contract,
        heartbeat_interval=1.0,
    )
    channel = ScriptedChannel(_as_version(welcome, V2))
    with pytest.raises(SessionRefused, match=f"wire version {V2} is not supported: this node"):
        await _session()._handshake(cast(Channel, channel))
    ok = ScriptedChannel(encode(welcome))
    await _session()._handshake(cast(Channel, ok))  # the same at our version is welcome


async def test_a_welcome_cannot_set_heartbeats_below_the_nodes_floor() -> None:
    from sogni_node.pull import MIN_HEARTBEAT_INTERVAL

    for asked, kept in ((1e-6, MIN_HEARTBEAT_INTERVAL), (1.0, 1.0), (60.0, 5.0)):
        welcome = Welcome(
            coordinator=SIGNER.address,
            chain_id=DOMAIN.chain_id,
            verifying_contract=DOMAIN.verifying_contract,
            heartbeat_interval=asked,
        )
        session = _session()  # its own interval: 5 s
        await session._handshake(cast(Channel, ScriptedChannel(encode(welcome))))
        assert session.heartbeat_interval == kept
