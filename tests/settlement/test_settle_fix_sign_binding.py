"""The offline settlement key signs what the unsigned file's transaction does, not its labels:
signing refuses a `postRoot` whose calldata or target differs from what the file states, and
submitting refuses a signed transaction that is not the stored plan's `postRoot`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_hash.auto import keccak
from eth_utils import to_checksum_address
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.settlement.epochs import (
    SIGNED_FORMAT,
    SettlementError,
    Settler,
    sign_offline,
)
from sogni_coordinator.store import Store
from sogni_wallet.keystore import create_keystore

from .settle_env import Net, settler, signed_receipt, store_receipts, worker

SELECTOR = keccak(b"postRoot(uint256,bytes32,uint256,bytes32)")[:4]
EVIL_ROOT = b"\xee" * 32
STRANGER = to_checksum_address("0x" + "ab" * 20)


def _calldata(epoch: int, root: bytes, total: int, receipts_hash: bytes) -> str:
    args = abi_encode(
        ["uint256", "bytes32", "uint256", "bytes32"], [epoch, root, total, receipts_hash]
    )
    return "0x" + (SELECTOR + args).hex()


def _planned(net: Net, store: Store, tmp_path: Path) -> tuple[Settler, dict[str, Any]]:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    offline = settler(store, net, tmp_path, sender=net.settler.address)
    planned = offline.close_epoch()
    assert planned is not None and planned.unsigned_tx is not None
    return offline, json.loads(planned.unsigned_tx.read_text())


def _evil(unsigned: dict[str, Any]) -> dict[str, Any]:
    """The file's labels untouched; its transaction posts another root with a huge total."""
    data = _calldata(
        unsigned["epoch"], EVIL_ROOT, 10**27, bytes.fromhex(unsigned["receiptsHash"][2:])
    )
    return {**unsigned, "tx": {**unsigned["tx"], "data": data}}


def test_the_file_names_the_distributor_and_signing_prints_what_is_signed(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _offline, unsigned = _planned(net, store, tmp_path)
    assert unsigned["distributor"] == net.d.distributor.address
    assert unsigned["chainId"] == net.chain.chain_id
    signed = sign_offline(unsigned, bytes(net.settler.key), distributor=net.d.distributor.address)
    assert signed["format"] == SIGNED_FORMAT
    assert (signed["epoch"], signed["root"], signed["total"], signed["receiptsHash"]) == (
        unsigned["epoch"],
        unsigned["root"],
        unsigned["total"],
        unsigned["receiptsHash"],
    )
    assert signed["to"] == net.d.distributor.address and signed["chainId"] == net.chain.chain_id


def test_signing_refuses_calldata_that_is_not_the_labelled_root(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _offline, unsigned = _planned(net, store, tmp_path)
    with pytest.raises(SettlementError, match=r"posts root 0xeeee.*the file states 0x"):
        sign_offline(_evil(unsigned), bytes(net.settler.key))
    other_epoch = _calldata(
        unsigned["epoch"] + 1,
        bytes.fromhex(unsigned["root"][2:]),
        int(unsigned["total"]),
        bytes.fromhex(unsigned["receiptsHash"][2:]),
    )
    with pytest.raises(SettlementError, match="posts epoch 2, the file states 1"):
        sign_offline(
            {**unsigned, "tx": {**unsigned["tx"], "data": other_epoch}}, bytes(net.settler.key)
        )
    grant = "0x2f2ff15d" + unsigned["tx"]["data"][10:]  # another function, same arguments
    with pytest.raises(SettlementError, match="not the distributor's postRoot"):
        sign_offline({**unsigned, "tx": {**unsigned["tx"], "data": grant}}, bytes(net.settler.key))
    with pytest.raises(SettlementError, match="sends 1 wei"):
        sign_offline({**unsigned, "tx": {**unsigned["tx"], "value": 1}}, bytes(net.settler.key))


def test_signing_refuses_another_target_than_the_distributor(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _offline, unsigned = _planned(net, store, tmp_path)
    key = bytes(net.settler.key)
    moved = {**unsigned, "tx": {**unsigned["tx"], "to": STRANGER}}
    with pytest.raises(SettlementError, match=r"is sent to 0x[aA][bB].*not the distributor"):
        sign_offline(moved, key)
    # consistent edits of file and transaction are caught by the distributor the signer knows
    both = {**moved, "distributor": STRANGER}
    with pytest.raises(SettlementError, match="is for distributor"):
        sign_offline(both, key, distributor=net.d.distributor.address)
    unnamed = {k: v for k, v in unsigned.items() if k != "distributor"}
    with pytest.raises(SettlementError, match="names no distributor"):
        sign_offline(unnamed, key)
    assert sign_offline(unnamed, key, distributor=net.d.distributor.address)["raw"]


def test_submit_refuses_a_signed_transaction_that_is_not_the_plan(
    net: Net, store: Store, tmp_path: Path
) -> None:
    offline, unsigned = _planned(net, store, tmp_path)
    honest = sign_offline(unsigned, bytes(net.settler.key))
    account = Account.from_key(bytes(net.settler.key))

    def forged(tx: dict[str, Any]) -> dict[str, Any]:
        """Labels of the plan, a raw transaction signed by the settlement key doing else."""
        raw = account.sign_transaction(tx).raw_transaction
        return {**honest, "raw": "0x" + bytes(raw).hex()}

    with pytest.raises(SettlementError, match=r"posts root 0xeeee.*the plan states"):
        offline.submit_signed(forged(_evil(unsigned)["tx"]))
    with pytest.raises(SettlementError, match="not the distributor"):
        offline.submit_signed(forged({**unsigned["tx"], "to": STRANGER}))
    with pytest.raises(SettlementError, match="not a signed EIP-1559 transaction"):
        offline.submit_signed({**honest, "raw": "0x02c0"})
    with pytest.raises(SettlementError, match="not a signed epoch root transaction"):
        offline.submit_signed({**honest, "format": "something-else"})
    assert net.d.distributor.root_of(1) is None  # nothing was sent
    posted = offline.submit_signed(honest)
    assert posted.posted and net.d.distributor.root_of(1) == posted.root


def test_epoch_sign_cli_refuses_a_tampered_file_in_one_line(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _offline, unsigned = _planned(net, store, tmp_path)
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(_evil(unsigned)))
    keystore = tmp_path / "settlement.json"
    create_keystore(keystore, "pw", kdf_n=2, private_key=bytes(net.settler.key))
    result = CliRunner().invoke(
        coordinator_app,
        ["epoch", "sign", str(tampered), "--keystore", str(keystore)],
        env={"SOGNI_SETTLEMENT_PASSWORD": "pw"},
    )
    assert result.exit_code == 3, result.output
    assert "posts root 0xeeee" in result.output and "Traceback" not in result.output
    assert not tampered.with_suffix(".signed.json").exists()
