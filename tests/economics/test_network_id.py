"""A payer's signature is good on one network only, and spent once across it.

Render authorizations and Daily Boost claims name the network (the ledger its coordinators
share) and are signed for its distributor (the EIP-712 verifying contract). On real SQLite
with real signatures: a coordinator of another network refuses them naming both networks;
two coordinators of one network (two `Billing`s over two `Ledger`s on one database file) spend
an authorization and a day's boost once between them; a signature under another distributor
is refused; the v2 typed data recovers to the payer with eth-account; and the `sogni` app
signs for the coordinator's network (option, env, or the local coordinator's file) and shows
a wrong-network refusal as one line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

import sogni_app.api as api
from sogni_app.api import (
    DEFAULT_NETWORK_ID,
    AccountRefused,
    RenderRefused,
    RenderResult,
    authorize,
    claim_daily_boost_sync,
)
from sogni_app.cli import app, resolve_network_id
from sogni_coordinator.billing import Billing, Refusal
from sogni_coordinator.ledger import Ledger, reserved_account, utc_day
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import DailyBoostClaim, Message, RenderRequest
from sogni_wallet.keystore import create_keystore, load_wallet

SPARK = 1_000_000  # micro
DOMAIN = Domain(31337, "0x" + "d1" * 20)
OTHER_DISTRIBUTOR = Domain(31337, "0x" + "e2" * 20)
NET_A, NET_B = "sogni-a", "sogni-b"
NOON = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC).timestamp()
PEER = "12D3KooWRaBpx83oLDDzPxmddxTKX7qY3Xe6TrCWXwrQraqhJM1C"  # a valid peer id, never dialed
ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def _request(n: int = 1) -> RenderRequest:
    """`n` SDXL-class images at 1 Spark each."""
    return RenderRequest(
        model_id="sdxl-base-1.0",
        positive_prompt="a lighthouse",
        steps=20,
        width=1024,
        height=1024,
        number_of_images=n,
    )


@pytest.fixture
def payer() -> LocalAccount:
    acct: LocalAccount = Account.create()
    return acct


@pytest.fixture
def open_billing(tmp_path: Path) -> Iterator[Callable[..., Billing]]:
    """`open_billing(network_id, db="x.db")`: one coordinator's billing over its own
    `Ledger` on `tmp_path/db` (two calls with one file: two coordinators of one ledger), its
    clock at `NOON` (2025-06-01 12:00 UTC) unless given one."""
    ledgers: list[Ledger] = []

    def open_(
        network_id: str, db: str = "ledger.db", clock: Callable[[], float] = lambda: NOON
    ) -> Billing:
        ledger = Ledger(tmp_path / db)
        ledgers.append(ledger)
        return Billing(ledger, DOMAIN, network_id=network_id, clock=clock)

    yield open_
    for ledger in ledgers:
        ledger.close()


def _admit(billing: Billing, signed: RenderRequest) -> int:
    """What `Dispatcher.submit` does with a paid request: reserve under the signed hash."""
    return billing.admit(signed, eip712.request_hash(signed))


# --- another network -------------------------------------------------------------------------
def test_a_request_authorized_for_another_network_is_refused_naming_both(
    open_billing: Callable[..., Billing], payer: LocalAccount
) -> None:
    b = open_billing(NET_B, clock=time.time)  # authorize() signs for ten minutes from now
    b.ledger.credit_purchase(payer.address, 5)
    signed = authorize(_request(), payer.key, DOMAIN, network_id=NET_A)
    assert signed.network_id == NET_A
    with pytest.raises(Refusal) as info:
        _admit(b, signed)
    assert info.value.code == "unauthorized"
    assert f"network {NET_A!r}" in info.value.reason and f"serves {NET_B!r}" in info.value.reason
    # relabelled for B after signing: the signature names A, so it is not the payer's for B
    relabelled = msgspec.structs.replace(signed, network_id=NET_B)
    with pytest.raises(Refusal, match="not from the payer") as forged:
        _admit(b, relabelled)
    assert forged.value.code == "unauthorized"
    assert b.ledger.balance(payer.address)["spark_paid"] == 5 * SPARK  # nothing reserved
    assert b.ledger.open_reservations() == []
    # signed for B, it is accepted
    assert _admit(b, authorize(_request(), payer.key, DOMAIN, network_id=NET_B)) == SPARK


def test_a_boost_claim_for_another_network_is_refused_naming_both(
    open_billing: Callable[..., Billing], payer: LocalAccount
) -> None:
    b = open_billing(NET_B)
    claim = eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_A)
    with pytest.raises(Refusal) as info:
        b.claim_boost(claim)
    assert info.value.code == "unauthorized"
    assert f"network {NET_A!r}" in info.value.reason and f"serves {NET_B!r}" in info.value.reason
    with pytest.raises(Refusal, match="not from the payer"):
        b.claim_boost(msgspec.structs.replace(claim, network_id=NET_B))
    assert b.ledger.balances() == {}  # nothing granted
    granted = b.claim_boost(eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_B))
    assert granted.balances.spark_free == 50 * SPARK


def test_the_default_network_is_a_local_coordinators(
    open_billing: Callable[..., Billing], payer: LocalAccount
) -> None:
    """Unnamed on both sides, the network is `sogni-local` (the coordinator's default)."""
    b = Billing(open_billing(NET_A).ledger, DOMAIN)
    assert b.network_id == DEFAULT_NETWORK_ID == "sogni-local"
    b.ledger.credit_purchase(payer.address, 1)
    assert _admit(b, authorize(_request(), payer.key, DOMAIN)) == SPARK
    today = utc_day(time.time())
    assert b.claim_boost(eip712.sign_boost_claim(payer.key, DOMAIN, today)).amount_micro


# --- one network, two coordinators, one ledger ---------------------------------------------
@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param(lambda _signed: os.urandom(32), id="own-request-ids"),
        pytest.param(eip712.request_hash, id="signed-hash-as-dispatch"),
    ],
)
def test_an_authorization_spent_at_one_coordinator_is_replayed_at_the_other(
    open_billing: Callable[..., Billing],
    payer: LocalAccount,
    request_id: Callable[[RenderRequest], bytes],
) -> None:
    first = open_billing(NET_A, "net.db", clock=time.time)
    second = open_billing(NET_A, "net.db", clock=time.time)
    assert first.ledger is not second.ledger
    first.ledger.credit_purchase(payer.address, 10)
    signed = authorize(_request(2), payer.key, DOMAIN, network_id=NET_A)
    rid = request_id(signed)
    assert first.admit(signed, rid) == 2 * SPARK
    with pytest.raises(Refusal) as info:
        second.admit(signed, request_id(signed))
    assert info.value.code == "replayed" and "already submitted" in info.value.reason
    first.finish(rid)  # the request ends at the first: refunded there...
    with pytest.raises(Refusal) as again:  # ...and the authorization is still spent
        second.admit(signed, request_id(signed))
    assert again.value.code == "replayed"
    assert second.ledger.balance(payer.address)["spark_paid"] == 10 * SPARK
    assert sum(second.ledger.balance(reserved_account(rid)).values()) == 0


def test_a_daily_boost_claimed_at_one_coordinator_is_refused_at_the_other(
    open_billing: Callable[..., Billing], payer: LocalAccount
) -> None:
    first, second = open_billing(NET_A, "net.db"), open_billing(NET_A, "net.db")
    claim = eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_A)
    assert first.claim_boost(claim).amount_micro == 50 * SPARK
    for signed in (claim, eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_A)):
        with pytest.raises(Refusal) as info:  # the same claim, or a fresh one for the day
            second.claim_boost(signed)
        assert info.value.code == "already_claimed"
        assert "next claim opens at 2025-06-02T00:00:00Z" in info.value.reason
    assert second.ledger.balance(payer.address)["spark_free"] == 50 * SPARK  # granted once
    second.clock = lambda: NOON + 12 * 3600  # the next UTC day, at the other coordinator
    next_day = eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-02", NET_A)
    assert second.claim_boost(next_day).balances.spark_free == 100 * SPARK


def test_a_coordinator_of_another_network_has_its_own_ledger(
    open_billing: Callable[..., Billing], payer: LocalAccount
) -> None:
    """The same payer's boost on A says nothing about B (another ledger, another network)."""
    a, b = open_billing(NET_A, "a.db"), open_billing(NET_B, "b.db")
    assert a.claim_boost(eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_A))
    assert b.claim_boost(eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_B))


# --- another distributor -------------------------------------------------------------------
@pytest.mark.parametrize(
    "foreign",
    [OTHER_DISTRIBUTOR, Domain(1, DOMAIN.verifying_contract)],
    ids=["other-distributor", "other-chain"],
)
def test_a_signature_under_another_domain_is_refused(
    open_billing: Callable[..., Billing], payer: LocalAccount, foreign: Domain
) -> None:
    b = open_billing(NET_A)
    b.ledger.credit_purchase(payer.address, 5)
    b.clock = time.time  # for the request: authorize() signs for ten minutes from now
    where = f"chain {DOMAIN.chain_id}, {DOMAIN.verifying_contract}"  # says what to sign for
    with pytest.raises(Refusal) as info:
        _admit(b, authorize(_request(), payer.key, foreign, network_id=NET_A))
    assert info.value.code == "unauthorized" and where in info.value.reason
    b.clock = lambda: NOON
    with pytest.raises(Refusal) as boost:
        b.claim_boost(eip712.sign_boost_claim(payer.key, foreign, "2025-06-01", NET_A))
    assert boost.value.code == "unauthorized" and where in boost.value.reason
    assert b.ledger.balance(payer.address) == {"spark_free": 0, "spark_paid": 5 * SPARK, "sogni": 0}
    assert b.ledger.open_reservations() == []


# --- the typed data, checked with eth-account ----------------------------------------------
def _domain_v2(domain: Domain) -> dict[str, Any]:
    return {
        "name": "SogniSupernet",
        "version": eip712.DOMAIN_VERSION,
        "chainId": domain.chain_id,
        "verifyingContract": domain.verifying_contract,
    }


_EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def _recover(document: dict[str, Any], signature: bytes) -> str:
    return str(
        Account.recover_message(encode_typed_data(full_message=document), signature=signature)
    )


def test_v2_render_authorization_recovers_to_the_payer_with_eth_account(
    payer: LocalAccount,
) -> None:
    signed = authorize(_request(), payer.key, DOMAIN, network_id=NET_A)
    assert signed.payer_signature is not None
    written_out: dict[str, Any] = {  # the v2 layout, written out here, not taken from eip712
        "domain": _domain_v2(DOMAIN),
        "types": {
            "EIP712Domain": _EIP712_DOMAIN,
            "RenderAuthorization": [
                {"name": "payer", "type": "address"},
                {"name": "requestHash", "type": "bytes32"},
                {"name": "expiry", "type": "uint64"},
                {"name": "networkId", "type": "string"},
            ],
        },
        "primaryType": "RenderAuthorization",
        "message": {
            "payer": payer.address,
            "requestHash": "0x" + eip712.request_hash(signed).hex(),
            "expiry": signed.expiry,
            "networkId": NET_A,
        },
    }
    assert _recover(written_out, signed.payer_signature) == payer.address
    document = eip712.authorization_document(DOMAIN, signed)  # what the coordinator checks
    assert document["domain"]["version"] == eip712.DOMAIN_VERSION == "4"
    assert document["message"]["networkId"] == NET_A
    assert _recover(document, signed.payer_signature) == payer.address
    # eth-account signs the same document to the same bytes (RFC 6979)
    ours = Account.sign_message(encode_typed_data(full_message=written_out), payer.key)
    assert bytes(ours.signature) == signed.payer_signature
    # the network is signed: read for B, the signature is someone else's
    written_out["message"]["networkId"] = NET_B
    assert _recover(written_out, signed.payer_signature) != payer.address


def test_v2_daily_boost_claim_recovers_to_the_payer_with_eth_account(
    payer: LocalAccount,
) -> None:
    claim = eip712.sign_boost_claim(payer.key, DOMAIN, "2025-06-01", NET_A)
    written_out: dict[str, Any] = {
        "domain": _domain_v2(DOMAIN),
        "types": {
            "EIP712Domain": _EIP712_DOMAIN,
            "DailyBoostClaim": [
                {"name": "payer", "type": "address"},
                {"name": "day", "type": "string"},
                {"name": "networkId", "type": "string"},
            ],
        },
        "primaryType": "DailyBoostClaim",
        "message": {"payer": payer.address, "day": "2025-06-01", "networkId": NET_A},
    }
    assert _recover(written_out, claim.signature) == payer.address
    document = eip712.boost_claim_document(DOMAIN, claim.payer, claim.day, claim.network_id)
    assert document["types"]["DailyBoostClaim"] == written_out["types"]["DailyBoostClaim"]
    assert _recover(document, claim.signature) == payer.address
    written_out["message"]["networkId"] = NET_B
    assert _recover(written_out, claim.signature) != payer.address
    under_other_distributor = {**written_out, "domain": _domain_v2(OTHER_DISTRIBUTOR)}
    under_other_distributor["message"] = {**written_out["message"], "networkId": NET_A}
    assert _recover(under_other_distributor, claim.signature) != payer.address


# --- the app: which network it signs for ---------------------------------------------------
def test_authorize_names_the_network_and_refuses_a_malformed_one(payer: LocalAccount) -> None:
    assert authorize(_request(), payer.key, DOMAIN).network_id == DEFAULT_NETWORK_ID
    own = msgspec.structs.replace(_request(), network_id=NET_B)
    assert authorize(own, payer.key, DOMAIN).network_id == NET_B  # None keeps the request's
    assert authorize(own, payer.key, DOMAIN, network_id=NET_A).network_id == NET_A
    for bad in ("", "Sogni-Main", "-x", "a" * 65, "sogni main"):
        with pytest.raises(ValueError, match="network id"):
            authorize(_request(), payer.key, DOMAIN, network_id=bad)


def _local_coordinator(home: Path, **info: Any) -> None:
    local = home / ".sogni" / "coordinator" / "coordinator.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps({"peerId": PEER, "addrs": [ADDR], **info}))


def test_network_id_from_the_option_else_the_local_coordinator_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_network_id(ADDR, None) == DEFAULT_NETWORK_ID  # no local coordinator
    _local_coordinator(tmp_path, chainId=31337, verifyingContract=DOMAIN.verifying_contract)
    assert resolve_network_id(ADDR, None) == DEFAULT_NETWORK_ID  # a file without networkId
    _local_coordinator(tmp_path, networkId=NET_B)
    assert resolve_network_id(ADDR, None) == NET_B
    assert resolve_network_id(ADDR, NET_A) == NET_A  # the option wins
    other = "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWsomeoneelse"
    assert resolve_network_id(other, None) == DEFAULT_NETWORK_ID  # the file is not about it
    result = CliRunner().invoke(
        app,
        ["boost", "--coordinator", ADDR, "--network-id", "Not Valid"],
        env={"SOGNI_DEBUG": None},
    )
    assert result.exit_code == 2 and "--network-id" in result.output
    assert "network id 'Not Valid' is not" in result.output


@pytest.fixture
def wired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_billing: Callable[..., Billing]
) -> Billing:
    """The app's transport replaced by a coordinator of network B in this process: what it
    signs reaches a real `Billing`, and a refusal comes back as `serve_client` sends it."""
    billing = open_billing(NET_B, clock=time.time)

    @asynccontextmanager
    async def no_host(**_kw: Any) -> AsyncIterator[None]:
        yield None

    async def render_here(_host: Any, _addr: str, request: RenderRequest, *_rest: Any) -> Any:
        rid = eip712.request_hash(request)
        try:
            cost = billing.admit(request, rid)
        except Refusal as exc:
            raise RenderRefused(exc.code, exc.reason) from None
        billing.finish(rid)
        return RenderResult(rid, cost_micro=cost)

    async def ask_here(_addr: str, build: Callable[[Any], Message], *_rest: Any) -> Any:
        claim = build(None)
        assert isinstance(claim, DailyBoostClaim)
        try:
            return billing.claim_boost(claim)
        except Refusal as exc:
            raise AccountRefused(exc.code, exc.reason) from None

    monkeypatch.setattr(api, "open_host", no_host)
    monkeypatch.setattr(api, "_render", render_here)
    monkeypatch.setattr(api, "_ask", ask_here)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("SOGNI_DEBUG", "SOGNI_NETWORK_ID", "SOGNI_CHAIN_ID", "SOGNI_VERIFYING_CONTRACT"):
        monkeypatch.delenv(var, raising=False)
    create_keystore(tmp_path / "payer.json", "pw", kdf_n=2)
    return billing


def _sogni(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    keystore = ["--keystore", str(tmp_path / "payer.json")]
    return CliRunner().invoke(
        app,
        [*args, "--coordinator", ADDR, *keystore],
        env={"SOGNI_PASSWORD": "pw", **(env or {})},
    )


def test_the_api_claims_the_boost_for_the_network_it_is_given(
    wired: Billing, payer: LocalAccount
) -> None:
    with pytest.raises(AccountRefused) as info:  # the default network is not B's
        claim_daily_boost_sync(ADDR, payer.key, domain=DOMAIN)
    assert info.value.code == "unauthorized" and f"serves {NET_B!r}" in info.value.reason
    granted = claim_daily_boost_sync(ADDR, payer.key, domain=DOMAIN, network_id=NET_B)
    assert granted.payer == payer.address and granted.amount_micro == 50 * SPARK


def test_sogni_boost_signs_for_the_local_coordinators_network(
    wired: Billing, tmp_path: Path
) -> None:
    _local_coordinator(
        tmp_path, chainId=DOMAIN.chain_id, verifyingContract=DOMAIN.verifying_contract
    )
    refused = _sogni(tmp_path, "boost")  # an older file without networkId: the default
    assert refused.exit_code == 3, refused.output
    line = refused.stderr
    assert line.count("\n") == 1 and "Traceback" not in line
    assert line.startswith("error: the coordinator refused: unauthorized: ")
    assert f"network {DEFAULT_NETWORK_ID!r}" in line and f"serves {NET_B!r}" in line
    assert "--network-id" in line  # and what to do about it
    _local_coordinator(
        tmp_path,
        chainId=DOMAIN.chain_id,
        verifyingContract=DOMAIN.verifying_contract,
        networkId=NET_B,
    )
    granted = _sogni(tmp_path, "boost", "--json")
    assert granted.exit_code == 0, granted.output
    assert json.loads(granted.stdout)["amountMicro"] == 50 * SPARK


def test_sogni_render_signs_for_the_network_option_and_shows_a_refusal_as_one_line(
    wired: Billing, tmp_path: Path
) -> None:
    wired.ledger.credit_purchase(load_wallet(tmp_path / "payer.json", "pw").address, 3)
    domain = ["--chain-id", str(DOMAIN.chain_id), "--verifying-contract", DOMAIN.verifying_contract]
    render = ["render", "a fox", "--model", "sdxl-base-1.0", "--width", "1024", "--height", "1024"]
    args = [*render, "--steps", "20", "--out", str(tmp_path / "out"), *domain]
    refused = _sogni(tmp_path, *args, "--network-id", NET_A)
    assert refused.exit_code == 3, refused.output
    line = refused.stderr.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("error: the coordinator refused: unauthorized: ")
    assert f"network {NET_A!r}" in line and f"serves {NET_B!r}" in line
    assert "--network-id" in line and "Traceback" not in refused.output
    assert isinstance(refused.exception, SystemExit)
    assert wired.ledger.open_reservations() == []
    paid = _sogni(tmp_path, *args, env={"SOGNI_NETWORK_ID": NET_B})  # from the environment
    assert paid.exit_code == 0, paid.output
    assert "1.000000 spark reserved" in paid.stdout  # accepted on the network it names
