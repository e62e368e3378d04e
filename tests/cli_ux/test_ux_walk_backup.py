"""`sogni-coordinator backup --keys` carries the gateway's result-URL key (`result-url.key`,
the network's HMAC key: docs/GATEWAY.md), encrypted like the node key, and `restore` puts it
back (where `result_url_key_file` says, else in the data folder), so result URLs signed
before the restore still verify."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.result_urls import ResultUrls, load_key
from sogni_wallet.keystore import create_keystore

runner = CliRunner()
PASSWORD = "backup-walk"


def _coordinator(data: Path) -> dict[str, str | None]:
    data.mkdir(parents=True)
    sqlite3.connect(data / "coordinator.db").close()
    create_keystore(data / "signer.json", PASSWORD, kdf_n=2)
    return {
        "SOGNI_COORDINATOR_DATA_DIR": str(data),
        "SOGNI_COORDINATOR_PASSWORD": PASSWORD,
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_DEBUG": None,
    }


def test_backup_keys_carries_the_result_url_key_and_restore_puts_it_back(tmp_path: Path) -> None:
    env = _coordinator(tmp_path / "live")
    key = load_key(tmp_path / "live" / "result-url.key")
    url = ResultUrls(key).sign("img-1", base_url="http://127.0.0.1:9")
    done = runner.invoke(coordinator_app, ["backup", str(tmp_path / "bk"), "--keys"], env=env)
    assert done.exit_code == 0, done.output
    sealed = tmp_path / "bk" / "keys" / "result-url.key.enc"
    assert sealed.is_file() and key.hex().encode() not in sealed.read_bytes()
    assert (
        "keys/result-url.key.enc"
        in json.loads((tmp_path / "bk" / "manifest.json").read_text())["files"]
    )

    fresh = tmp_path / "fresh"
    restored = runner.invoke(
        coordinator_app,
        ["restore", str(tmp_path / "bk")],
        env={**env, "SOGNI_COORDINATOR_DATA_DIR": str(fresh)},
    )
    assert restored.exit_code == 0, restored.output
    path = fresh / "result-url.key"
    assert load_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    exp, sig = url.split("exp=")[1].split("&sig=")
    assert ResultUrls(load_key(path)).verify("img-1", exp, sig)  # old URLs still verify

    # a key kept elsewhere (result_url_key_file) goes back there
    elsewhere = tmp_path / "shared" / "url.key"
    again = runner.invoke(
        coordinator_app,
        ["restore", str(tmp_path / "bk")],
        env={
            **env,
            "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "third"),
            "SOGNI_COORDINATOR_RESULT_URL_KEY_FILE": str(elsewhere),
        },
    )
    assert again.exit_code == 0, again.output
    assert load_key(elsewhere) == key and not (tmp_path / "third" / "result-url.key").exists()


def test_a_wrong_password_restores_no_key(tmp_path: Path) -> None:
    env = _coordinator(tmp_path / "live")
    load_key(tmp_path / "live" / "result-url.key")
    (tmp_path / "live" / "node.key").unlink(missing_ok=True)  # the URL key alone
    done = runner.invoke(coordinator_app, ["backup", str(tmp_path / "bk"), "--keys"], env=env)
    assert done.exit_code == 0, done.output
    wrong = {
        **env,
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "fresh"),
        "SOGNI_COORDINATOR_PASSWORD": "not-it",
    }
    refused = runner.invoke(coordinator_app, ["restore", str(tmp_path / "bk")], env=wrong)
    assert refused.exit_code == 3, refused.output
    assert refused.stderr.startswith("error: cannot decrypt the backed-up result-URL key")
    assert not (tmp_path / "fresh" / "result-url.key").exists()
