"""`sogni-node config` shows every setting, set or not, with where its value comes from; a
node without coordinators refuses to start with one line naming the setting (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from typer.testing import CliRunner

from sogni_node.cli import app
from sogni_node.config import NodeConfig

runner = CliRunner()


def _env(tmp_path: Path, **extra: str | None) -> dict[str, str | None]:
    return {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_NODE_COORDINATORS": None,
        **extra,
    }


def test_config_shows_every_key_with_its_source(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("slots = 2\n")
    result = runner.invoke(
        app, ["config", "-c", str(toml)], env=_env(tmp_path, SOGNI_NODE_THREADS="3")
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    for field in msgspec.structs.fields(NodeConfig):  # every key, including unset ones
        assert field.name in rows, field.name
    assert rows["slots"].endswith(f"2  [file {toml}]")
    assert rows["threads"].endswith("3  [env SOGNI_NODE_THREADS]")
    assert rows["payout_address"].endswith("(not set)  [default]")
    assert rows["coordinators"].endswith("(not set)  [default]")
    assert rows["models_dir"].endswith("[default (under data_dir)]")

    as_json = runner.invoke(app, ["config", "--json"], env=_env(tmp_path))
    data = json.loads(as_json.stdout)
    assert data["payout_address"] is None and data["chain_url"] is None  # shown, unset


def test_a_node_without_coordinators_refuses_to_start(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start"], env=_env(tmp_path))
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: no coordinators configured")
    assert "SOGNI_NODE_COORDINATORS" in line and "`coordinators`" in line
    assert not (tmp_path / "node.key").exists()  # refused before anything started
