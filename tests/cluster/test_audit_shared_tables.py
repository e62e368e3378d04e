"""Issue #18 audit: the replay tables of payer authorizations and the API keys are the
network's, in its shared PostgreSQL, and hold under coordinators racing each other.

tests/economics/test_network_id.py shows the replay rule with two coordinators on one
SQLite file, one after the other; here four coordinators (own connections, threads released
at once) admit one signed request on a real PostgreSQL: exactly one reserves it, the others
are refused as replayed, the payer is charged once and the ledger is conserved. A key made
at one coordinator authenticates at another, and a revocation at either is seen at both.
"""

from __future__ import annotations

import time

from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.billing import Billing, Refusal
from sogni_coordinator.ledger import ASSETS, Ledger, reserved_account
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import RenderRequest
from tests.postgres._helpers import as_coordinator as _as
from tests.postgres._helpers import together as _together

DOMAIN = Domain(31337, "0x" + "d1" * 20)
NETWORK = "sogni-audit"
SPARK = 1_000_000


def test_one_authorization_raced_at_four_coordinators_is_spent_once(pg_url: str) -> None:
    payer = Account.create()
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(payer.address, 10)
    finally:
        ledger.close()
    request = RenderRequest(
        model_id="sdxl-base-1.0",
        positive_prompt="a lighthouse",
        steps=20,
        width=1024,
        height=1024,
        number_of_images=2,
    )
    signed = authorize(request, payer.key, DOMAIN, network_id=NETWORK)
    rid = eip712.request_hash(signed)

    def admit(i: int) -> str:
        coordinator = Ledger(_as(pg_url, f"c{i}"))
        try:
            billing = Billing(coordinator, DOMAIN, network_id=NETWORK, clock=time.time)
            try:
                billing.admit(signed, rid)
            except Refusal as refusal:
                return refusal.code
            return "admitted"
        finally:
            coordinator.close()

    outcomes = _together(4, admit)
    assert sorted(outcomes) == ["admitted", "replayed", "replayed", "replayed"]
    ledger = Ledger(pg_url)
    try:
        assert ledger.balance(payer.address)["spark_paid"] == 8 * SPARK  # held once
        assert ledger.balance(reserved_account(rid))["spark_paid"] == 2 * SPARK
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)  # double-entry: nothing made
        # the authorization row is the network's: a fifth coordinator, later, refuses it too
        late = Billing(ledger, DOMAIN, network_id=NETWORK, clock=time.time)
        try:
            late.admit(signed, rid)
            raise AssertionError("a spent authorization was admitted again")
        except Refusal as refusal:
            assert refusal.code == "replayed"
    finally:
        ledger.close()


def test_an_api_key_and_its_revocation_are_seen_by_every_coordinator(pg_url: str) -> None:
    a, b = ApiKeys(_as(pg_url, "a")), ApiKeys(_as(pg_url, "b"))
    try:
        key, account = a.create("app", daily_limit_spark=2)
        seen = b.lookup(key)
        assert seen is not None and not seen.revoked and seen.account.lower() == account.lower()
        assert b.revoke(seen.key_id)
        again = a.lookup(key)
        assert again is not None and again.revoked  # the gateway refuses a revoked key
        assert not a.revoke(seen.key_id)  # once, network-wide
    finally:
        a.close()
        b.close()
