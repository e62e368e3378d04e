"""Receipt v4's payout address: signed (so nobody redirects the pay), readable by any EIP-712
library, refused in older versions and batches; the node's `payout_address` setting; the
partner machine id in capabilities."""

from __future__ import annotations

import os

import msgspec
import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data

from sogni_node.config import load_node_config
from sogni_node.payout import check_payout_address, payout_of, signed_form
from sogni_protocol import eip712, epoch_math
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import BatchEntry, VerifierPay, decode_batch
from sogni_protocol.errors import InvalidMessage, SignatureError
from sogni_protocol.messages import Capabilities, NodeHello, Receipt, decode, encode
from sogni_protocol.settings import SettingsError

DOMAIN = Domain(131277322940537, "0x" + "ab" * 20)
WORKER = Account.from_key(b"\x01" * 32)
PAYOUT = Account.from_key(b"\x02" * 32).address
OTHER = Account.from_key(b"\x03" * 32).address


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
        trajectory_root=os.urandom(32),
    )
    fields.update(kw)
    return Receipt(**fields)  # type: ignore[arg-type]


def test_the_payout_is_signed_and_any_eip712_library_verifies_it() -> None:
    receipt = _receipt(payout=PAYOUT)
    assert receipt.payee == PAYOUT and _receipt().payee == WORKER.address
    sig = eip712.sign_receipt(WORKER.key, DOMAIN, receipt)
    doc = eip712.receipt_document(DOMAIN, receipt)
    assert doc["message"]["payout"] == PAYOUT
    signable = encode_typed_data(full_message=doc)
    assert _hash_eip191_message(signable) == eip712.receipt_digest(DOMAIN, receipt)
    assert Account.recover_message(signable, signature=sig) == WORKER.address
    # changed after signing: the signature is the worker's no more
    redirected = msgspec.structs.replace(receipt, payout=OTHER)
    assert eip712.recover_receipt_signer(DOMAIN, redirected, sig) != WORKER.address
    with pytest.raises(SignatureError):
        eip712.verify_receipt(DOMAIN, redirected, sig, WORKER.address)
    dropped = msgspec.structs.replace(receipt, payout=None)
    with pytest.raises(SignatureError):
        eip712.verify_receipt(DOMAIN, dropped, sig, WORKER.address)


def test_no_payout_and_the_workers_own_address_sign_the_same() -> None:
    """None means "the worker": the same signed message either way (no second reading)."""
    plain = _receipt()
    named = msgspec.structs.replace(plain, payout=WORKER.address)
    assert eip712.receipt_digest(DOMAIN, plain) == eip712.receipt_digest(DOMAIN, named)


def test_older_versions_pay_the_worker_only_and_still_verify() -> None:
    v3 = DOMAIN.at("3")
    plain = _receipt()
    sig = eip712.sign_digest(WORKER.key, eip712.receipt_digest(v3, plain))
    assert eip712.verify_receipt(DOMAIN, plain, sig, WORKER.address) == "3"
    assert "payout" not in eip712.receipt_document(v3, plain)["message"]
    with pytest.raises(SignatureError, match="no payout address"):
        eip712.receipt_digest(v3, _receipt(payout=PAYOUT))
    # a v3 signature cannot be passed off as paying someone else
    with pytest.raises(SignatureError):
        eip712.verify_receipt(
            DOMAIN, msgspec.structs.replace(plain, payout=PAYOUT), sig, WORKER.address
        )


def test_receipts_and_capabilities_travel_at_wire_version_6_or_later() -> None:
    from sogni_protocol import ids

    assert ids.WIRE_VERSION >= 6
    caps = Capabilities(
        peer_id="12D3KooW",
        wallet=WORKER.address,
        expiry=1,
        models=["m"],
        slots=1,
        backend="diffusers",
        device="cpu",
        max_pixels=0,
        machine_id="salad-machine-1",
    )
    hello = NodeHello(capabilities=caps, binding_signature=b"\x00" * 65)
    assert decode(encode(hello)) == hello
    for bad in ("-leading-dash", "x" * 65, "spaces here", "a/b"):
        raw = msgspec.msgpack.decode(encode(hello))
        raw["capabilities"]["machineId"] = bad
        with pytest.raises(InvalidMessage, match="machineId"):
            decode(msgspec.msgpack.encode(raw))
    receipt = _receipt(payout=PAYOUT)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(receipt), type=Receipt) == receipt
    # a receipt stored before v4 (no payout key) reads as paying its worker
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(_receipt()))
    del old["payout"]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Receipt).payout is None


def _entry(payout: str | None, verifiers: list[VerifierPay]) -> BatchEntry:
    return msgspec.convert(
        {
            "jobId": "0x" + "11" * 32,
            "offerHash": "0x" + "22" * 32,
            "worker": WORKER.address,
            "coordinator": OTHER,
            "modelId": "m",
            "resultHash": "0x" + "33" * 32,
            "stepsDone": 8,
            "workUnits": 1,
            "completedAt": 1,
            "priceFactorBps": 10_000,
            "trajectoryRoot": "0x" + "00" * 32,
            "signature": "0x",
            "offer": {
                "jobId": "0x",
                "coordinator": OTHER,
                "modelId": "m",
                "paramsHash": "0x",
                "steps": 8,
                "width": 64,
                "height": 64,
                "seed": 1,
                "workUnits": 1,
                "deadline": 1,
                "priceFactorBps": 10_000,
                "signature": "0x",
            },
            "settlement": {
                "payer": OTHER,
                "tokenType": "spark",
                "sparkFree": 0,
                "sparkPaid": 1,
                "sogni": 0,
                "sparkEquiv": 1,
            },
            "paidValue": "1",
            "freeValue": "0",
            "takeBps": 3000,
            "workerAmount": "7",
            "creator": None,
            "creatorAmount": "0",
            "verifiers": [msgspec.to_builtins(v) for v in verifiers],
            "payout": payout,
        },
        BatchEntry,
    )


def test_the_payee_is_paid_counted_and_never_its_own_verifier() -> None:
    entry = _entry(PAYOUT, [])
    assert epoch_math.earned_by_account([entry]) == {PAYOUT: 7}
    (p,) = epoch_math.payouts([entry], {PAYOUT: 7}, {PAYOUT: 7})
    assert (p.account, p.receipts) == (PAYOUT, 1)
    # the settler leaves the payout account out of the receipt's verifiers
    listed = epoch_math.verifiers_of(
        [(PAYOUT, 2), (OTHER, 1)], worker=WORKER.address, payee=PAYOUT, value=8, take=8, job_steps=8
    )
    assert [v.account for v in listed] == [OTHER]
    # and the audit refuses a batch that pays it as one
    forged = _entry(PAYOUT, [VerifierPay(account=PAYOUT, steps=2, amount="2")])
    why = epoch_math.verifier_problem(forged, 8, 8, 8)
    assert why is not None and "payout address" in why


def test_self_dealing_is_judged_by_worker_and_payee() -> None:
    assert epoch_math.self_dealing(OTHER, 5, WORKER.address, OTHER) is not None
    assert epoch_math.self_dealing(WORKER.address, 5, WORKER.address, PAYOUT) is not None
    assert epoch_math.self_dealing(OTHER, 0, WORKER.address, OTHER) is None  # paid Spark
    assert epoch_math.self_dealing(OTHER, 5, WORKER.address, PAYOUT) is None


def test_older_batch_formats_cannot_name_payouts() -> None:
    from sogni_protocol.epoch_files import ReceiptsBatch, encode
    from sogni_protocol.payout_rules import SettlementConfig

    def batch(fmt: str, payout: str | None) -> bytes:
        return encode(
            ReceiptsBatch(
                format=fmt,
                epoch=1,
                chain_id=1,
                verifying_contract=OTHER,
                network_id="n",
                rules=SettlementConfig().rules(),
                stake_block=None,
                stakes={},
                free_requested="0",
                receipts=[_entry(payout, [])],
            )
        )

    assert decode_batch(batch("sogni-receipts-v5", PAYOUT)).receipts[0].payee == PAYOUT
    assert decode_batch(batch("sogni-receipts-v4", None)).receipts[0].payee == WORKER.address
    for old in ("sogni-receipts-v4", "sogni-receipts-v3"):
        with pytest.raises(ValueError, match="cannot name payout addresses"):
            decode_batch(batch(old, PAYOUT))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0x" + "00" * 20, "zero address"),
        ("0x" + "Ab" * 20, "checksum"),  # mixed case that is not EIP-55
        ("0x1234", "0x"),
    ],
)
def test_payout_address_setting_is_validated(value: str, problem: str) -> None:
    with pytest.raises((SettingsError, ValueError), match=problem):
        load_node_config(None, {"SOGNI_NODE_PAYOUT_ADDRESS": value})


def test_payout_address_setting_accepts_lower_and_checksummed() -> None:
    lower = load_node_config(None, {"SOGNI_NODE_PAYOUT_ADDRESS": PAYOUT.lower()})
    assert lower.payout_address == PAYOUT  # checksummed once loaded
    assert load_node_config(None, {"SOGNI_NODE_PAYOUT_ADDRESS": PAYOUT}).payout_address == PAYOUT
    assert load_node_config(None, {}).payout_address is None
    assert check_payout_address(PAYOUT.upper().replace("0X", "0x")) == PAYOUT
    assert payout_of(None, WORKER.address) is None
    assert payout_of(WORKER.address.lower(), WORKER.address) is None  # its own wallet: none
    assert payout_of(PAYOUT.lower(), WORKER.address) == PAYOUT


def test_a_journalled_receipt_gets_back_the_payout_it_was_signed_with() -> None:
    signed = _receipt(payout=PAYOUT)
    as_journalled = msgspec.structs.replace(signed, payout=None)
    assert signed_form(as_journalled, "4", PAYOUT) == signed
    assert signed_form(as_journalled, "3", PAYOUT).payout is None  # v3 never had one
    assert signed_form(signed, "4", OTHER) == signed  # a kept payout is never replaced
