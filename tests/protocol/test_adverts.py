"""The gossip validator refuses adverts that are malformed, unbound, forged or too frequent."""

import time

import msgspec
from eth_account import Account

from sogni_coordinator.adverts import AdvertBook
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import Capabilities, Heartbeat, NodeHello, encode

DOMAIN = Domain(131277322940537, "0x" + "ab" * 20)
WALLET = Account.from_key(b"\x02" * 32)


def _advert(peer: str = "12D3KooWpeer", key: bytes = bytes(WALLET.key), **kw: object) -> bytes:
    caps = Capabilities(
        peer_id=peer,
        wallet=WALLET.address,
        expiry=int(time.time()) + 60,
        models=["m"],
        slots=1,
        backend="diffusers",
        device="cpu",
        max_pixels=4096,
    )
    caps = msgspec.structs.replace(caps, **kw)
    return encode(
        NodeHello(capabilities=caps, binding_signature=eip712.sign_binding(key, DOMAIN, caps))
    )


def test_valid_advert_is_recorded_once_per_interval() -> None:
    book = AdvertBook(DOMAIN)
    assert book.validate("12D3KooWpeer", _advert())
    assert book.adverts["12D3KooWpeer"].models == ["m"]
    assert not book.validate("12D3KooWpeer", _advert())  # rate limited


def test_bad_adverts_are_rejected() -> None:
    clock = [time.time()]
    book = AdvertBook(DOMAIN, clock=lambda: clock[0])
    for bad in (
        b"\xc1 not msgpack",
        encode(Heartbeat(seq=1)),
        _advert(key=b"\x03" * 32),  # not the wallet's
        _advert(expiry=1),  # expired
    ):
        clock[0] += book.min_interval  # each checked on its own (one per origin per interval)
        assert not book.validate("12D3KooWpeer", bad)
    assert not book.validate("12D3KooWother", _advert())  # relayed under another identity
    assert book.adverts == {}


def test_what_adverts_may_cost_is_bounded_whoever_sends_them() -> None:
    """A stream of bad bindings from one origin was checked every time (~9 ms of the loop
    each), any number of origins were checked at once, and the book kept every self-signed
    origin forever (~94 KB each)."""
    clock = [time.time()]  # the adverts expire 60 s from now
    book = AdvertBook(
        DOMAIN,
        clock=lambda: clock[0],
        max_adverts=3,
        checks_per_second=4.0,
        connected=lambda origin: origin == "12D3KooWlast",  # handshaken here
    )
    checked: list[str] = []
    real = eip712.check_binding

    def counting(*args: object) -> str | None:
        checked.append(str(args[3]))
        return real(*args)  # type: ignore[arg-type]

    eip712.check_binding = counting  # type: ignore[assignment]
    try:
        forged = _advert(key=b"\x03" * 32)
        assert not book.validate("12D3KooWpeer", forged)
        assert not book.validate("12D3KooWpeer", forged)  # the same origin again: unchecked
        assert checked == ["12D3KooWpeer"]
        for i in range(10):  # many origins at once: the budget's 3 tokens left, then none
            book.validate(f"12D3KooWsybil{i}", _advert(peer=f"12D3KooWsybil{i}"))
        assert len(checked) == 4
        for i in range(6):  # later, each with its own valid advert: the book stays bounded
            clock[0] += 1.0
            peer = f"12D3KooWlater{i}"
            assert book.validate(peer, _advert(peer=peer))
        assert list(book.adverts) == ["12D3KooWlater3", "12D3KooWlater4", "12D3KooWlater5"]
        clock[0] += 120.0  # every advert expired (60 s): pruned at the next accepted one
        assert book.validate(
            "12D3KooWlast", _advert(peer="12D3KooWlast", expiry=int(clock[0]) + 60)
        )
        assert list(book.adverts) == ["12D3KooWlast"]
        assert len(book._last_seen) <= 3
        clock[0] += book.min_interval
        for i in range(10):  # a flood of fresh identities spends the budget ...
            book.validate(f"12D3KooWflood{i}", _advert(peer=f"12D3KooWflood{i}"))
        assert book.validate(  # ... but a node connected here is still heard
            "12D3KooWlast", _advert(peer="12D3KooWlast", expiry=int(clock[0]) + 60)
        )
    finally:
        eip712.check_binding = real


def test_a_node_relays_only_what_could_be_its_origins_advert() -> None:
    """Nodes joined the topic with no validator and relayed any bytes across the mesh."""
    from sogni_node.daemon import plain_advert

    assert plain_advert("12D3KooWpeer", _advert())
    assert not plain_advert("12D3KooWpeer", b"\xc1 not msgpack")
    assert not plain_advert("12D3KooWpeer", encode(Heartbeat(seq=1)))
    assert not plain_advert("12D3KooWother", _advert())  # another origin's advert
    assert not plain_advert("12D3KooWpeer", _advert(expiry=1))
