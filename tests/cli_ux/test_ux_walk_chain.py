"""The local chain as a new user meets it: `python -m sogni_chain` (help, a wrong command, a
port anvil cannot take) and `sogni-coordinator chain grant-settler`, the way back to
settling after `keys rotate` (the new key lacks SETTLEMENT_ROLE)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from sogni_chain import Chain, Deployment, connect
from sogni_chain.deploy import deploy_all
from sogni_coordinator import chain_cli
from sogni_coordinator.cli import app as coordinator_app
from tests.cli_ux.one_line import one_line

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _chain_module(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sogni_chain", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


def test_sogni_chain_help_exits_0_and_a_wrong_command_is_one_line() -> None:
    helped = _chain_module("--help")
    assert helped.returncode == 0, helped.stderr
    assert "anvil" in helped.stdout and "deploy" in helped.stdout and not helped.stderr
    for args, what in ((["bogus"], "unknown command 'bogus'"), ([], "no command given")):
        wrong = _chain_module(*args)
        assert wrong.returncode == 2 and not wrong.stdout
        assert wrong.stderr.startswith(f"error: {what}") and wrong.stderr.count("\n") == 1
        assert "anvil and deploy" in wrong.stderr


def test_anvil_help_names_the_command_typed() -> None:
    helped = _chain_module("anvil", "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: python -m sogni_chain anvil")
    assert "__main__.py" not in helped.stdout


def _fake_anvil(tmp_path: Path, says: str, code: int) -> dict[str, str]:
    """An env whose anvil (SOGNI_ANVIL) prints `says` after a blank line and exits `code`."""
    fake = tmp_path / "anvil"
    fake.write_text(f"#!/bin/sh\necho\necho '{says}'\nexit {code}\n")
    fake.chmod(0o755)
    return {**os.environ, "SOGNI_ANVIL": str(fake), "SOGNI_DEBUG": ""}


def test_anvil_on_a_port_in_use_says_to_pick_another(tmp_path: Path) -> None:
    env = _fake_anvil(tmp_path, "Error: Address already in use (os error 98)", 1)
    state = str(tmp_path / "state.json")
    proc = _chain_module("anvil", "--port", "8545", "--state", state, env=env)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == (
        "error: port 8545 on 127.0.0.1 is already in use (another anvil, or another program) "
        "(pick another --port, or stop the other anvil)\n"
    )


def test_anvil_exiting_otherwise_shows_its_words_without_a_stray_separator(
    tmp_path: Path,
) -> None:
    env = _fake_anvil(tmp_path, "Error: bad hardfork", 3)
    proc = _chain_module("anvil", "--state", str(tmp_path / "state.json"), env=env)
    assert proc.returncode == 4
    assert proc.stderr == "error: anvil exited with code 3: Error: bad hardfork\n"


# --- grant-settler ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _chain() -> Chain:
    return connect()  # the embedded EVM


@pytest.fixture
def chain(_chain: Chain) -> Iterator[Chain]:
    snap = _chain.snapshot()
    try:
        yield _chain
    finally:
        _chain.revert(snap)


def _env(
    tmp_path: Path, chain: Chain, admin_index: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Deployment, dict[str, str | None]]:
    """Contracts deployed by account `admin_index` (their admin) and a coordinator's env."""
    admin = chain.accounts[admin_index]
    addresses = deploy_all(chain, admin, coordinator=chain.accounts[1])
    path = tmp_path / "addresses.json"
    addresses.save(path)
    monkeypatch.setattr(chain_cli, "_shared_chain", lambda cfg, url: chain)
    return Deployment(chain, addresses), {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(path),
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
        "SOGNI_DEBUG": None,
    }


def test_grant_settler_gives_a_rotated_key_the_settlement_role(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, env = _env(tmp_path, chain, 0, monkeypatch)
    rotated = Account.create().address
    assert not d.distributor.has_role("SETTLEMENT_ROLE", rotated)
    result = runner.invoke(coordinator_app, ["chain", "grant-settler", rotated], env=env)
    assert result.exit_code == 0, result.output
    assert d.distributor.has_role("SETTLEMENT_ROLE", rotated)
    assert '"alreadyHeld": false' in result.stdout
    assert f"chain fund {rotated}" in result.stderr  # it has no ETH for gas yet
    again = runner.invoke(coordinator_app, ["chain", "grant-settler", rotated], env=env)
    assert again.exit_code == 0 and '"alreadyHeld": true' in again.stdout


def test_grant_settler_from_a_key_that_is_not_admin_is_one_line(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _d, env = _env(tmp_path, chain, 3, monkeypatch)  # deployed by account 3: 0 is no admin
    someone = Account.create().address
    line = one_line(runner.invoke(coordinator_app, ["chain", "grant-settler", someone], env=env), 3)
    assert f"{chain.accounts[0].address} is not the admin of the RewardDistributor" in line
    assert f"its admin is {chain.accounts[3].address}" in line and "--keystore" in line


def test_grant_settler_refuses_a_malformed_address() -> None:
    line = one_line(runner.invoke(coordinator_app, ["chain", "grant-settler", "0xdead"]), 2)
    assert "'0xdead' is not an Ethereum address" in line


def test_epoch_close_without_the_role_names_grant_settler() -> None:
    source = Path(chain_cli.__file__).read_text()
    assert "chain grant-settler {address}" in source  # the hint `_settler` prints
