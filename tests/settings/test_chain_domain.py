"""A coordinator with `chain_url` but no `addresses_file` is refused (issue #15 item 1).

Without the addresses file it would sign every offer and receipt for the embedded chain's
domain, work that can never be paid on the shared chain it names. `chain deploy`, whose job
is to write that file, still loads such a config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_utils import to_checksum_address
from typer.testing import CliRunner

from sogni_coordinator.chain_cli import _config_before_deploy
from sogni_coordinator.cli import app
from sogni_coordinator.config import load_coordinator_config
from sogni_protocol.settings import SettingsError
from sogni_wallet.addresses import Addresses

URL = "http://127.0.0.1:1"  # never dialled: the config is refused before any chain call


def _addresses(path: Path) -> Path:
    one, two, three, four = (to_checksum_address("0x" + c * 40) for c in "1234")
    Addresses(31337, one, two, three, four).save(path)
    return path


def test_chain_url_alone_is_refused_naming_both_keys(tmp_path: Path) -> None:
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_CHAIN_URL": URL}
    with pytest.raises(SettingsError) as refused:
        load_coordinator_config(None, env=env)
    message = str(refused.value)
    assert "chain_url" in message and "addresses_file" in message
    assert "131277322940537" in message  # the domain it would have signed for
    assert refused.value.key == "addresses_file"


def test_chain_url_with_addresses_file_takes_its_domain(tmp_path: Path) -> None:
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_CHAIN_URL": URL,
        "SOGNI_COORDINATOR_ADDRESSES_FILE": str(_addresses(tmp_path / "addresses.json")),
    }
    cfg = load_coordinator_config(None, env=env)
    assert (cfg.chain_id, cfg.verifying_contract) == (31337, "0x" + "4" * 40)
    assert load_coordinator_config(None, env={}).chain_url is None  # embedded: no refusal


def test_start_refuses_in_one_line(tmp_path: Path) -> None:
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_CHAIN_URL": URL,
        "SOGNI_COORDINATOR_PASSWORD": "x",
    }
    result = CliRunner().invoke(app, ["start"], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: chain_url without addresses_file")
    assert not (tmp_path / "coordinator.json").exists()  # never started


def test_chain_deploy_still_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOGNI_COORDINATOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SOGNI_COORDINATOR_CHAIN_URL", URL)
    monkeypatch.delenv("SOGNI_COORDINATOR_ADDRESSES_FILE", raising=False)
    monkeypatch.delenv("SOGNI_COORDINATOR_CONFIG", raising=False)
    cfg, target = _config_before_deploy(None)
    assert cfg.chain_url == URL and target == tmp_path / "addresses.json"
