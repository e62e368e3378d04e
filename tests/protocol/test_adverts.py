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
    book = AdvertBook(DOMAIN)
    assert not book.validate("12D3KooWpeer", b"\xc1 not msgpack")
    assert not book.validate("12D3KooWpeer", encode(Heartbeat(seq=1)))
    assert not book.validate("12D3KooWother", _advert())  # relayed under another identity
    assert not book.validate("12D3KooWpeer", _advert(key=b"\x03" * 32))  # not the wallet's
    assert not book.validate("12D3KooWpeer", _advert(expiry=1))  # expired
    assert book.adverts == {}
