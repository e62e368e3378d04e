"""One coordinator per data folder, and no restore beneath a running one: the folder's lock
(`sogni_coordinator.data_dir_lock`), held here as a running coordinator holds it (a second
descriptor's `flock` conflicts even in one process), then let go."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from eth_account import Account

from sogni_coordinator.backup import BackupError, backup, restore
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.data_dir_lock import DataDirBusy, hold
from sogni_coordinator.service import Signer, run_coordinator
from sogni_coordinator.store import Store


def test_a_restore_beneath_a_running_coordinator_is_refused_and_touches_nothing(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    Store(live / "coordinator.db").close()
    saved = tmp_path / "backup"
    backup(live, saved)
    before = (live / "coordinator.db").read_bytes()
    with hold(live, "running"), pytest.raises(BackupError, match="a coordinator is running"):
        restore(saved, live, force=True)
    assert (live / "coordinator.db").read_bytes() == before
    restore(saved, live, force=True)  # stopped: it goes ahead


async def test_a_second_coordinator_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    config = CoordinatorConfig(data_dir=tmp_path, listen="/ip4/127.0.0.1/tcp/0")
    acct = Account.create()
    with hold(tmp_path, "running"), pytest.raises(DataDirBusy, match="stop it before starting"):
        with trio.fail_after(30):
            await run_coordinator(config, Signer(acct.address, bytes(acct.key)))
