"""`sogni` with a damaged local coordinator file, a malformed `--coordinator`, a damaged
resume ticket; `sogni-node status` when no daemon answers. One line each, in words, with the
documented exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_app.cli import app as sogni_app
from sogni_net import AddressError, peer_info
from sogni_node.cli import app as node_app
from sogni_node.config import DATA_DIR_LOCK
from sogni_protocol import folder_lock
from sogni_protocol.folder_lock import FolderBusy
from tests.cli_ux.one_line import one_line

runner = CliRunner()
PEER = "12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
REQUEST = "ab" * 32
TOKEN = "cd" * 32


def _home(tmp_path: Path, content: str | None) -> dict[str, str | None]:
    """An env whose HOME holds `content` as the local coordinator's address file."""
    if content is not None:
        folder = tmp_path / ".sogni" / "coordinator"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "coordinator.json").write_text(content)
    return {
        "HOME": str(tmp_path),
        "SOGNI_COORDINATOR_ADDR": None,
        "SOGNI_PASSWORD": "x",
        "SOGNI_DEBUG": None,
    }


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("", "it is not JSON"),
        ("{}", "it lists no address (`addrs`)"),
        ('{"addrs": []}', "it lists no address (`addrs`)"),
        ('{"addrs": [5]}', "it lists no address (`addrs`)"),
        ("[1]", "it is not a JSON object"),
    ],
)
def test_a_damaged_local_coordinator_file_isone_line(
    tmp_path: Path, content: str, what: str
) -> None:
    path = tmp_path / ".sogni" / "coordinator" / "coordinator.json"
    for args in (["balance"], ["render", "x"]):
        line = one_line(runner.invoke(sogni_app, args, env=_home(tmp_path, content)), 3)
        assert line.startswith(f"error: {path} is damaged: {what}"), line
        assert "restart the local coordinator" in line and "--coordinator" in line


def test_a_damaged_domain_in_the_file_of_the_named_coordinator_is_refused(
    tmp_path: Path,
) -> None:
    addr = f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}"
    content = json.dumps({"addrs": [addr], "peerId": PEER, "chainId": "x"})
    result = runner.invoke(
        sogni_app,
        ["balance", "--coordinator", addr, "--keystore", str(tmp_path / "none.json")],
        env=_home(tmp_path, content),
    )
    assert "its `chainId` is not a number" in one_line(result, 3)
    other = f"/ip4/127.0.0.1/tcp/9/p2p/{'QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N'}"
    result = runner.invoke(  # the file is not about this one: not read for the domain
        sogni_app,
        ["balance", "--coordinator", other, "--keystore", str(tmp_path / "none.json")],
        env=_home(tmp_path, content),
    )
    assert "no keystore" in one_line(result, 4)


def test_a_word_is_not_a_peer_id_and_is_refused_before_the_wallet_is_unlocked(
    tmp_path: Path,
) -> None:
    for bad in ("garbage", "12D3KooWxxxx", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWxxxx"):
        with pytest.raises(AddressError):
            peer_info(bad)
        for command in ("boost", "balance"):
            result = runner.invoke(  # the keystore does not exist: the address is checked first
                sogni_app,
                [command, "--coordinator", bad, "--keystore", str(tmp_path / "none.json")],
                env=_home(tmp_path, None),
            )
            line = one_line(result, 2)
            assert line.startswith(f"error: {bad!r} is not a peer address: "), line
    assert str(peer_info(PEER).peer_id) == PEER


def test_collect_with_a_damaged_ticket_says_what_is_wrong_in_words(tmp_path: Path) -> None:
    out = tmp_path / "o1"
    out.mkdir()
    (out / "request.json").write_text("[1]")
    env = _home(tmp_path, None)
    base = ["collect", REQUEST, "--out", str(out)]
    line = one_line(runner.invoke(sogni_app, base, env=env), 2)
    assert "request.json is damaged: it is not the request ticket" in line
    assert "'list' object" not in line and "pass --token" in line
    line = one_line(runner.invoke(sogni_app, [*base, "--token", TOKEN], env=env), 2)
    assert "is damaged" in line and "pass --token" not in line and "--coordinator" in line
    assert "--token must be 64 hex" in one_line(
        runner.invoke(sogni_app, [*base, "--token", "zz"], env=env), 2
    )
    result = runner.invoke(
        sogni_app, [*base, "--token", TOKEN, "--coordinator", "garbage"], env=env
    )
    assert "is not a peer address" in one_line(result, 2)


def test_node_status_exits_4_when_no_daemon_answers(tmp_path: Path) -> None:
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_HTTP_LISTEN": "127.0.0.1:9",  # nothing listens there
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_DEBUG": None,
    }
    result = runner.invoke(node_app, ["status", "--json"], env=env)
    line = one_line(result, 4)
    assert "no node daemon answers on 127.0.0.1:9" in line and "sogni-node start" in line
    reading = json.loads(result.stdout)  # the reading still goes to stdout, for scripts
    assert reading["daemon"] is None and reading["jobs_today"] == 0
    result = runner.invoke(node_app, ["status", "--once"], env=env)
    assert "no node daemon answers" in one_line(result, 4)
    assert "no node daemon answers" in result.stdout


def test_node_status_with_http_off_reads_the_data_folders_lock(tmp_path: Path) -> None:
    """With `http_listen = off` status could not tell a running node from none (exit 4
    either way): the running daemon's data-folder lock tells it."""
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_HTTP_LISTEN": "off",
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_DEBUG": None,
    }
    result = runner.invoke(node_app, ["status", "--json"], env=env)
    assert f"no node daemon runs on {tmp_path}" in one_line(result, 4)
    busy = FolderBusy("held by this test")
    with folder_lock.hold(tmp_path, DATA_DIR_LOCK, busy):  # as `sogni-node start` holds it
        result = runner.invoke(node_app, ["status", "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["daemon"] == {"status": "running"}
        result = runner.invoke(node_app, ["status", "--once"], env=env)
        assert result.exit_code == 0 and "http_listen = off: no live figures" in result.stdout


def test_a_second_node_on_one_data_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two daemons on one data folder would share its journal and identity as if alone."""
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_NODE_COORDINATORS": f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}",
        "SOGNI_NODE_TRUSTED_COORDINATORS": "0x" + "11" * 20,
        "SOGNI_DEBUG": None,
    }
    with folder_lock.hold(tmp_path, DATA_DIR_LOCK, FolderBusy("held by this test")):
        result = runner.invoke(node_app, ["start"], env=env)
    line = one_line(result, 3)
    assert f"a node is already running on {tmp_path}" in line and "SOGNI_NODE_DATA_DIR" in line
