"""The dispute CLIs against a local network (anvil, a separate process, as a dev network
runs it): `sogni-node dispute open` with a refusal saved from the coordinator, then
`sogni dispute list|show|vote|reveal|claim` for three jurors, each with its own keystore
and salt file; a cheater's dispute is lost, the bond goes to the majority and the treasury.
Skipped when the anvil binary is not installed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_hash.auto import keccak
from typer.testing import CliRunner, Result

from sogni_app.dispute_cli import dispute_app
from sogni_chain import Deployment, connect, deploy_all
from sogni_chain.anvil import Anvil, find_anvil
from sogni_chain.disputes import DEV_DISPUTE_PARAMS, sign_refusal
from sogni_node.cli import app as node_app
from sogni_protocol.cli_errors import BadUsage, CliError, Refused
from sogni_wallet.keystore import create_keystore

SOGNI = 10**18
PASSWORD = "dispute-test"
runner = CliRunner()


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    if find_anvil() is None:
        pytest.skip("anvil binary not installed (npm ci --prefix contracts)")
    with Anvil() as node:
        yield node


def _ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _refused(result: Result, kind: type[CliError], text: str) -> None:
    """One expected error: a line `error: ...` and the kind's exit code (the node CLI's
    wrapper), or the error itself (a bare typer app under the test runner)."""
    if isinstance(result.exception, CliError):
        assert isinstance(result.exception, kind) and text in str(result.exception)
        return
    assert result.exit_code == kind.code, (result.output, result.exception)
    assert result.output.startswith("error: ") and text in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_cheater_loses_through_the_clis(anvil: Anvil, tmp_path: Path) -> None:
    chain = connect(anvil.url)
    gov, coord, worker, j1, j2, j3 = chain.accounts[:6]
    addresses = deploy_all(
        chain,
        gov,
        coordinator=coord,
        slasher=coord,
        disputes=DEV_DISPUTE_PARAMS,
        path=tmp_path / "addresses.json",
    )
    d = Deployment(chain, addresses, gov)
    assert d.disputes is not None
    for who, amount in ((worker, 100), (j1, 300), (j2, 200), (j3, 100)):
        d.token.transfer(who.address, (amount + 50) * SOGNI)
        d.token.approve(addresses.staking, amount * SOGNI, sender=who)
        d.staking.stake(amount * SOGNI, sender=who)
    chain.advance_time(5)
    job = bytes.fromhex("ab" * 32)
    refusal = sign_refusal(
        coord.key,
        chain_id=chain.chain_id,
        disputes=d.disputes.address,
        case_id=b"\x42" * 32,
        worker=worker.address,
        evidence_hash=b"\x01" * 32,
        refused_at=chain.timestamp(),
    )
    saved = tmp_path / "refusal.json"
    saved.write_text(json.dumps({"refusals": [{**refusal.as_json(), "jobId": "0x" + job.hex()}]}))

    ndir = tmp_path / "node"
    create_keystore(ndir / "wallet.json", PASSWORD, kdf_n=2, private_key=worker.key)
    node_env = {
        "SOGNI_NODE_DATA_DIR": str(ndir),
        "SOGNI_NODE_PASSWORD": PASSWORD,
        "SOGNI_NODE_CHAIN_URL": anvil.url,
        "SOGNI_NODE_ADDRESSES_FILE": str(tmp_path / "addresses.json"),
        "SOGNI_NODE_CONFIG": None,
    }
    args = ["dispute", "open", "0x" + job.hex(), "--refusal", str(saved)]
    _refused(
        runner.invoke(node_app, ["dispute", "open", "0x" + job.hex()], env=node_env),
        BadUsage,
        "give --coordinator URL or --refusal FILE",
    )
    out = _ok(runner.invoke(node_app, args, env=node_env))
    assert "dispute opened: case 0x" + "42" * 32 in out
    _refused(runner.invoke(node_app, args, env=node_env), Refused, "already disputed")
    stalled = ["dispute", "open-vote", "0x" + "42" * 32]  # the coordinator's time first
    _refused(runner.invoke(node_app, stalled, env=node_env), Refused, "to publish its re-checks")
    _refused(
        runner.invoke(node_app, ["dispute", "open-vote", "0x42"], env=node_env),
        BadUsage,
        "not a case id",
    )

    def juror(i: int, who: Any) -> tuple[list[str], dict[str, str]]:
        key = tmp_path / f"juror{i}.json"
        create_keystore(key, PASSWORD, kdf_n=2, private_key=who.key)
        common = [
            "--rpc",
            anvil.url,
            "--addresses",
            str(tmp_path / "addresses.json"),
            "--data-dir",
            str(tmp_path / f"j{i}"),
        ]
        return [*common, "--keystore", str(key)], {"SOGNI_KEYSTORE_PASSWORD": PASSWORD}

    view = ["--rpc", anvil.url, "--addresses", str(tmp_path / "addresses.json")]
    listed = _ok(runner.invoke(dispute_app, ["list", *view]))
    assert "0x4242424242424242  refusal" in listed and "re-checking" in listed
    jurors = [juror(i, w) for i, w in enumerate((j1, j2, j3))]
    _refused(
        runner.invoke(
            dispute_app, ["vote", "0x4242", "--for-worker", *jurors[0][0]], env=jurors[0][1]
        ),
        Refused,
        "not open yet",
    )
    bundle = tmp_path / "bundle.json"  # `show` fetches it and checks it against the chain
    bundle.write_bytes(b'{"reason": "step 2 over", "rechecks": []}')
    d.disputes.open_voting(b"\x42" * 32, keccak(bundle.read_bytes()), bundle.as_uri(), sender=coord)
    for (opts, env), side in zip(
        jurors, ("--against-worker", "--against-worker", "--for-worker"), strict=True
    ):
        out = _ok(runner.invoke(dispute_app, ["vote", "0x4242", side, *opts], env=env))
        assert "(hidden)" in out
    _refused(
        runner.invoke(
            dispute_app, ["vote", "0x4242", "--for-worker", *jurors[0][0]], env=jurors[0][1]
        ),
        Refused,
        "already voted",
    )
    _refused(
        runner.invoke(dispute_app, ["vote", "0x4242", *jurors[0][0]], env=jurors[0][1]),
        BadUsage,
        "--for-worker or --against-worker",
    )
    chain.advance_time(DEV_DISPUTE_PARAMS.commit_window)
    for opts, env in jurors[:2]:  # the third juror never reveals
        _ok(runner.invoke(dispute_app, ["reveal", "0x4242", *opts], env=env))
    chain.advance_time(DEV_DISPUTE_PARAMS.reveal_window)
    _refused(
        runner.invoke(dispute_app, ["reveal", "0x4242", *jurors[2][0]], env=jurors[2][1]),
        Refused,
        "reveal window of 0x4242424242424242 closed",
    )
    shown = _ok(runner.invoke(dispute_app, ["show", "0x4242", *view]))
    # 700 SOGNI of votes, the default cap is 10 %: j1 (300) and j2 (200) weigh 70 each
    assert "for the worker 0, against 140" in shown and "anyone may resolve" in shown
    assert "keccak256 matches the chain" in shown and "refused   step 2 over" in shown
    bundle.write_bytes(b'{"reason": "edited", "rechecks": []}')  # not what was committed
    _refused(runner.invoke(dispute_app, ["show", "0x4242", *view]), Refused, "do not judge")
    treasury_before = d.token.balance_of(gov.address)
    d.disputes.resolve(b"\x42" * 32, sender=j3)
    pool = DEV_DISPUTE_PARAMS.bond * DEV_DISPUTE_PARAMS.juror_share_bps // 10_000
    assert d.token.balance_of(gov.address) == treasury_before + DEV_DISPUTE_PARAMS.bond - pool
    before = d.token.balance_of(j1.address)
    out = _ok(runner.invoke(dispute_app, ["claim", "0x4242", *jurors[0][0]], env=jurors[0][1]))
    assert d.token.balance_of(j1.address) == before + pool * 70 // 140
    assert out.startswith("claimed ")
    _refused(
        runner.invoke(dispute_app, ["claim", "0x4242", *jurors[2][0]], env=jurors[2][1]),
        Refused,
        "no reward",
    )
    assert stat_mode(tmp_path / "j0" / "disputes" / "votes.json") == 0o600


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
