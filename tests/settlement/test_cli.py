"""The CLIs end to end on anvil: deploy, close, show, then the node audits, claims and stakes.

Runs in-process (typer's runner) against a shared anvil, the setup for separate processes;
skipped when anvil is not installed. The embedded-only checks run everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_chain import Addresses, Deployment, anvil_dev_keys, connect, deploy_all
from sogni_chain.anvil import Anvil, find_anvil
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.store import Store
from sogni_node.cli import app as node_app
from sogni_node.journal import Journal
from sogni_protocol.catalog import load_catalog
from sogni_protocol.eip712 import Domain
from sogni_wallet.keystore import create_keystore, keystore_address

from .settle_env import signed_receipt, store_receipts, worker

PASSWORD = "settlement-test"
runner = CliRunner()


def _run(app: object, args: list[str], env: dict[str, str], code: int = 0) -> str:
    result = runner.invoke(app, args, env=env)  # type: ignore[arg-type]
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.stdout


@pytest.fixture
def anvil_url(_anvil: Anvil) -> Iterator[str]:
    chain = connect(_anvil.url)
    snap = chain.snapshot()
    try:
        yield _anvil.url
    finally:
        chain.revert(snap)


def test_cli_deploy_close_show_rewards_claim_stake(anvil_url: str, tmp_path: Path) -> None:
    cdir, ndir = tmp_path / "coordinator", tmp_path / "node"
    addresses_file = cdir / "addresses.json"
    create_keystore(cdir / "signer.json", PASSWORD, kdf_n=2)
    cenv = {
        "SOGNI_COORDINATOR_DATA_DIR": str(cdir),
        "SOGNI_COORDINATOR_PASSWORD": PASSWORD,
        "SOGNI_COORDINATOR_CHAIN_URL": anvil_url,
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(addresses_file),  # not there yet
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
    }
    deployed = json.loads(_run(coordinator_app, ["chain", "deploy"], cenv))
    addresses = Addresses.load(addresses_file)
    assert deployed["distributor"] == addresses.distributor
    _run(coordinator_app, ["chain", "deploy"], cenv, code=3)  # refuses to redeploy over it
    domain = Domain(addresses.chain_id, addresses.distributor)
    _season_prizes_can_be_authorised(anvil_url, addresses, cdir, cenv)

    node = worker(1)
    create_keystore(ndir / "wallet.json", PASSWORD, kdf_n=2, private_key=node.key)
    receipts = [signed_receipt(node, domain) for _ in range(2)]
    store = Store(cdir / "coordinator.db")
    store_receipts(store, receipts)
    store.close()
    with Journal(ndir / "journal.db") as journal:
        for receipt, signature, *_ in receipts:
            journal.record_receipt(
                receipt, signature, chain_id=domain.chain_id,
                verifying_contract=domain.verifying_contract,
            )  # fmt: skip
            journal.mark_acked(receipt.job_id, True)

    closed = json.loads(_run(coordinator_app, ["epoch", "close", "--json"], cenv))
    assert closed["epoch"] == 1 and closed["paidReceipts"] == 2 and closed["posted"]
    assert json.loads(_run(coordinator_app, ["epoch", "close", "--json"], cenv)) is None
    shown = json.loads(_run(coordinator_app, ["epoch", "show", "1", "--json"], cenv))
    assert {"epoch", "root", "receiptsHash", "claims"} <= set(shown)
    assert shown["root"] == closed["root"] and shown["receiptsHash"] == closed["receiptsHash"]
    [claim] = shown["claims"]
    assert claim["account"] == node.address and claim["proof"] == []
    listed = json.loads(_run(coordinator_app, ["epoch", "list", "--json"], cenv))
    assert listed == [
        {
            "epoch": 1,
            "state": "posted",
            "total": closed["total"],
            "paidReceipts": 2,
            "refusedReceipts": 0,
        }
    ]
    _run(coordinator_app, ["chain", "fund", node.address, "--sogni", "1000"], cenv)

    nenv = {
        "SOGNI_NODE_DATA_DIR": str(ndir),
        "SOGNI_NODE_PASSWORD": PASSWORD,
        "SOGNI_NODE_CHAIN_URL": anvil_url,
        "SOGNI_NODE_ADDRESSES_FILE": str(addresses_file),
        "SOGNI_NODE_EPOCHS_DIR": str(cdir / "epochs"),
    }
    report = json.loads(_run(node_app, ["rewards", "--json"], nenv))
    assert report["ok"] and report["verifiedReceipts"] == 2
    assert report["claimable"] == report["earned"] == closed["total"]
    claimed = json.loads(_run(node_app, ["rewards", "claim", "--json"], nenv))
    assert claimed == {"account": node.address, "claimed": closed["total"]}
    again = json.loads(_run(node_app, ["rewards", "claim", "--json"], nenv))
    assert again["claimed"] == "0"
    report = json.loads(_run(node_app, ["rewards", "--json"], nenv))
    assert report["claimable"] == "0" and report["epochs"][0]["claimed"] is True
    assert "claimed" in _run(node_app, ["rewards"], nenv)  # the table view

    staked = json.loads(_run(node_app, ["stake", "100"], nenv))
    assert staked["active"] == str(100 * 10**18)
    unstaked = json.loads(_run(node_app, ["unstake", "40"], nenv))
    assert (unstaked["active"], unstaked["pending"]) == (str(60 * 10**18), str(40 * 10**18))
    early = runner.invoke(node_app, ["withdraw"], env=nenv)
    assert early.exit_code == 3 and "CooldownActive" in early.output  # the chain refused
    chain = connect(anvil_url)
    chain.advance_time(7 * 24 * 3600 + 1)
    done = json.loads(_run(node_app, ["withdraw"], nenv))
    assert done["pending"] == "0"
    d = Deployment(chain, addresses)
    assert d.token.balance_of(node.address) == int(closed["total"]) + 940 * 10**18


def _season_prizes_can_be_authorised(
    url: str, addresses: Addresses, cdir: Path, cenv: dict[str, str]
) -> None:
    """On a dev chain the settlement key may post season prizes; only governance caps them."""
    d = Deployment(connect(url), addresses)
    settler = keystore_address(cdir / "signer.json")
    assert d.distributor.has_role("AIRDROP_ROLE", settler)
    refused = runner.invoke(
        coordinator_app, ["season", "cap", "1", "--keystore", str(cdir / "signer.json")],
        env={**cenv, "SOGNI_GOVERNANCE_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert refused.exit_code == 3 and "is not the distributor's admin" in refused.output
    assert d.distributor.airdrop_cap(1) == 0
    gov = cdir / "governance.json"
    create_keystore(gov, PASSWORD, kdf_n=2, private_key=bytes.fromhex(anvil_dev_keys()[0][2:]))
    out = _run(
        coordinator_app, ["season", "cap", "1", "--keystore", str(gov)],
        {**cenv, "SOGNI_GOVERNANCE_PASSWORD": PASSWORD},
    )  # fmt: skip
    pools = sum(pool for _board, pool in load_catalog().season(1).prizes)
    assert f"at most {pools} SOGNI" in out
    assert d.distributor.airdrop_cap(1) == pools * 10**18


def test_cli_without_a_shared_chain_explains(tmp_path: Path) -> None:
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_LOG_LEVEL": "error"}
    result = runner.invoke(coordinator_app, ["epoch", "close"], env=env)
    assert result.exit_code == 2 and "shared chain" in result.output
    result = runner.invoke(coordinator_app, ["epoch", "show", "1"], env=env)
    assert result.exit_code == 2 and "no epoch 1" in result.output
    nenv = {"SOGNI_NODE_DATA_DIR": str(tmp_path / "n")}
    result = runner.invoke(node_app, ["stake", "1"], env=nenv)
    assert result.exit_code == 2 and "needs a chain" in result.output
    result = runner.invoke(node_app, ["rewards"], env=nenv)
    assert result.exit_code == 4 and "keystore" in result.output  # none created yet


def test_embedded_deploy_writes_the_deterministic_addresses(tmp_path: Path) -> None:
    from sogni_devnet.settlement_demo import embedded_deployment

    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_LOG_LEVEL": "error"}
    result = runner.invoke(coordinator_app, ["chain", "deploy"], env=env)
    assert result.exit_code == 0, result.output
    written = Addresses.load(tmp_path / "addresses.json")
    in_process = embedded_deployment(tmp_path / "again.json").addresses
    assert written.distributor == in_process.distributor
    assert written.chain_id == in_process.chain_id


def test_node_and_operator_commands_work_on_a_real_networks_chain_id(tmp_path: Path) -> None:
    """Every node chain command connected with anvil's dev keys, which `connect` refuses off
    a dev chain: on any real network (chain 8453 here) `rewards`, `claim`, `stake` and the
    operator's `epoch` commands all exited 2 "not a local dev chain"."""
    if find_anvil() is None:
        pytest.skip("anvil binary not installed (npm ci --prefix contracts)")
    with Anvil(chain_id=8453) as node:
        deployer = anvil_dev_keys(1)[0]  # funded by anvil; a real deployer's own key
        chain = connect(node.url, keys=[deployer])
        addresses_file = tmp_path / "addresses.json"
        deploy_all(chain, chain.accounts[0], path=addresses_file)
        nenv = {
            "SOGNI_NODE_DATA_DIR": str(tmp_path / "node"),
            "SOGNI_NODE_PASSWORD": PASSWORD,
            "SOGNI_NODE_CHAIN_URL": node.url,
            "SOGNI_NODE_ADDRESSES_FILE": str(addresses_file),
        }
        create_keystore(tmp_path / "node" / "wallet.json", PASSWORD, kdf_n=2**4)
        epochs = tmp_path / "epochs"
        epochs.mkdir()
        report = json.loads(
            _run(node_app, ["rewards", "--epochs-dir", str(epochs), "--json"], nenv)
        )
        assert report["ok"] and report["account"] == keystore_address(
            tmp_path / "node" / "wallet.json"
        )
        withdrawn = runner.invoke(node_app, ["withdraw"], env=nenv)  # signs with the wallet
        assert "not a local dev chain" not in withdrawn.output, withdrawn.output
        cenv = {
            "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "coordinator"),
            "SOGNI_COORDINATOR_CHAIN_URL": node.url,
            "SOGNI_COORDINATOR_ADDRESSES_FILE": str(addresses_file),
            "SOGNI_COORDINATOR_BILLING": "required",  # a real network's rule
        }
        closing = runner.invoke(coordinator_app, ["epoch", "close", "--json"], env=cenv)
        assert "not a local dev chain" not in closing.output  # connected; on to its own key
        assert closing.exit_code == 4 and "no keystore" in closing.output
