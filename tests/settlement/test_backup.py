"""Backups: a snapshot taken while the coordinator's database is open restores into a fresh
coordinator that serves the same balances, receipts and epochs; a changed backup, a wrong
password or an existing database are refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_coordinator.backup import BackupError, backup, restore
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.epoch_serving import EpochFolder
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.store import Store
from sogni_wallet.keystore import create_keystore

from .settle_env import PAYER, Net, settler, signed_receipt, store_receipts, worker

PASSWORD = "backup-test"
SPARK = 43_200
runner = CliRunner()


def _coordinator(net: Net, data: Path) -> tuple[Store, Ledger]:
    """A data folder as a running coordinator leaves it: receipts, a settled epoch, balances."""
    data.mkdir(parents=True)
    store = Store(data / "coordinator.db")
    store_receipts(store, [signed_receipt(worker(i), net.domain, work_units=SPARK) for i in (1, 2)])
    assert settler(store, net, data).close_epoch() is not None
    store_receipts(store, [signed_receipt(worker(3), net.domain, work_units=SPARK)])  # unsettled
    ledger = Ledger(data / "coordinator.db")
    ledger.credit_purchase("0x" + "ab" * 20, 7)
    create_keystore(data / "signer.json", PASSWORD, kdf_n=2)
    (data / "node.key").write_bytes(os.urandom(32))
    return store, ledger


def _state(data: Path) -> dict[str, object]:
    store, ledger = Store(data / "coordinator.db"), Ledger(data / "coordinator.db")
    try:
        folder = EpochFolder(data / "epochs")
        summaries, _ = folder.index()
        return {
            "payer": ledger.balance(PAYER),
            "bought": ledger.balance("0x" + "ab" * 20),
            "receipts": sorted(r.receipt.job_id for r in store.receipts()),
            "unsettled": [r.receipt.job_id for r in store.unsettled_receipts()],
            "epoch": store.epoch_record(1),
            "files": {s.epoch: folder.read(s.file) for s in summaries},
        }
    finally:
        store.close()
        ledger.close()


def test_an_online_backup_restores_the_same_coordinator(net: Net, tmp_path: Path) -> None:
    data = tmp_path / "live"
    store, ledger = _coordinator(net, data)
    try:  # taken while the databases are open, as a running coordinator holds them
        manifest = backup(
            data,
            tmp_path / "bk",
            key_files=[data / "signer.json"],
            node_key=data / "node.key",
            password=PASSWORD,
        )
    finally:
        store.close()
        ledger.close()
    assert manifest.keys and "coordinator.db" in manifest.files
    assert any(name.startswith("epochs/") for name in manifest.files)
    raw_key = (data / "node.key").read_bytes()
    assert raw_key not in (tmp_path / "bk" / "keys" / "node.key.enc").read_bytes()

    fresh = tmp_path / "fresh"
    restore(tmp_path / "bk", fresh, password=PASSWORD)
    before, after = _state(data), _state(fresh)
    assert after == before and after["epoch"] is not None and after["files"]
    assert (fresh / "node.key").read_bytes() == raw_key
    assert (fresh / "node.key").stat().st_mode & 0o777 == 0o600
    assert (fresh / "signer.json").read_bytes() == (data / "signer.json").read_bytes()
    # the database holds live requests' prompt keys: owner only, wherever it is (the umask
    # left it, its folder and its backup readable by every local user)
    for path in (data / "coordinator.db", tmp_path / "bk" / "coordinator.db"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert fresh.joinpath("coordinator.db").stat().st_mode & 0o077 == 0
    assert (tmp_path / "bk").stat().st_mode & 0o077 == 0


def test_an_existing_database_readable_by_others_is_made_private(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    Store(db).close()
    assert db.stat().st_mode & 0o777 == 0o600
    db.chmod(0o644)  # as older releases left it
    Store(db).close()
    assert db.stat().st_mode & 0o777 == 0o600


def test_a_changed_backup_a_wrong_password_or_an_existing_database_are_refused(
    net: Net, tmp_path: Path
) -> None:
    data = tmp_path / "live"
    store, ledger = _coordinator(net, data)
    store.close()
    ledger.close()
    bk = tmp_path / "bk"
    backup(data, bk, node_key=data / "node.key", password=PASSWORD)
    with pytest.raises(BackupError, match="not empty"):
        backup(data, bk)
    with pytest.raises(BackupError, match="exists: stop that coordinator"):
        restore(bk, data, password=PASSWORD)
    with pytest.raises(BackupError, match="wrong password"):
        restore(bk, tmp_path / "other", password="not it")
    assert not (tmp_path / "other" / "coordinator.db").exists()  # nothing written

    epoch_file = bk / "epochs" / "epoch-000001.json"
    epoch_file.write_bytes(epoch_file.read_bytes() + b" ")
    with pytest.raises(BackupError, match="does not match its manifest"):
        restore(bk, tmp_path / "third", password=PASSWORD)
    assert not (tmp_path / "third").exists()


def test_backup_and_restore_commands(net: Net, tmp_path: Path) -> None:
    data = tmp_path / "live"
    store, ledger = _coordinator(net, data)
    store.close()
    ledger.close()
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(data),
        "SOGNI_COORDINATOR_PASSWORD": PASSWORD,
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
    }
    out = runner.invoke(coordinator_app, ["backup", str(tmp_path / "bk"), "--keys"], env=env)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["keys"] is True
    again = runner.invoke(coordinator_app, ["restore", str(tmp_path / "bk")], env=env)
    assert again.exit_code == 3  # the live database is there: refused, one line
    assert "--force" in again.output and "Traceback" not in again.output
    fresh = {**env, "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "fresh")}
    done = runner.invoke(coordinator_app, ["restore", str(tmp_path / "bk")], env=fresh)
    assert done.exit_code == 0, done.output
    assert _state(tmp_path / "fresh") == _state(data)
    # a PostgreSQL database is the server's to back up: one line naming pg_dump, nothing written
    on_server = {**env, "SOGNI_COORDINATOR_DATABASE": "postgresql://sogni@127.0.0.1:1/sogni"}
    for args in (["backup", str(tmp_path / "bk-pg")], ["restore", str(tmp_path / "bk")]):
        refused = runner.invoke(coordinator_app, args, env=on_server)
        assert refused.exit_code == 3 and "pg_dump" in refused.output, refused.output
        assert "Traceback" not in refused.output
    assert not (tmp_path / "bk-pg").exists()
