"""Offer-key rotation links (EIP-712 `KeyRotation`) and the chains a node follows: every
way to cheat a chain (a link signed by another key, a gap, a loop, a future link, another
chain's domain, too many links) is refused, with the reason."""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import KeyRotation, SignedKeyRotation
from sogni_protocol.rotation_chain import MAX_LINKS, chain_fault, chain_keys, newly_trusted

DOMAIN = Domain(31337, "0x" + "ab" * 20)
NOW = 1_800_000_000


def _keys(n: int) -> list[tuple[str, bytes]]:
    return [(a.address, bytes(a.key)) for a in (Account.create() for _ in range(n))]


def _chain(keys: list[tuple[str, bytes]], start: int = NOW - 1000) -> list[SignedKeyRotation]:
    return [
        eip712.sign_key_rotation(
            old_key, DOMAIN, KeyRotation(old_key=old, new_key=new, not_before=start + i)
        )
        for i, ((old, old_key), (new, _)) in enumerate(itertools.pairwise(keys))
    ]


def test_a_link_is_standard_eip712_signed_by_the_old_key() -> None:
    (old, old_key), (new, _) = _keys(2)
    link = eip712.sign_key_rotation(
        old_key, DOMAIN, KeyRotation(old_key=old, new_key=new, not_before=NOW)
    )
    doc = eip712.key_rotation_document(DOMAIN, link.rotation)
    assert doc["domain"]["version"] == eip712.DOMAIN_VERSION  # a new type, no new version
    assert doc["types"]["KeyRotation"][0] == {"name": "oldKey", "type": "address"}
    signer = Account.recover_message(encode_typed_data(full_message=doc), signature=link.signature)
    assert signer == old
    assert eip712.check_key_rotation(DOMAIN, link) is None
    wire = msgspec.json.decode(msgspec.json.encode(link), type=SignedKeyRotation)
    assert eip712.check_key_rotation(DOMAIN, wire) is None


def test_only_the_old_key_may_sign_a_link() -> None:
    (old, _), (new, new_key), (_, other_key) = _keys(3)
    rotation = KeyRotation(old_key=old, new_key=new, not_before=NOW)
    with pytest.raises(ValueError, match="signed by its old key"):
        eip712.sign_key_rotation(new_key, DOMAIN, rotation)
    forged = SignedKeyRotation(
        rotation=rotation,
        signature=eip712._sign(other_key, eip712.key_rotation_document(DOMAIN, rotation)),
    )
    assert "not signed by the key it replaces" in (eip712.check_key_rotation(DOMAIN, forged) or "")


def test_a_valid_chain_and_what_a_node_newly_trusts() -> None:
    keys = _keys(4)
    chain = _chain(keys)
    addrs = [k for k, _ in keys]
    assert chain_keys(chain) == addrs
    assert chain_fault(DOMAIN, chain, addrs[-1], NOW) is None
    assert chain_fault(DOMAIN, [], addrs[0], NOW) is None  # no rotation
    assert newly_trusted(chain, {addrs[0].lower()}) == list(itertools.pairwise(addrs))
    assert newly_trusted(chain, {addrs[2].lower()}) == [(addrs[2], addrs[3])]
    assert newly_trusted(chain, {addrs[3].lower()}) == []
    assert newly_trusted(chain, {Account.create().address.lower()}) is None


def test_every_broken_chain_is_refused_with_its_reason() -> None:
    keys = _keys(4)
    chain = _chain(keys)
    last = keys[-1][0]

    def fault(links: list[SignedKeyRotation], current: str = last, **kw: object) -> str:
        reason = chain_fault(kw.pop("domain", DOMAIN), links, current, NOW)  # type: ignore[arg-type]
        assert reason is not None
        return reason

    # a link signed by another key than the one it replaces (a forged handover)
    (_, intruder_key) = _keys(1)[0]
    bad = chain[1].rotation
    forged = SignedKeyRotation(
        rotation=bad,
        signature=eip712._sign(intruder_key, eip712.key_rotation_document(DOMAIN, bad)),
    )
    assert "not signed by the key it replaces" in fault([chain[0], forged, chain[2]])
    assert "does not continue" in fault([chain[0], chain[2]])  # a gap
    assert "ends at" in fault(chain[:2])  # not at the welcoming key
    assert "not signed" in fault(chain, domain=Domain(1, DOMAIN.verifying_contract))
    future = _chain(keys[:2], start=NOW + 3600)
    assert "in the future" in fault(future, keys[1][0])
    back = [chain[0], _chain(keys[1:3], start=NOW - 5000)[0]]
    assert "before the rotation it follows" in fault(back, keys[2][0])
    loop = _chain([keys[0], keys[1], keys[0]])
    assert "loop" in fault(loop, keys[0][0])
    many = _keys(MAX_LINKS + 2)
    assert "more than" in fault(_chain(many), many[-1][0])
    assert chain_fault(DOMAIN, _chain(many[1:]), many[-1][0], NOW) is None  # 16 links are fine


def test_the_current_clock_allows_a_small_skew() -> None:
    keys = _keys(2)
    soon = _chain(keys, start=int(time.time()) + 60)
    assert chain_fault(DOMAIN, soon, keys[1][0], time.time()) is None
