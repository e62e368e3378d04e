"""The gateway's account carries the key account's referral code, a code is applied with
`POST /v1/account/referral` (refusals are one clear line), and the models list puts models
with stake on them (ModelStake.sol, in-process chain) first."""

from __future__ import annotations

from pathlib import Path

import httpx

from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.model_stake import ModelStakeBoard
from sogni_protocol.payout_rules import SOGNI
from tests.e2e.conftest import start_net

from .conftest import create_key

MODELS = ["sdxl-base-1.0", "sogni-shapes-64", "sogni-tiny-sd"]


async def test_referral_codes_over_rest_and_models_ordered_by_stake(tmp_path: Path) -> None:
    async with start_net(tmp_path, models=MODELS) as net:
        url = net.coordinator.http_url
        assert url is not None
        (ka, a), (kb, b), (kc, c) = (create_key(net.config.database, n) for n in "abc")
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def me(key: str) -> dict[str, object]:
                got = (await http.get("/v1/account/me", headers={"api-key": key})).json()
                assert got["status"] == "success"
                data: dict[str, object] = got["data"]
                return data

            async def use(key: str, code: object) -> httpx.Response:
                return await http.post(
                    "/v1/account/referral", headers={"api-key": key}, json={"code": code}
                )

            code_a, code_b = (await me(ka))["referralCode"], (await me(kb))["referralCode"]
            assert isinstance(code_a, str) and code_a != code_b
            assert (await me(ka))["referralCode"] == code_a  # stable
            assert (await me(kb))["referredBy"] is None

            ok = await use(kb, code_a)
            assert ok.status_code == 200 and ok.json()["data"]["referredBy"] == a.lower()
            refusals = {
                "own": await use(ka, code_a),
                "cycle": await use(ka, code_b),
                "second": await use(kb, (await me(kc))["referralCode"]),
                "unknown": await use(kc, "ABCDEFGHIJ"),
                "bad": await use(kc, 42),
            }
            assert {k: r.status_code for k, r in refusals.items()} == dict.fromkeys(refusals, 400)
            messages = {k: r.json()["message"] for k, r in refusals.items()}
            assert "own referral code" in messages["own"]
            assert "cycle" in messages["cycle"]
            assert "already referred" in messages["second"]
            assert "unknown referral code" in messages["unknown"]
            assert '{"code"' in messages["bad"]
            assert all("\n" not in m and "Traceback" not in m for m in messages.values())
            anon = await http.post("/v1/account/referral", json={"code": code_a})
            assert anon.status_code == 401
            # a body over 1 KiB is refused unread (an untyped decode of deep nesting, `[[[...`
            # 200,000 deep, overflowed the C stack under the recursion limit py_ecc sets); one
            # under it is decoded typed; each is one refusal, and the daemon serves on
            for hostile in (b"[" * 500 + b"]" * 500, b'{"code":"' + b"A" * 5000 + b'"}'):
                refused = await http.post(
                    "/v1/account/referral", headers={"api-key": kc}, content=hostile
                )
                assert refused.status_code == 400 and '{"code"' in refused.json()["message"]
            assert (await me(kc))["referredBy"] is None

            ledger = Ledger(net.config.database)
            try:
                assert ledger.referrals()[b.lower()][0] == a.lower()
                assert c.lower() not in ledger.referrals()
            finally:
                ledger.close()

            # models: sorted by name, until stake is put on one
            auth = {"api-key": ka}
            listed = [m["id"] for m in (await http.get("/api/v1/models/list", headers=auth)).json()]
            assert listed == MODELS
            chain = connect()
            treasury, fan = chain.accounts[0], chain.accounts[2]
            addresses = deploy_all(chain, treasury)
            d = Deployment(chain, addresses, sender=treasury)
            assert d.model_stake is not None
            d.token.transfer(fan, 10 * SOGNI)
            d.token.approve(d.model_stake.address, 10 * SOGNI, sender=fan)
            d.model_stake.stake("sogni-tiny-sd", 10 * SOGNI, sender=fan)
            board = ModelStakeBoard(d.model_stake, first_block=addresses.deployed_at_block)
            board.refresh()
            net.coordinator.dispatcher.model_stake = board  # what the service wires
            listed = [m["id"] for m in (await http.get("/api/v1/models/list", headers=auth)).json()]
            assert listed == ["sogni-tiny-sd", "sdxl-base-1.0", "sogni-shapes-64"]
