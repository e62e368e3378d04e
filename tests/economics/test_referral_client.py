"""Referral codes from the client side, against a running coordinator on 127.0.0.1: the
Python API (signed `ReferralQuery`) and the `sogni referral code|use` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from eth_account import Account

from sogni_app.api import AccountRefused, referral
from sogni_coordinator.ledger import Ledger
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL
from sogni_protocol.messages import RequestRefused
from sogni_protocol.referral_signing import sign_referral_query
from sogni_wallet.keystore import create_keystore
from tests.e2e.conftest import run_sogni, start_net


async def test_referral_codes_over_the_client_protocol_and_cli(tmp_path: Path) -> None:
    a, b = Account.create(), Account.create()
    ka, kb = bytes(a.key), bytes(b.key)
    home = tmp_path / "home"
    keystore = home / ".sogni" / "client" / "payer.json"
    c_address = create_keystore(keystore, "pw", kdf_n=2**14)
    async with start_net(tmp_path) as net:
        with trio.fail_after(60):
            mine = await referral(net.addr, ka, domain=net.domain)
            assert mine.payer == a.address and mine.referred_by is None
            assert (await referral(net.addr, ka, domain=net.domain)).code == mine.code

            used = await referral(net.addr, kb, mine.code.lower(), domain=net.domain)
            assert used.referred_by == a.address.lower() and used.code != mine.code
            for key, code, why in [
                (ka, mine.code, "own referral code"),
                (ka, used.code, "cycle"),
                (kb, mine.code, "already referred"),
                (kb, "ZZZZZZZZZZ", "unknown referral code"),
            ]:
                with pytest.raises(AccountRefused) as refused:
                    await referral(net.addr, key, code, domain=net.domain)
                assert refused.value.code == "referral_refused" and why in refused.value.reason

            async with open_host(key_path=None, listen=()) as thief:  # a copied query
                q = sign_referral_query(kb, net.domain, peer_id="12D3KooWelse", expiry=2**40)
                channel = await thief.open_channel(net.addr, CLIENT_PROTOCOL)
                await channel.send(q)
                answer = await channel.receive(timeout=10)
                assert isinstance(answer, RequestRefused) and answer.code == "unauthorized"

        explicit = [
            f"--coordinator={net.addr}",
            f"--chain-id={net.domain.chain_id}",
            f"--verifying-contract={net.domain.verifying_contract}",
        ]
        # `sogni referral use` prints the payer's own code too (as `sogni referral code` does)
        rc, out, err = await run_sogni(
            home, "referral", "use", used.code, *explicit, "--json", password="pw"
        )
        assert rc == 0, err
        shown = json.loads(out)
        assert shown["payer"] == c_address and shown["referredBy"] == b.address.lower()
        assert len(shown["code"]) == 10 and shown["code"] not in (mine.code, used.code)
        rc, out, err = await run_sogni(home, "referral", "use", "bad!", *explicit, password="pw")
        assert rc == 3 and "not a referral code" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1

    ledger = Ledger(net.config.database)
    try:
        chain = ledger.referrals()
        assert chain[b.address.lower()][0] == a.address.lower()
        assert chain[c_address.lower()][0] == b.address.lower()
    finally:
        ledger.close()
