"""Our signatures are standard EIP-712: eth-account verifies them, and our fast digests match."""

import os

import msgspec
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


# --- versions ------------------------------------------------------------------------------
V1 = DOMAIN.at("1")


V2 = DOMAIN.at("2")


def test_current_version_is_4_with_the_price_factor_trajectory_root_and_payout() -> None:
    assert DOMAIN.version == eip712.DOMAIN_VERSION == "4"
    assert eip712.KNOWN_VERSIONS == ("1", "2", "3", "4")
    assert len({V1.separator, V2.separator, DOMAIN.at("3").separator, DOMAIN.separator}) == 4
    doc = eip712.receipt_document(DOMAIN, _receipt())
    assert doc["types"]["Receipt"][-3:] == [
        {"name": "priceFactorBps", "type": "uint32"},
        {"name": "trajectoryRoot", "type": "bytes32"},
        {"name": "payout", "type": "address"},
    ]
    assert doc["message"]["payout"] == doc["message"]["worker"]  # none named: the worker
    assert doc["message"]["priceFactorBps"] == 10_000
    assert doc["message"]["trajectoryRoot"] == "0x" + "00" * 32
    v2 = eip712.receipt_document(V2, _receipt())
    assert "trajectoryRoot" not in v2["message"] and "priceFactorBps" in v2["message"]
    old = eip712.receipt_document(V1, _receipt())
    assert "priceFactorBps" not in old["message"]
    assert all(f["name"] != "priceFactorBps" for f in old["types"]["Receipt"])


def test_trajectory_root_is_signed_and_only_v3_carries_one() -> None:
    committed = msgspec.structs.replace(_receipt(), trajectory_root=b"\x07" * 32)
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, committed)
    assert eip712.recover_receipt_signer(DOMAIN, committed, sig) == WORKER.address
    other = msgspec.structs.replace(committed, trajectory_root=b"\x08" * 32)
    assert eip712.recover_receipt_signer(DOMAIN, other, sig) != WORKER.address
    signable = encode_typed_data(full_message=eip712.receipt_document(DOMAIN, committed))
    assert Account.recover_message(signable, signature=sig) == WORKER.address
    with pytest.raises(SignatureError, match="no trajectory root"):
        eip712.receipt_digest(V2, committed)
    plain = _receipt()
    v2_sig = eip712.sign_digest(WORKER.key, eip712.receipt_digest(V2, plain))
    assert eip712.verify_receipt(DOMAIN, plain, v2_sig, WORKER.address) == "2"


def test_price_factor_is_signed() -> None:
    receipt = _receipt()
    relaxed = msgspec.structs.replace(receipt, price_factor_bps=5_000)
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, relaxed)
    assert eip712.recover_receipt_signer(DOMAIN, relaxed, sig) == WORKER.address
    assert eip712.recover_receipt_signer(DOMAIN, receipt, sig) != WORKER.address
    signable = encode_typed_data(full_message=eip712.receipt_document(DOMAIN, relaxed))
    assert Account.recover_message(signable, signature=sig) == WORKER.address


def test_receipt_signed_under_version_1_still_verifies() -> None:
    receipt = _receipt()
    sig = eip712.sign_digest(WORKER.key, eip712.receipt_digest(V1, receipt))
    line = {"domain": V1.as_dict(), **eip712.receipt_document(V1, receipt)}
    signable = encode_typed_data(full_message=eip712.receipt_document(V1, receipt))
    assert Account.recover_message(signable, signature=sig) == WORKER.address  # v1 bytes kept

    assert eip712.recover_receipt_signer(DOMAIN, receipt, sig) != WORKER.address
    recorded = Domain.from_dict(line["domain"])  # the version travels with the receipt
    assert recorded.version == "1"
    assert eip712.recover_receipt_signer(recorded, receipt, sig) == WORKER.address
    assert eip712.verify_receipt(DOMAIN, receipt, sig, WORKER.address) == "1"
    with pytest.raises(SignatureError, match="not signed by its worker"):
        eip712.verify_receipt(DOMAIN, receipt, sig, "0x" + "44" * 20)
    with pytest.raises(ValueError, match="signing uses the current EIP-712 version '4'"):
        eip712.sign_receipt(WORKER.key, recorded, receipt)


def test_version_1_cannot_carry_a_discount() -> None:
    relaxed = msgspec.structs.replace(_receipt(), price_factor_bps=5_000)
    with pytest.raises(SignatureError, match="only full price"):
        eip712.receipt_digest(V1, relaxed)


def test_payer_checks_accept_every_known_version(monkeypatch: pytest.MonkeyPatch) -> None:
    claim = eip712.sign_boost_claim(WORKER.key, DOMAIN, "2025-06-01")
    assert eip712.check_boost_claim(DOMAIN, claim) is None
    assert eip712.check_boost_claim(V1, claim) is None  # tried under every known version
    monkeypatch.setattr(eip712, "KNOWN_VERSIONS", ("1",))  # "4" retired: refused
    assert "not from the payer" in (eip712.check_boost_claim(V1, claim) or "")


def test_unknown_version_is_refused_with_the_reason() -> None:
    receipt = _receipt()
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, receipt)
    future = DOMAIN.at("9")
    reason = "EIP-712 domain version '9' is unknown: this code verifies versions '1', '2', '3', '4'"
    with pytest.raises(SignatureError, match=reason):
        eip712.recover_receipt_signer(future, receipt, sig)
    with pytest.raises(SignatureError, match=reason):
        eip712.verify_receipt(future, receipt, sig, WORKER.address)
    with pytest.raises(SignatureError, match=reason):
        Domain.from_dict({**DOMAIN.as_dict(), "version": "9"})
    claim = eip712.sign_boost_claim(WORKER.key, DOMAIN, "2025-06-01")
    assert (eip712.check_boost_claim(future, claim) or "").startswith(reason)
