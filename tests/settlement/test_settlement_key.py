"""The settlement key is not the offer key, and may stay offline: epochs are planned online,
their `postRoot` signed elsewhere, then submitted; each step refuses the wrong input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.settlement.epochs import SettlementError, sign_offline
from sogni_coordinator.settlement.keys import settlement_sender
from sogni_coordinator.store import Store
from sogni_protocol.cli_errors import Refused
from sogni_protocol.epoch_audit import audit_folder
from sogni_wallet.keystore import create_keystore

from .settle_env import Net, settler, signed_receipt, store_receipts, worker

PASSWORD = "settlement-key-test"


def test_an_offline_key_signs_the_root_that_was_planned_online(
    net: Net, store: Store, tmp_path: Path
) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    offline = settler(store, net, tmp_path, sender=net.settler.address)  # an address only
    planned = offline.close_epoch()
    assert planned is not None and not planned.posted and planned.unsigned_tx is not None
    assert net.d.distributor.root_of(1) is None  # nothing posted without the key
    again = offline.close_epoch()  # the timer ticks again: same plan, still waiting
    assert again is not None and again.epoch == 1 and not again.posted

    unsigned = json.loads(planned.unsigned_tx.read_text())
    assert (unsigned["epoch"], unsigned["root"]) == (1, "0x" + planned.root.hex())
    signed = sign_offline(unsigned, bytes(net.settler.key))  # no chain needed
    posted = offline.submit_signed(signed)
    assert posted.posted and posted.tx_hash is not None
    assert net.d.distributor.root_of(1) == planned.root
    assert audit_folder(tmp_path / "epochs").ok
    with pytest.raises(SettlementError, match="no planned epoch awaits"):
        offline.submit_signed(signed)


def test_the_offline_signature_must_be_the_settlement_keys_and_for_this_root(
    net: Net, store: Store, tmp_path: Path
) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    offline = settler(store, net, tmp_path, sender=net.settler.address)
    planned = offline.close_epoch()
    assert planned is not None and planned.unsigned_tx is not None
    unsigned = json.loads(planned.unsigned_tx.read_text())
    with pytest.raises(SettlementError, match="not from this key"):
        sign_offline(unsigned, bytes(Account.create().key))
    signed = sign_offline(unsigned, bytes(net.settler.key))
    with pytest.raises(SettlementError, match="awaits: sign the current unsigned file"):
        offline.submit_signed({**signed, "root": "0x" + "11" * 32})
    assert net.d.distributor.root_of(1) is None


def test_a_key_without_the_settlement_role_cannot_post(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """Whoever steals the offer key (no SETTLEMENT_ROLE) still cannot post a root."""
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    intruder = Account.create()
    net.chain.send_eth(intruder.address, 10**18, sender=net.treasury)
    with pytest.raises(SettlementError, match="failed"):
        settler(store, net, tmp_path, sender=net.chain.add_key(bytes(intruder.key))).close_epoch()
    assert net.d.distributor.root_of(1) is None


def _cfg(tmp_path: Path, chain_id: int, settlement: Path | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path,
        chain_id=chain_id,
        billing="required",
        settlement_keystore=settlement,
        settlement_password_env="TEST_SETTLEMENT_PASSWORD",
    )


def test_which_key_settles(net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offer = Account.create()
    offer_key = bytes(offer.key)
    # a local network: the coordinator key may settle
    local = settlement_sender(
        _cfg(tmp_path, 31337, None), net.chain, offer.address, lambda: offer_key
    )
    assert not isinstance(local, str) and local.address == offer.address
    # elsewhere: a separate key is required ...
    with pytest.raises(Refused, match="may not also post epoch roots"):
        settlement_sender(_cfg(tmp_path, 8453, None), net.chain, offer.address, lambda: offer_key)
    # ... and not the offer key under another name
    same = tmp_path / "same.json"
    create_keystore(same, PASSWORD, kdf_n=2, private_key=offer_key)
    with pytest.raises(Refused, match="holds the offer-signing key"):
        settlement_sender(_cfg(tmp_path, 8453, same), net.chain, offer.address, lambda: offer_key)
    # a separate key: offline (its address) without its password, online with it
    separate = tmp_path / "settlement.json"
    address = create_keystore(separate, PASSWORD, kdf_n=2)
    monkeypatch.delenv("TEST_SETTLEMENT_PASSWORD", raising=False)
    cfg = _cfg(tmp_path, 8453, separate)
    assert settlement_sender(cfg, net.chain, offer.address, lambda: offer_key) == address
    monkeypatch.setenv("TEST_SETTLEMENT_PASSWORD", PASSWORD)
    online = settlement_sender(cfg, net.chain, offer.address, lambda: offer_key)
    assert not isinstance(online, str) and online.address == address


def test_epoch_sign_cli_works_offline_and_refuses_a_wrong_key(
    net: Net, store: Store, tmp_path: Path
) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    planned = settler(store, net, tmp_path, sender=net.settler.address).close_epoch()
    assert planned is not None and planned.unsigned_tx is not None
    keystore = tmp_path / "settlement.json"
    create_keystore(keystore, PASSWORD, kdf_n=2, private_key=bytes(net.settler.key))
    env = {"SOGNI_SETTLEMENT_PASSWORD": PASSWORD}
    runner = CliRunner()
    args = ["epoch", "sign", str(planned.unsigned_tx), "--keystore", str(keystore)]
    result = runner.invoke(coordinator_app, args, env=env)
    assert result.exit_code == 0, result.output
    signed = json.loads(planned.unsigned_tx.with_suffix(".signed.json").read_text())
    assert signed["from"] == net.settler.address and signed["raw"].startswith("0x")
    distributor = net.d.addresses.distributor  # what was signed, decoded, is shown
    assert f"to distributor {signed['to']}" in result.output and signed["to"] == distributor
    elsewhere = "0x" + "44" * 20  # the operator names its distributor: another is refused
    result = runner.invoke(coordinator_app, [*args, "--distributor", elsewhere], env=env)
    assert result.exit_code == 3 and "not " + elsewhere in result.output

    wrong = tmp_path / "wrong.json"
    create_keystore(wrong, PASSWORD, kdf_n=2)
    result = runner.invoke(coordinator_app, [*args[:3], "--keystore", str(wrong)], env=env)
    assert result.exit_code == 3 and "not from this key" in result.output
    assert "Traceback" not in result.output
