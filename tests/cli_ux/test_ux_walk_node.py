"""`sogni-node` as a new operator meets it: `status` showing the rewards `rewards` fetched,
`models add` of a missing or broken file, a missing `--epochs-dir` (exit 4, like `epoch
audit --published`), and `rewards claim` with nothing due."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

import sogni_node.rewards
from sogni_coordinator.cli import app as coordinator_app
from sogni_node import rewards_cli, status_view
from sogni_node.cli import app as node_app
from sogni_node.config import load_node_config
from sogni_node.journal import Journal
from sogni_node.rewards import RewardsReport
from sogni_wallet.keystore import create_keystore
from tests.cli_ux.one_line import one_line

runner = CliRunner()
PEER = "12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
OTHER = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
COORDINATOR = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
WALLET = "0x2222222222222222222222222222222222222222"
SOGNI = 10**18


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_COORDINATORS": COORDINATOR,
    }


def _published(folder: Path, *epochs: int) -> Path:
    folder.mkdir(parents=True)
    for n in epochs:
        (folder / f"epoch-{n:06d}.json").write_text("{}")
        (folder / f"epoch-{n:06d}.tree.json").write_text("{}")
    return folder


# --- finding 4: status reads the checked copy `rewards` fetched -----------------------------
def test_status_shows_the_rewards_fetched_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_node_config(None, _env(tmp_path))
    assert cfg.epochs_dir is None  # the default: fetched, not a local copy
    Journal(cfg.journal_path).close()
    cache = cfg.epochs_cache
    ours = _published(cache / PEER, 1, 2)
    _published(cache / OTHER, 1, 2, 3)  # another coordinator's: not a configured source
    _published(cache / f".{PEER}.abc.partial", 1, 2, 3, 4)  # staging: not checked yet
    read: list[Path] = []

    def load(folder: Path) -> list[Any]:
        read.append(folder)
        return []

    monkeypatch.setattr(sogni_node.rewards, "load_published", load)
    monkeypatch.setattr(
        sogni_node.rewards,
        "audit",
        lambda account, receipts, epochs, **kw: RewardsReport(account, earned=7 * SOGNI),
    )
    status = status_view.collect(cfg, WALLET, timeout=0.1)
    assert read == [ours]
    assert status.earned_wei == 7 * SOGNI and status.rewards_error is None


def test_status_without_configured_sources_cached_takes_the_newest_copy(
    tmp_path: Path,
) -> None:
    cfg = load_node_config(None, _env(tmp_path))
    cache = cfg.epochs_cache
    older = _published(cache / "http-127.0.0.1_8080", 1)
    newer = _published(cache / OTHER, 1, 2)
    _published(cache / f"{OTHER}.old", 1, 2, 3)  # a swap's leftover
    stamp = time.time() - 100
    os.utime(older / "epoch-000001.json", (stamp, stamp))
    assert status_view.epochs_folder(cfg) == newer
    assert status_view.epochs_folder(load_node_config(None, _env(tmp_path / "none"))) is None


# --- finding 9: models add of a missing or broken file -------------------------------------
def test_models_add_of_a_missing_path_is_exit_4_no_such_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.safetensors"
    for args in (["models", "add", str(missing)], ["loras", "add", str(missing)]):
        result = runner.invoke(
            node_app, [*args, "--models-dir", str(tmp_path / "m")], env={"SOGNI_DEBUG": None}
        )
        line = one_line(result, 4)
        assert line == f"error: {missing}: No such file or directory (check the path)\n"


@pytest.mark.parametrize(
    ("name", "content", "what", "todo"),
    [
        ("short.safetensors", b"hello", "not a safetensors file (too short)", "download it again"),
        ("big.safetensors", b"\xff" * 16, "not a safetensors file (bad header size)", "damaged"),
        ("model.ckpt", b"pickle", "only .safetensors single files are supported", "a diffusers"),
    ],
)
def test_models_add_of_a_file_that_is_no_checkpoint_says_what_helps(
    tmp_path: Path, name: str, content: bytes, what: str, todo: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = runner.invoke(
        node_app,
        ["models", "add", str(path), "--models-dir", str(tmp_path / "m")],
        env={"SOGNI_DEBUG": None},
    )
    line = one_line(result, 3)
    assert line.startswith(f"error: {name}: {what} ("), line
    assert todo in line and "--class" not in line, line


# --- finding 10: a missing published folder is exit 4 for both CLIs -------------------------
def test_a_missing_epochs_folder_is_exit_4_for_rewards_and_epoch_audit(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    create_keystore(tmp_path / "wallet.json", "pw", kdf_n=2)
    env = {**_env(tmp_path), "SOGNI_DEBUG": None, "SOGNI_NODE_CONFIG": None}
    node = one_line(runner.invoke(node_app, ["rewards", "--epochs-dir", str(missing)], env=env), 4)
    assert f"published epochs folder {missing} does not exist" in node
    audit = one_line(
        runner.invoke(coordinator_app, ["epoch", "audit", "--published", str(missing)]), 4
    )
    assert f"{missing} does not exist" in audit


# --- finding 11: rewards claim with nothing due ---------------------------------------------
class _Distributor:
    def __init__(self, claimed: int) -> None:
        self._claimed = claimed

    def matured_epoch(self) -> int:
        return 2

    def latest_epoch(self) -> int:
        return 2

    def claimed(self, account: str) -> int:
        return self._claimed


@pytest.mark.parametrize(
    ("claimed", "earned", "said"),
    [
        (0, 0, "earned nothing through epoch 2, the newest matured)"),
        (5 * SOGNI, 5 * SOGNI, "already claimed 5 SOGNI, all it earned through epoch 2"),
        (5 * SOGNI, 8 * SOGNI, "3 SOGNI more is in epochs not matured yet: claim again then)"),
    ],
)
def test_rewards_claim_with_nothing_due_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int, earned: int, said: str
) -> None:
    deployment = SimpleNamespace(distributor=_Distributor(claimed))
    monkeypatch.setattr(rewards_cli, "_required_deployment", lambda cfg, url: deployment)
    monkeypatch.setattr(rewards_cli, "_accounts", lambda cfg: (WALLET, WALLET))
    monkeypatch.setattr(rewards_cli, "_epochs_dir", lambda *a, **k: tmp_path)
    monkeypatch.setattr(rewards_cli, "_published", lambda folder: [])
    monkeypatch.setattr(
        sogni_node.rewards,
        "audit",
        lambda account, receipts, epochs, **kw: RewardsReport(account, earned=earned),
    )
    monkeypatch.setattr(sogni_node.rewards, "plan_claim", lambda d, account, epochs: None)
    env = {**_env(tmp_path), "SOGNI_DEBUG": None, "SOGNI_NODE_CONFIG": None}
    result = runner.invoke(node_app, ["rewards", "claim"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"nothing to claim ({WALLET} "), result.stdout
    assert said in result.stdout and "claimed 0 SOGNI" not in result.stdout
