"""What a node refuses in a correctly signed offer from a trusted coordinator before it takes
a slot: more pixels than it advertises (`max_pixels`, the operator's limit or the probe's),
and a LoRA listed twice (each copy merged again: memory grows with every repeat)."""

from __future__ import annotations

import time

from eth_account import Account

from sogni_node.pull import NodeIdentity, PullSession
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import Capabilities, JobOffer, JobParams, LoraRef, Offer

DOMAIN = Domain(31337, "0x" + "ab" * 20)
MODEL = "sogni-shapes-64"
COORDINATOR = Account.create()


def _session(max_pixels: int) -> PullSession:
    """A session's offer check alone (no stream): trusting COORDINATOR, serving MODEL and
    LoRA `style`, advertising `max_pixels`."""
    session = PullSession.__new__(PullSession)
    wallet = Account.create()
    session.id = NodeIdentity(
        wallet.address, bytes(wallet.key), DOMAIN, frozenset({COORDINATOR.address.lower()})
    )
    session.coordinator = COORDINATOR.address
    session.caps = Capabilities(
        peer_id="peer",
        wallet=wallet.address,
        expiry=0,
        models=[MODEL],
        slots=1,
        backend="diffusers",
        device="cpu",
        max_pixels=max_pixels,
        loras=["style"],
    )
    return session


def _offer(size: int, loras: list[str] = []) -> tuple[Offer, bytes]:  # noqa: B006
    params = JobParams(
        model_id=MODEL,
        positive_prompt="x",
        steps=4,
        guidance=7.0,
        width=size,
        height=size,
        seed=1,
        loras=[LoraRef(id=lora, strength=1.0) for lora in loras],
    )
    offer = JobOffer(
        job_id=b"\x01" * 32,
        coordinator=COORDINATOR.address,
        model_id=MODEL,
        params_hash=eip712.params_hash(params),
        steps=4,
        width=size,
        height=size,
        seed=1,
        work_units=1,
        deadline=int(time.time()) + 600,
    )
    signed = Offer(
        offer=offer,
        params=params,
        signature=eip712.sign_offer(bytes(COORDINATOR.key), DOMAIN, offer),
    )
    return signed, eip712.offer_hash(DOMAIN, offer)


def test_an_offer_over_the_advertised_max_pixels_is_refused() -> None:
    session = _session(max_pixels=512 * 512)
    assert session._check_offer(*_offer(512)) is None
    fault = session._check_offer(*_offer(2048))
    assert fault == f"2048x2048 is over this node's max_pixels ({512 * 512})"
    assert _session(max_pixels=0)._check_offer(*_offer(2048)) is None  # 0: no limit known


def test_an_offer_listing_a_lora_twice_is_refused() -> None:
    session = _session(max_pixels=0)
    assert session._check_offer(*_offer(64, ["style"])) is None
    assert session._check_offer(*_offer(64, ["style"] * 8)) == "a LoRA is listed twice"
