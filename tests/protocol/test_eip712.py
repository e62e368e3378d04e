"""Our signatures are standard EIP-712: eth-account verifies them, and our fast digests match."""

import os

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import SignatureError
from sogni_protocol.messages import Capabilities, JobOffer, Receipt

DOMAIN = Domain(131277322940537, "0x" + "ab" * 20)
WORKER = Account.from_key(b"\x01" * 32)


def _receipt(**kw: object) -> Receipt:
    fields: dict[str, object] = dict(
        job_id=os.urandom(32),
        offer_hash=os.urandom(32),
        worker=WORKER.address,
        coordinator="0x" + "22" * 20,
        model_id="sogni-tiny-sd",
        result_hash=os.urandom(32),
        steps_done=8,
        work_units=1234,
        completed_at=1_700_000_000,
    )
    fields.update(kw)
    return Receipt(**fields)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 150),
    units=st.integers(0, 2**63 - 1),
    model=st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
)
def test_receipt_digest_matches_eth_account(steps: int, units: int, model: str) -> None:
    receipt = _receipt(steps_done=steps, work_units=units, model_id=model)
    signable = encode_typed_data(full_message=eip712.receipt_document(DOMAIN, receipt))
    from eth_account.messages import _hash_eip191_message

    assert _hash_eip191_message(signable) == eip712.receipt_digest(DOMAIN, receipt)


def test_offer_hash_matches_eth_account() -> None:
    offer = JobOffer(
        job_id=os.urandom(32),
        coordinator="0x" + "33" * 20,
        model_id="m",
        params_hash=os.urandom(32),
        steps=4,
        width=64,
        height=64,
        seed=9,
        work_units=77,
        deadline=1_800_000_000,
    )
    from eth_account.messages import _hash_eip191_message

    signable = encode_typed_data(full_message=eip712.offer_document(DOMAIN, offer))
    assert _hash_eip191_message(signable) == eip712.offer_hash(DOMAIN, offer)


def test_signed_receipt_verifies_with_eth_account() -> None:
    receipt = _receipt()
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, receipt)
    doc = eip712.receipt_document(DOMAIN, receipt)
    assert (
        Account.recover_message(encode_typed_data(full_message=doc), signature=sig)
        == WORKER.address
    )
    assert eip712.recover_receipt_signer(DOMAIN, receipt, sig) == WORKER.address


def test_receipt_for_another_chain_or_distributor_recovers_someone_else() -> None:
    receipt = _receipt()
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, receipt)
    for other in (Domain(1, DOMAIN.verifying_contract), Domain(DOMAIN.chain_id, "0x" + "cd" * 20)):
        assert eip712.recover_receipt_signer(other, receipt, sig) != WORKER.address


def test_malformed_signatures_are_refused() -> None:
    receipt = _receipt()
    with pytest.raises(SignatureError):
        eip712.recover_receipt_signer(DOMAIN, receipt, b"\x00" * 65)
    sig = bytearray(eip712.sign_receipt(WORKER.key, DOMAIN, receipt))
    sig[64] = 5
    with pytest.raises(SignatureError, match="v of 27 or 28"):
        eip712.recover_receipt_signer(DOMAIN, receipt, bytes(sig))


def test_binding_signed_by_wallet() -> None:
    caps = Capabilities(
        peer_id="12D3KooWtest",
        wallet=WORKER.address,
        expiry=2_000_000_000,
        models=["m"],
        slots=1,
        backend="diffusers",
        device="cpu",
        max_pixels=262144,
    )
    sig = eip712.sign_binding(WORKER.key, DOMAIN, caps)
    assert eip712.recover_binding_signer(DOMAIN, caps, sig) == WORKER.address
    moved = Capabilities(
        **{**{f: getattr(caps, f) for f in caps.__struct_fields__}, "peer_id": "x"}
    )
    assert eip712.recover_binding_signer(DOMAIN, moved, sig) != WORKER.address
