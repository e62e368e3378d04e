"""anvil process handling, state persistence, the addresses file, and revert decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from sogni_chain import Addresses, ChainRevert, Deployment, connect, deploy_all
from sogni_chain.anvil import Anvil
from sogni_chain.errors import ErrorDecoder

from .chain_env import SOGNI, Env, anvil_missing_reason


def test_addresses_save_load_checks_chain_id(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "deploy" / "addresses.json"
    env.addresses.save(path)
    raw = json.loads(path.read_text())
    assert list(raw) == sorted(raw)
    loaded = Addresses.load(path, chain_id=env.chain.chain_id)
    assert loaded == env.addresses
    with pytest.raises(ValueError, match="chain"):
        Addresses.load(path, chain_id=env.chain.chain_id + 1)
    assert Deployment(env.chain, loaded).is_deployed()


def test_deploy_all_wires_roles(env: Env) -> None:
    d = env.d
    assert d.distributor.has_role("SETTLEMENT_ROLE", env.coordinator)
    assert not d.distributor.has_role("SETTLEMENT_ROLE", env.treasury)
    assert d.distributor.has_role("DEFAULT_ADMIN_ROLE", env.treasury)
    assert d.staking.has_role("DEFAULT_ADMIN_ROLE", env.treasury)
    assert d.staking.has_role("SLASHER_ROLE", env.slasher)
    assert d.license.has_role("MINTER_ROLE", env.treasury)
    # roles can be handed over by governance
    d.distributor.grant_role("SETTLEMENT_ROLE", env.relayer)
    assert d.distributor.has_role("SETTLEMENT_ROLE", env.relayer)


def test_anvil_state_survives_restart(tmp_path: Path) -> None:
    reason = anvil_missing_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "anvil-state.json"
    with Anvil(state=state) as node:
        chain = connect(node.url)
        treasury, worker = chain.accounts[0], chain.accounts[1]
        addresses = deploy_all(chain, treasury, path=tmp_path / "addresses.json")
        Deployment(chain, addresses).token.transfer(worker, 42 * SOGNI)
    assert state.is_file() and state.stat().st_size > 0
    with Anvil(state=state) as node:
        chain = connect(node.url)
        loaded = Addresses.load(tmp_path / "addresses.json", chain_id=chain.chain_id)
        d = Deployment(chain, loaded)
        assert d.is_deployed()
        assert d.token.balance_of(chain.accounts[1]) == 42 * SOGNI


def test_two_anvils_get_different_ports() -> None:
    reason = anvil_missing_reason()
    if reason:
        pytest.skip(reason)
    with Anvil() as one, Anvil() as two:
        assert one.url != two.url
        assert one.url.startswith("http://127.0.0.1:")
        assert connect(one.url).chain_id == connect(two.url).chain_id == 31337
    assert not one.running and not two.running


def test_connect_rejects_unknown_urls() -> None:
    with pytest.raises(ValueError):
        connect("ws://127.0.0.1:8545")


def test_revert_decoding_of_strings_panics_and_unknown_errors() -> None:
    dec = ErrorDecoder()
    err = dec.decode(keccak(b"Error(string)")[:4] + abi_encode(["string"], ["nope"]))
    assert (err.reason, err.error) == ("nope", "Error")
    err = dec.decode(keccak(b"Panic(uint256)")[:4] + abi_encode(["uint256"], [0x11]))
    assert err.error == "Panic" and "overflow" in err.reason
    err = dec.decode(b"\xde\xad\xbe\xef")
    assert err.error is None and "0xdeadbeef" in err.reason
    assert dec.decode(b"").reason == "reverted without a reason"
    assert isinstance(err, ChainRevert)
