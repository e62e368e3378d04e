"""Slashing after failed result checks (docs/SLASHING.md): the settlement key slashes, the
offer key never does, a proposal is slashed at most once, an edited file is refused, and the
stake goes to `slashRecipient`. On the in-process chain (embedded EVM)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from sogni_chain import Addresses, Chain, ChainRevert, Deployment, connect
from sogni_coordinator import chain_cli, slash_cli
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.settlement.slashes import (
    SlashError,
    binding_of,
    prepare,
    sign_offline,
    submit,
    unsigned_path,
)
from sogni_coordinator.store import Store
from sogni_protocol.messages import JobParams
from sogni_wallet.keystore import create_keystore

from .settle_env import Net, signed_receipt

PASSWORD = "slash-test"
SOGNI = 10**18
STAKE = 1_000 * SOGNI
runner = CliRunner()


@dataclass
class Keys:
    offer: LocalAccount  # the coordinator's hot offer key: no role at all
    settlement: LocalAccount  # holds SLASHER_ROLE
    cenv: dict[str, str]


def _stake(net: Net, who: LocalAccount, amount: int = STAKE) -> None:
    net.chain.send_eth(who.address, SOGNI, sender=net.treasury)
    net.d.token.transfer(who.address, amount, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, amount, sender=who)
    net.d.staking.stake(amount, sender=who)


def _failed(store: Store, net: Net, key: LocalAccount, reason: str, evidence: bytes) -> bytes:
    """A receipt of `key` held for a check that failed, as the dispatcher leaves it."""
    r = signed_receipt(key, net.domain)
    params = JobParams(
        model_id=r.receipt.model_id,
        positive_prompt="p",
        steps=r.receipt.steps_done,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )
    request_id = r.receipt.job_id  # any id: one request per job here
    store.add_request(
        request_id,
        model_id=r.receipt.model_id,
        network="fast",
        token_type="spark",
        client_peer="test",
        jobs=[(r.receipt.job_id, params, r.offer.work_units)],
    )
    assert store.store_held_receipt(
        r.receipt, r.signature, request_id, offer=(r.offer, r.offer_signature)
    )
    assert store.fail_held_receipt(r.receipt.job_id, reason, evidence)
    return r.receipt.job_id


@pytest.fixture
def keys(net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    offer, settlement = Account.create(), Account.create()
    create_keystore(tmp_path / "signer.json", PASSWORD, kdf_n=2, private_key=bytes(offer.key))
    create_keystore(
        tmp_path / "settlement.json", PASSWORD, kdf_n=2, private_key=bytes(settlement.key)
    )
    for acct in (offer, settlement):
        net.chain.send_eth(acct.address, SOGNI, sender=net.treasury)
    net.d.staking.grant_role("SLASHER_ROLE", settlement.address, sender=net.treasury)
    addresses = tmp_path / "addresses.json"
    net.d.addresses.save(addresses)
    monkeypatch.setattr(slash_cli, "_chain", lambda cfg, url: net.chain)  # the in-process one
    cenv = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(addresses),
        "SOGNI_COORDINATOR_SETTLEMENT_KEYSTORE": str(tmp_path / "settlement.json"),
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
        "SOGNI_SETTLEMENT_PASSWORD": PASSWORD,
    }
    return Keys(offer, settlement, cenv)


def _cli(args: list[str], env: dict[str, str], code: int = 0) -> str:
    result = runner.invoke(coordinator_app, args, env=env)
    assert result.exit_code == code, (args, result.output, result.exception)
    if code:
        assert "Traceback" not in result.output and result.output.startswith("error: ")
        assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_cli_slash_end_to_end(net: Net, store: Store, tmp_path: Path, keys: Keys) -> None:
    """Failed checks -> proposal -> review -> unsigned tx -> signed offline -> submitted."""
    rogue = Account.create()
    _stake(net, rogue)
    job_ids = [
        _failed(store, net, rogue, f"step {i} does not match", b"x" * (10 + i)) for i in range(5)
    ]
    pid = store.propose_slash(rogue.address, "5 failed result checks", job_ids)
    assert pid is not None
    recipient = net.d.staking.contract.functions.slashRecipient().call()
    before = {
        a: net.d.token.balance_of(a)
        for a in (recipient, keys.offer.address, keys.settlement.address)
    }

    listed = json.loads(_cli(["slash", "list", "--json"], keys.cenv))
    assert [(p["id"], p["failedChecks"], p["state"]) for p in listed] == [(pid, 5, "proposed")]
    assert rogue.address.lower() in _cli(["slash", "list"], keys.cenv)
    shown = json.loads(_cli(["slash", "show", str(pid), "--json"], keys.cenv))
    assert [f["evidenceBytes"] for f in shown["failures"]] == [[10], [11], [12], [13], [14]]
    assert "step 4 does not match" in _cli(["slash", "show", str(pid)], keys.cenv)

    out = json.loads(
        _cli(["slash", "propose-tx", str(pid), "--share-bps", "5000", "--json"], keys.cenv)
    )
    assert (out["staked"], out["amount"]) == (str(STAKE), str(STAKE // 2))
    unsigned = Path(out["unsignedTx"])
    assert unsigned == unsigned_path(tmp_path, pid)
    document = json.loads(unsigned.read_text())
    assert (
        document["reason"] == f"sogni: 5 failed result checks; evidence job 0x{job_ids[-1].hex()}"
    )
    # offline: no config, the settlement keystore named explicitly
    offline_env = {"SOGNI_SETTLEMENT_PASSWORD": PASSWORD}
    keystore = str(tmp_path / "settlement.json")
    _cli(["slash", "sign", str(unsigned), "--keystore", keystore], offline_env)
    signed = unsigned.with_suffix(".signed.json")
    done = json.loads(_cli(["slash", "submit", str(signed), "--json"], keys.cenv))

    assert done["slashed"] == str(STAKE // 2) and done["recipient"] == recipient
    assert net.d.staking.active_stake(rogue.address) == STAKE - STAKE // 2
    assert net.d.token.balance_of(recipient) == before[recipient] + STAKE // 2
    for who in (keys.offer.address, keys.settlement.address):  # the coordinator gets nothing
        assert net.d.token.balance_of(who) == before[who]
    [closed] = store.slash_proposals()
    assert closed.state == "submitted" and done["txHash"] in closed.note
    # a proposal is slashed once: the same signed file again is refused, nothing moves
    err = _cli(["slash", "submit", str(signed)], keys.cenv, code=3)
    assert f"slash proposal {pid} is already submitted (tx " in err
    assert net.d.staking.active_stake(rogue.address) == STAKE - STAKE // 2


def test_the_offer_key_cannot_slash(net: Net, store: Store, tmp_path: Path, keys: Keys) -> None:
    rogue = Account.create()
    _stake(net, rogue)
    with pytest.raises(ChainRevert) as info:  # the contract itself
        net.d.staking.slash(rogue.address, STAKE, "x", sender=keys.offer)
    assert info.value.error == "NotSlasher" and "may not slash" in str(info.value)
    pid = store.propose_slash(rogue.address, "r", [b"\x01" * 32])
    assert pid is not None
    # the library refuses the offer key, and a key without the role, before writing anything
    with pytest.raises(SlashError, match="offer-signing key"):
        prepare(store, net.d, pid, keys.offer.address, tmp_path, offer_address=keys.offer.address)
    with pytest.raises(SlashError, match="lacks SLASHER_ROLE"):
        prepare(store, net.d, pid, Account.create().address, tmp_path)
    assert not unsigned_path(tmp_path, pid).exists()
    # the CLI: a settlement_keystore that holds the offer key is refused, in one line
    same = {**keys.cenv, "SOGNI_COORDINATOR_SETTLEMENT_KEYSTORE": str(tmp_path / "signer.json")}
    err = _cli(["slash", "propose-tx", str(pid)], same, code=3)
    assert "offer-signing key" in err
    unset = {k: v for k, v in keys.cenv.items() if "SETTLEMENT_KEYSTORE" not in k}
    assert "settlement_keystore is not set" in _cli(["slash", "propose-tx", str(pid)], unset, 3)
    # signing with the offer key where the config names it is refused too
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    args = ["slash", "sign", str(unsigned), "--keystore", str(tmp_path / "signer.json")]
    assert "offer-signing key" in _cli([*args, "--config", _toml(tmp_path)], keys.cenv, 3)
    assert net.d.staking.active_stake(rogue.address) == STAKE


def _toml(tmp_path: Path) -> str:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n')
    return str(path)


def test_an_unstaked_wallet_is_dismissed_without_a_tx(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    pid = store.propose_slash(Account.create().address, "r", [b"\x02" * 32])
    assert pid is not None
    block = net.chain.block_number()
    out = _cli(["slash", "propose-tx", str(pid)], keys.cenv)
    assert out.strip().endswith("has nothing staked") and len(out.strip().splitlines()) == 1
    assert net.chain.block_number() == block and not unsigned_path(tmp_path, pid).exists()
    [p] = store.slash_proposals()
    assert (p.state, p.note) == ("dismissed", "nothing staked")
    assert "is already dismissed (nothing staked)" in _cli(
        ["slash", "propose-tx", str(pid)], keys.cenv, 3
    )


def test_a_dismissed_proposal_cannot_be_signed_or_submitted(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    rogue = Account.create()
    _stake(net, rogue)
    pid = store.propose_slash(rogue.address, "r", [b"\x03" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    signed = sign_offline(json.loads(unsigned.read_text()), bytes(keys.settlement.key))
    _cli(["slash", "dismiss", str(pid), "--reason", "disputed: driver bug"], keys.cenv)
    # signing where the database is (config given) checks the proposal is still open
    err = _cli(["slash", "sign", str(unsigned)], keys.cenv, 3)
    assert "is already dismissed (disputed: driver bug)" in err
    with pytest.raises(SlashError, match="dismissed"):
        submit(store, net.d, signed, tmp_path)
    assert net.d.staking.active_stake(rogue.address) == STAKE
    assert "already dismissed" in _cli(
        ["slash", "dismiss", str(pid), "--reason", "again"], keys.cenv, 3
    )
    assert "no slash proposal 99" in _cli(["slash", "show", "99"], keys.cenv, 2)


def test_an_edited_file_is_refused(net: Net, store: Store, tmp_path: Path, keys: Keys) -> None:
    rogue, bystander = Account.create(), Account.create()
    _stake(net, rogue)
    _stake(net, bystander)
    pid = store.propose_slash(rogue.address, "r", [b"\x04" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    original = json.loads(unsigned.read_text())
    key = bytes(keys.settlement.key)

    # the transaction slashes someone else (the fields still say the rogue)
    other = _calldata_for(net, keys, bystander.address, original)
    with pytest.raises(SlashError, match="not the slash the file describes"):
        sign_offline({**original, "tx": {**original["tx"], "data": other["data"]}}, key)
    # the fields and the transaction say another amount, the binding does not
    more = {**original, "amount": str(STAKE * 2)}
    with pytest.raises(SlashError, match="binding"):
        sign_offline(more, key)
    # edited consistently (binding recomputed): signs offline, but submit compares with
    # the file the coordinator wrote and sends nothing
    forged = {
        **original,
        "wallet": bystander.address,
        "tx": {**original["tx"], "data": other["data"]},
        "binding": binding_of(
            pid,
            bystander.address,
            int(original["amount"]),
            original["reason"],
            int(original["chainId"]),
            original["staking"],
            original["from"],
        ),
    }
    signed = sign_offline(forged, key)
    with pytest.raises(SlashError, match="not the slash this coordinator prepared"):
        submit(store, net.d, signed, tmp_path)
    assert net.d.staking.active_stake(bystander.address) == STAKE
    assert store.slash_proposals()[0].state == "proposed"
    # a fee raised on the way (the calldata untouched) would spend the key's ETH: refused
    greedy = {**original, "tx": {**original["tx"], "maxPriorityFeePerGas": 10**15}}
    with pytest.raises(SlashError, match="fee"):
        submit(store, net.d, sign_offline(greedy, key), tmp_path)
    # a file for another proposal cannot pass for this one either
    with pytest.raises(SlashError, match=f"no slash proposal {pid + 1}"):
        submit(store, net.d, {**signed, "proposal": pid + 1}, tmp_path)
    # the untouched file still goes through
    done = submit(store, net.d, sign_offline(original, key), tmp_path)
    assert done.slashed == STAKE and net.d.staking.active_stake(rogue.address) == 0


def _calldata_for(net: Net, keys: Keys, wallet: str, original: dict[str, object]) -> dict[str, str]:
    """The calldata of a slash of `wallet` with the original's amount and reason."""
    fn = net.d.staking.contract.functions.slash(
        wallet, int(str(original["amount"])), str(original["reason"])
    )
    return {"data": fn._encode_transaction_data()}


def test_cli_errors_are_one_line(store: Store, tmp_path: Path) -> None:
    """No chain configured, or an unknown proposal: one line, no traceback."""
    store.propose_slash("0x" + "ab" * 20, "r", [b"\x05" * 32])
    settlement = tmp_path / "settlement.json"
    create_keystore(settlement, PASSWORD, kdf_n=2)
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_SETTLEMENT_KEYSTORE": str(settlement),
    }
    assert "needs a shared chain" in _cli(["slash", "propose-tx", "1"], env, code=2)
    assert "no slash proposal 7" in _cli(["slash", "dismiss", "7", "--reason", "x"], env, 3)
    assert "no slash proposals" not in _cli(["slash", "list"], env)


@pytest.fixture
def fresh_chain(monkeypatch: pytest.MonkeyPatch) -> Iterator[Chain]:
    chain = connect()
    monkeypatch.setattr(chain_cli, "_connect", lambda url: chain)
    yield chain


def test_chain_deploy_grants_slasher_role_to_the_settlement_key(
    tmp_path: Path, fresh_chain: Chain
) -> None:
    offer = create_keystore(tmp_path / "signer.json", PASSWORD, kdf_n=2)
    settlement = create_keystore(tmp_path / "settlement.json", PASSWORD, kdf_n=2)
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_SETTLEMENT_KEYSTORE": str(tmp_path / "settlement.json"),
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
    }
    result = runner.invoke(coordinator_app, ["chain", "deploy"], env=env)
    assert result.exit_code == 0, result.output
    deployed = json.loads(result.stdout)
    assert deployed["slasher"] == settlement and deployed["settler"] == offer
    d = Deployment(fresh_chain, Addresses.load(tmp_path / "addresses.json"))
    assert d.staking.has_role("SLASHER_ROLE", settlement)
    assert not d.staking.has_role("SLASHER_ROLE", offer)
    refused = runner.invoke(
        coordinator_app, ["chain", "deploy", "--force", "--slasher", offer], env=env
    )
    assert refused.exit_code == 3 and "never hold SLASHER_ROLE" in refused.output


def test_a_revert_at_submit_reads_as_one_sentence(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    """The stake went meanwhile (governance slashed it): NothingToSlash, decoded; still open."""
    rogue = Account.create()
    _stake(net, rogue)
    pid = store.propose_slash(rogue.address, "r", [b"\x06" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    _cli(
        ["slash", "sign", str(unsigned), "--keystore", str(tmp_path / "settlement.json")], keys.cenv
    )
    net.d.staking.slash(rogue.address, STAKE, "governance", sender=net.treasury)
    err = _cli(["slash", "submit", str(unsigned.with_suffix(".signed.json"))], keys.cenv, 3)
    assert "the slash was refused" in err and "has no stake to slash" in err
    assert store.slash_proposals()[0].state == "proposed"


def test_a_stale_nonce_reads_as_one_line(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    """The settlement key sent something else after propose-tx: sign again, no traceback."""
    rogue = Account.create()
    _stake(net, rogue)
    pid = store.propose_slash(rogue.address, "r", [b"\x07" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    signed = tmp_path / "stale.signed.json"
    signed.write_text(
        json.dumps(sign_offline(json.loads(unsigned.read_text()), bytes(keys.settlement.key)))
    )
    net.chain.send_eth(net.treasury.address, 1, sender=keys.settlement)  # uses the nonce
    err = _cli(["slash", "submit", str(signed)], keys.cenv, 3)
    assert "run propose-tx and sign again" in err
    assert net.d.staking.active_stake(rogue.address) == STAKE


def test_a_slash_sent_before_a_crash_is_recorded_not_resent(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    rogue = Account.create()
    _stake(net, rogue)
    pid = store.propose_slash(rogue.address, "r", [b"\x08" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    signed = sign_offline(json.loads(unsigned.read_text()), bytes(keys.settlement.key))
    net.chain.send_raw(signed["raw"])  # sent, then the process died before recording it
    done = submit(store, net.d, signed, tmp_path)
    assert done.resumed and done.slashed == STAKE and done.tx_hash == signed["hash"]
    assert store.slash_proposals()[0].state == "submitted"
    assert net.d.staking.active_stake(rogue.address) == 0


def test_submit_refuses_a_key_whose_role_was_revoked(
    net: Net, store: Store, tmp_path: Path, keys: Keys
) -> None:
    """Governance revoked the settlement key's SLASHER_ROLE after signing: nothing is sent."""
    rogue = Account.create()
    _stake(net, rogue)
    pid = store.propose_slash(rogue.address, "r", [b"\x09" * 32])
    assert pid is not None
    unsigned = prepare(store, net.d, pid, keys.settlement.address, tmp_path).path
    assert unsigned is not None
    signed = sign_offline(json.loads(unsigned.read_text()), bytes(keys.settlement.key))
    net.d.staking.revoke_role("SLASHER_ROLE", keys.settlement.address, sender=net.treasury)
    block = net.chain.block_number()
    with pytest.raises(SlashError, match=r"lacks SLASHER_ROLE .*: not sent"):
        submit(store, net.d, signed, tmp_path)
    assert net.chain.block_number() == block and store.slash_proposals()[0].state == "proposed"
