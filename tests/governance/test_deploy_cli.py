"""`sogni-coordinator chain deploy --governed`: like `python -m sogni_chain deploy --governed`,
the timelock ends up admin of every governed contract (Disputes included), the deployer of
none, and the coordinator finds the governance file beside its addresses file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sogni_coordinator.disputes import DisputeBook
from sogni_devnet.paid_work import worker
from tests.disputes.test_restored_pay import _won


def test_chain_deploy_governed_with_disputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sogni_chain import Addresses, Deployment, connect
    from sogni_chain.governance import GovernanceAddresses
    from sogni_coordinator import chain_cli
    from sogni_coordinator.cli import app as coordinator_app
    from sogni_coordinator.network_params import network_params_for
    from sogni_wallet.keystore import create_keystore

    chain = connect(accounts=3)
    monkeypatch.setattr(chain_cli, "_connect", lambda url: chain)
    offer = create_keystore(tmp_path / "signer.json", "pw", kdf_n=2)
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_LOG_LEVEL": "warning"}
    args = ["chain", "deploy", "--disputes", "--governed"]
    result = CliRunner().invoke(coordinator_app, args, env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["governance"] == str(tmp_path / "addresses.governance.json")
    gov = GovernanceAddresses.load(out["governance"], chain_id=chain.chain_id)
    d = Deployment(chain, Addresses.load(tmp_path / "addresses.json"))
    assert d.disputes is not None
    deployer = chain.accounts[0].address
    for contract in (d.staking, d.distributor, d.disputes):
        assert contract.default_admin() == gov.timelock
        assert not contract.has_role("DEFAULT_ADMIN_ROLE", deployer)
    assert d.disputes.has_role("REPORTER_ROLE", offer)  # granted before the handover
    assert network_params_for(chain, tmp_path / "addresses.json") is not None

    # `epoch close` from the CLI pays a won dispute like the service would (else a plan made
    # here would leave a restoration planned into an epoch that never paid it)
    book = DisputeBook(tmp_path / "coordinator.db")
    _won(book, worker(1).address)
    env = {
        **env,
        "SOGNI_COORDINATOR_CHAIN_URL": "http://127.0.0.1:9",
        "SOGNI_COORDINATOR_PASSWORD": "pw",
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(tmp_path / "addresses.json"),
    }
    closed = CliRunner().invoke(coordinator_app, ["epoch", "close", "--json"], env=env)
    assert closed.exit_code == 0, closed.output
    assert json.loads(closed.stdout)["epoch"] == 1
    assert book.restorations()[0]["epoch"] == 1
    book.close()


def test_chain_deploy_without_governed_keeps_the_deployer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sogni_chain import Addresses, Deployment, connect
    from sogni_coordinator import chain_cli
    from sogni_coordinator.cli import app as coordinator_app

    chain = connect(accounts=3)
    monkeypatch.setattr(chain_cli, "_connect", lambda url: chain)
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_LOG_LEVEL": "warning"}
    result = CliRunner().invoke(coordinator_app, ["chain", "deploy"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["governance"] is None
    assert not (tmp_path / "addresses.governance.json").exists()
    d = Deployment(chain, Addresses.load(tmp_path / "addresses.json"))
    assert d.staking.default_admin() == chain.accounts[0].address
