"""Daily Boost claims and balance queries: strict decoding and standard EIP-712 signatures."""

import msgspec
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.messages import (
    BalanceReport,
    Balances,
    BoostGranted,
    decode,
    encode,
)

DOMAIN = Domain(131277322940537, "0x" + "ab" * 20)
PAYER = Account.from_key(b"\x02" * 32)
PEER = "12D3KooWclient"


def test_new_messages_round_trip() -> None:
    claim = eip712.sign_boost_claim(PAYER.key, DOMAIN, "2025-06-01")
    query = eip712.sign_balance_query(PAYER.key, DOMAIN, PEER, 1_800_000_000)
    balances = Balances(spark_free=50_000_000, spark_paid=1, sogni=2)
    granted = BoostGranted(
        payer=PAYER.address,
        day="2025-06-01",
        amount_micro=50_000_000,
        balances=balances,
        next_claim_at=1_748_822_400,
    )
    report = BalanceReport(
        payer=PAYER.address,
        balances=balances,
        reserved=Balances(),
        boost_available=False,
        next_boost_at=1_748_822_400,
    )
    for msg in (claim, query, granted, report):
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"day": "2025-6-1"}, "$.day"),
        ({"day": "tomorrow"}, "$.day"),
        ({"payer": "0x1234"}, "$.payer"),
        ({"signature": b"\x00" * 64}, "$.signature"),
        ({"extra": 1}, "`extra`"),
    ],
)
def test_bad_claims_name_the_field(change: dict[str, object], names: str) -> None:
    good = msgspec.msgpack.decode(encode(eip712.sign_boost_claim(PAYER.key, DOMAIN, "2025-06-01")))
    raw = msgspec.msgpack.encode({**good, **change})
    with pytest.raises(InvalidMessage, match=names.replace("$", r"\$").replace(".", r"\.")):
        decode(raw)


def test_balance_query_without_expiry_is_refused() -> None:
    good = msgspec.msgpack.decode(encode(eip712.sign_balance_query(PAYER.key, DOMAIN, PEER, 1)))
    del good["expiry"]
    with pytest.raises(InvalidMessage, match="`expiry`"):
        decode(msgspec.msgpack.encode(good))


def test_claim_is_standard_eip712_and_bound_to_payer_day_and_domain() -> None:
    claim = eip712.sign_boost_claim(PAYER.key, DOMAIN, "2025-06-01")
    assert claim.payer == PAYER.address
    doc = eip712.boost_claim_document(DOMAIN, claim.payer, claim.day)
    signable = encode_typed_data(full_message=doc)
    assert Account.recover_message(signable, signature=claim.signature) == PAYER.address
    assert eip712.check_boost_claim(DOMAIN, claim) is None
    other_day = msgspec.structs.replace(claim, day="2025-06-02")
    other_payer = msgspec.structs.replace(claim, payer="0x" + "11" * 20)
    for bad in (other_day, other_payer):
        assert "not from the payer" in (eip712.check_boost_claim(DOMAIN, bad) or "")
    other_chain = Domain(1, DOMAIN.verifying_contract)
    assert "another chain" in (eip712.check_boost_claim(other_chain, claim) or "")
    broken = msgspec.structs.replace(claim, signature=b"\x00" * 65)
    assert eip712.check_boost_claim(DOMAIN, broken) is not None


def test_balance_query_is_bound_to_peer_and_expiry() -> None:
    query = eip712.sign_balance_query(PAYER.key, DOMAIN, PEER, 2_000)
    doc = eip712.balance_query_document(DOMAIN, query.payer, PEER, 2_000)
    signable = encode_typed_data(full_message=doc)
    assert Account.recover_message(signable, signature=query.signature) == PAYER.address
    assert eip712.check_balance_query(DOMAIN, query, PEER, now=1_000) is None
    assert "another peer id" in (
        eip712.check_balance_query(DOMAIN, query, "12D3other", 1_000) or ""
    )
    assert "expired" in (eip712.check_balance_query(DOMAIN, query, PEER, now=2_001) or "")
    later = msgspec.structs.replace(query, expiry=3_000)  # stretching the expiry breaks it
    assert "not from the payer" in (eip712.check_balance_query(DOMAIN, later, PEER, 1_000) or "")
