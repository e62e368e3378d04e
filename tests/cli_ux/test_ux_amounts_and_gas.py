"""Amounts typed on a command line, and transactions a wallet cannot pay for: one line each.

`cli_errors.parse_amount` is the one amount parser (`stake`, `unstake`, `slash propose-tx
--amount`, `chain fund --eth/--sogni`): non-finite, negative and over-uint256 values are a
usage error (exit 2), never an OverflowError or a web3 validation traceback. A wallet
without ETH (or, for `stake`, without the SOGNI) is refused in words (exit 3), naming the
wallet and how to fund it. The chain is the embedded one (eth-tester), in this process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from sogni_chain import Chain, Deployment, connect
from sogni_chain.deploy import deploy_all
from sogni_coordinator import chain_cli
from sogni_coordinator.cli import app as coordinator_app
from sogni_node import rewards_cli
from sogni_node.cli import app as node_app
from sogni_node.rewards import parse_sogni
from sogni_protocol.cli_errors import UINT256_MAX, BadUsage, classify, parse_amount
from sogni_wallet.keystore import create_keystore
from tests.cli_ux.one_line import one_line

runner = CliRunner()
PASSWORD = "cli-ux"
SOGNI = 10**18
ADDRESS = "0x1111111111111111111111111111111111111111"
NOT_AMOUNTS = ("inf", "Infinity", "-inf", "nan", "NaN", "1e999", str(2**256), "abc", "")


# --- the parser --------------------------------------------------------------------------
def test_parse_amount_takes_decimals_and_refuses_what_no_contract_holds() -> None:
    assert parse_amount("1") == SOGNI and parse_amount("0.5") == SOGNI // 2
    assert parse_amount("1e3") == 1000 * SOGNI and parse_amount("1E-18") == 1
    assert parse_amount("0", allow_zero=True) == 0
    top = "115792089237316195423570985008687907853269984665640564039457.584007913129639935"
    assert parse_amount(top) == UINT256_MAX
    for bad in (*NOT_AMOUNTS, "-5", "0", "-0", "1e-999999999", "0.0000000000000000001"):
        with pytest.raises(BadUsage) as info:
            parse_amount(bad)
        assert info.value.code == 2
    with pytest.raises(BadUsage, match="more than a contract holds"):
        parse_amount(top[:-1] + "6")
    with pytest.raises(BadUsage, match="must be 0 or more"):
        parse_amount("-1", allow_zero=True, unit="ETH")
    with pytest.raises(ValueError, match="not an amount of SOGNI"):  # the node's own name
        parse_sogni("inf")


@pytest.mark.parametrize("command", ["stake", "unstake"])
def test_stake_and_unstake_refuse_non_finite_and_huge_amounts(command: str) -> None:
    for bad in NOT_AMOUNTS[:-1]:
        line = one_line(runner.invoke(node_app, [command, bad]), 2)
        assert "not an amount of SOGNI" in line, (bad, line)


def test_slash_propose_tx_refuses_non_finite_and_negative_amounts() -> None:
    for bad in ("inf", "nan", "-5", "1e999"):
        result = runner.invoke(coordinator_app, ["slash", "propose-tx", "1", "--amount", bad])
        line = one_line(result, 2)
        assert "amount" in line and repr(bad) in line, line


def test_chain_fund_refuses_non_finite_amounts_before_any_chain_call() -> None:
    for option, bad in (("--eth", "1e999"), ("--eth", "inf"), ("--eth", "nan"), ("--sogni", "-1")):
        result = runner.invoke(coordinator_app, ["chain", "fund", ADDRESS, option, bad])
        line = one_line(result, 2)
        assert repr(bad) in line, line


# --- a wallet that cannot pay --------------------------------------------------------------
@dataclass
class Net:
    chain: Chain
    d: Deployment
    treasury: LocalAccount


@pytest.fixture(scope="module")
def _net() -> Net:
    chain = connect()  # the embedded EVM
    treasury = chain.accounts[0]
    addresses = deploy_all(chain, treasury, coordinator=chain.accounts[1])
    return Net(chain, Deployment(chain, addresses, sender=treasury), treasury)


@pytest.fixture
def net(_net: Net) -> Iterator[Net]:
    snap = _net.chain.snapshot()
    try:
        yield _net
    finally:
        _net.chain.revert(snap)


def _node_wallet(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalAccount, dict[str, str | None]]:
    """A fresh node wallet (no ETH, no SOGNI) and the env of a node that stakes on `net`."""
    wallet: LocalAccount = Account.create()
    create_keystore(tmp_path / "wallet.json", PASSWORD, kdf_n=2, private_key=bytes(wallet.key))
    monkeypatch.setattr(rewards_cli, "_required_deployment", lambda cfg, url: net.d)
    env: dict[str, str | None] = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_PASSWORD": PASSWORD,
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_DEBUG": None,
    }
    return wallet, env


def test_staking_without_eth_names_the_wallet_and_how_to_fund_it(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet, env = _node_wallet(net, tmp_path, monkeypatch)
    net.d.token.transfer(wallet.address, 10 * SOGNI, sender=net.treasury)  # SOGNI, no ETH
    for args in (["stake", "1"], ["unstake", "1"], ["withdraw"]):
        line = one_line(runner.invoke(node_app, args, env=env), 3)
        assert f"wallet {wallet.address} has 0 ETH" in line, (args, line)
        assert f"sogni-coordinator chain fund {wallet.address}" in line, line
        assert "Web3" not in line and "ValidationError" not in line


def test_staking_more_sogni_than_the_wallet_holds_says_so_in_words(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet, env = _node_wallet(net, tmp_path, monkeypatch)
    net.chain.send_eth(wallet.address, SOGNI, sender=net.treasury)  # ETH, no SOGNI
    line = one_line(runner.invoke(node_app, ["stake", "5"], env=env), 3)
    assert f"wallet {wallet.address} holds 0 SOGNI, less than the 5 SOGNI to stake" in line
    assert "ERC20InsufficientBalance" not in line and "rewards claim" in line
    net.d.token.transfer(wallet.address, 5 * SOGNI, sender=net.treasury)
    staked = runner.invoke(node_app, ["stake", "5"], env=env)  # and with enough, it stakes
    assert staked.exit_code == 0, staked.output
    assert net.d.staking.active_stake(wallet.address) == 5 * SOGNI


def test_chain_fund_more_eth_than_the_treasury_holds_isone_line(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = tmp_path / "addresses.json"
    net.d.addresses.save(addresses)
    monkeypatch.setattr(chain_cli, "_shared_chain", lambda cfg, url: net.chain)
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(addresses),
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
        "SOGNI_DEBUG": None,
    }
    result = runner.invoke(
        coordinator_app, ["chain", "fund", ADDRESS, "--eth", "100000000"], env=env
    )
    line = one_line(result, 3)
    assert f"wallet {net.treasury.address} has" in line and "sending 100000000 ETH" in line
    assert "ask for less --eth" in line


def test_any_other_unpaid_transaction_is_one_line_too() -> None:
    """A command that does not name the wallet still gets one line, not web3's error."""
    from eth_utils.exceptions import ValidationError

    error = classify(ValidationError("Sender b'\\x8b' cannot afford txn gas 21632 with 0"))
    assert error is not None and error.code == 3
    assert "too little ETH" in error.what and "\\x8b" not in error.what
    assert classify(ValidationError("something else")) is None  # a bug keeps its traceback
