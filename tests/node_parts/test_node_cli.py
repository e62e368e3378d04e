"""`sogni-node` CLI: keys create/show, probe, config, start (with a fake daemon).

Keystores use scrypt N=4 through the hidden `SOGNI_KDF_N` env override.
"""

from __future__ import annotations

import json
import stat
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sogni_node
from sogni_node.cli import app
from sogni_node.config import NodeConfig
from sogni_node.hardware import probe
from sogni_wallet.keystore import load_wallet

runner = CliRunner()


def env_for(tmp_path: Path, **extra: str | None) -> dict[str, str | None]:
    """CliRunner env (None unsets a variable); isolated from the caller's SOGNI_NODE_*."""
    return {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_PASSWORD": "correct horse",
        "SOGNI_KDF_N": "4",
        "SOGNI_NODE_CONFIG": None,
        **extra,
    }


def test_keys_create_and_show(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    result = runner.invoke(app, ["keys", "create"], env=env)
    assert result.exit_code == 0, result.output
    address = result.stdout.split()[1]
    keystore = tmp_path / "wallet.json"
    assert f"keystore: {keystore}" in result.stdout
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    wallet = load_wallet(keystore, "correct horse")
    assert wallet.address == address
    assert json.loads(keystore.read_text())["crypto"]["kdfparams"]["n"] == 4

    result = runner.invoke(app, ["keys", "show", "--json"], env=env)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown == {"address": address, "keystore": str(keystore), "payout_address": address}
    assert wallet.private_key.hex() not in result.output

    result = runner.invoke(app, ["keys", "show"], env=env)
    assert result.exit_code == 0 and address in result.stdout


def test_keys_create_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    first = runner.invoke(app, ["keys", "create"], env=env).stdout.split()[1]
    result = runner.invoke(app, ["keys", "create"], env=env)
    assert result.exit_code == 3  # refused
    assert result.stderr.startswith("error: keystore ") and result.stderr.count("\n") == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["keys", "create", "--force"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.split()[1] != first
    assert len(list(tmp_path.glob("wallet.json.*.bak"))) == 1


def test_keys_create_without_password_or_terminal(tmp_path: Path) -> None:
    env = env_for(tmp_path, SOGNI_NODE_PASSWORD=None)
    result = runner.invoke(app, ["keys", "create"], env=env)
    assert result.exit_code == 3  # the keystore refuses to go without a password
    assert "set $SOGNI_NODE_PASSWORD" in result.stderr


def test_keys_show_without_keystore(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "show"], env=env_for(tmp_path))
    assert result.exit_code == 4  # unavailable: a file the user must create
    assert "sogni-node keys create" in result.stderr


def test_config_errors_exit_2_with_the_key(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "show"], env=env_for(tmp_path, SOGNI_NODE_SLOTS="x"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: SOGNI_NODE_SLOTS: Expected `int`")
    toml = tmp_path / "node.toml"
    toml.write_text("slot = 2\n")
    result = runner.invoke(app, ["config", "--config", str(toml)], env=env_for(tmp_path))
    assert result.exit_code == 2
    assert "unknown setting: slot (did you mean slots?)" in result.stderr


def test_config_prints_effective_config(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("slots = 2\n")
    result = runner.invoke(
        app, ["config", "-c", str(toml), "--json"], env=env_for(tmp_path, SOGNI_NODE_THREADS="3")
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["slots"], data["threads"]) == (2, 3)
    assert data["journal_path"] == str(tmp_path / "journal.db")


def test_probe_json() -> None:
    result = runner.invoke(app, ["probe", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["device"] == probe().device  # cuda/mps where present, else cpu
    assert info["memory_bytes"] > 0 and info["max_pixels"] > 0
    result = runner.invoke(app, ["probe"])
    assert result.exit_code == 0 and "GiB" in result.stdout
    missing = "mps" if info["device"] == "cuda" else "cuda"  # a device this machine lacks
    result = runner.invoke(app, ["probe", "--device", missing])
    assert result.exit_code == 4 and missing.upper() in result.stderr  # unavailable


def test_start_calls_daemon_run_with_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[NodeConfig] = []
    fake = types.ModuleType("sogni_node.daemon")
    fake.run = lambda cfg, announce=False: seen.append(cfg)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sogni_node.daemon", fake)
    monkeypatch.setattr(sogni_node, "daemon", fake, raising=False)
    env = env_for(
        tmp_path,
        SOGNI_NODE_SLOTS="2",
        SOGNI_NODE_LOG_JSON="true",
        SOGNI_NODE_COORDINATORS="/ip4/127.0.0.1/tcp/9/p2p/12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB",
        SOGNI_NODE_TRUSTED_COORDINATORS="0x" + "11" * 20,
    )
    result = runner.invoke(app, ["start"], env=env)
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and seen[0].slots == 2 and seen[0].data_dir == tmp_path


def test_an_existing_key_names_the_force_option_once(tmp_path: Path) -> None:
    from sogni_wallet.keystore import KeystoreExists, create_keystore

    create_keystore(tmp_path / "k.json", "pw", kdf_n=2)
    with pytest.raises(KeystoreExists) as info:
        create_keystore(
            tmp_path / "k.json", "pw", kdf_n=2, create_hint="sogni-coordinator keys create"
        )
    assert str(info.value).endswith("sogni-coordinator keys create --force")
    assert str(info.value).count("--force") == 1


def test_importing_the_renderer_prints_no_third_party_chatter() -> None:
    """torchao / torch pytree / diffusers import-time warnings are quieted by `sogni_node`."""
    import subprocess

    code = (
        "import sogni_node.render.diffusers_backend, torchao\n"
        "from transformers import CLIPImageProcessor\n"
        "CLIPImageProcessor()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for noise in (
        "register_constant",
        "Unable to import `torchao`",
        "Failed to load",
        "requires torchvision",
    ):
        assert noise not in out.stderr, out.stderr
