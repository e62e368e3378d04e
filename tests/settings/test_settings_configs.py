"""Node and coordinator configs: defaults, derived paths, env-only setup, the example files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_node.config import NodeConfig, load_node_config
from sogni_protocol.settings import DEFAULT_CHAIN_ID, SettingsError, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_node_defaults_work_without_file() -> None:
    cfg = load_node_config(None, env={})
    home = Path.home()
    assert cfg.data_dir == home / ".sogni/node"
    assert cfg.models_dir == home / ".sogni/node/models"
    assert cfg.keystore == home / ".sogni/node/wallet.json"
    assert cfg.journal_path == home / ".sogni/node/journal.db"
    assert cfg.node_key_path == home / ".sogni/node/node.key"
    assert (cfg.slots, cfg.backend, cfg.device, cfg.threads) == (1, "auto", "auto", 0)
    assert cfg.listen == "/ip4/127.0.0.1/tcp/0"
    assert cfg.http_listen == "127.0.0.1:9860"
    assert cfg.password_env == "SOGNI_NODE_PASSWORD"
    assert cfg.chain_id == DEFAULT_CHAIN_ID
    assert cfg.payout_address is None and cfg.log_json is None


def test_node_paths_follow_data_dir_unless_set(tmp_path: Path) -> None:
    cfg = NodeConfig(data_dir=tmp_path)
    assert cfg.models_dir == tmp_path / "models"
    assert cfg.keystore == tmp_path / "wallet.json"
    cfg = load_node_config(
        None, env={"SOGNI_NODE_DATA_DIR": str(tmp_path), "SOGNI_NODE_MODELS_DIR": "/models"}
    )
    assert cfg.models_dir == Path("/models")
    assert cfg.keystore == tmp_path / "wallet.json"


OTHER_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a second coordinator


def test_node_configured_by_env_alone(tmp_path: Path) -> None:
    coordinator = f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_COORDINATORS": f"{coordinator}, /dns4/c.example/tcp/4001/p2p/{OTHER_PEER}",
        "SOGNI_NODE_TRUSTED_COORDINATORS": "0x" + "ab" * 20,
        "SOGNI_NODE_SLOTS": "2",
        "SOGNI_NODE_DEVICE": "cuda",
        "SOGNI_NODE_LOG_JSON": "true",
        "SOGNI_NODE_PASSWORD": "not a setting, ignored",
    }
    cfg = load_node_config(None, env=env)
    assert cfg.coordinators[0] == coordinator and len(cfg.coordinators) == 2
    assert cfg.slots == 2 and cfg.device == "cuda" and cfg.log_json is True
    assert cfg.is_trusted("0x" + "AB" * 20)
    assert not cfg.is_trusted("0x" + "00" * 20)


def test_node_config_file_from_env_var(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("slots = 3\n")
    assert load_node_config(None, env={"SOGNI_NODE_CONFIG": str(path)}).slots == 3
    assert load_node_config(path, env={"SOGNI_NODE_SLOTS": "4"}).slots == 4


def test_node_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("slots = 17\n")
    with pytest.raises(
        SettingsError, match=rf"^slots: Expected `int` <= 16 \(in {re.escape(str(path))}\)$"
    ):
        load_node_config(path, env={})
    with pytest.raises(SettingsError, match=r"^SOGNI_NODE_SLOTS: Expected `int` >= 1$"):
        load_node_config(None, env={"SOGNI_NODE_SLOTS": "0"})
    with pytest.raises(SettingsError, match="not found"):
        load_node_config(tmp_path / "missing.toml", env={})
    path.write_text('coordinators = ["/ip4/1.2.3.4/tcp/4001"]\n')  # no /p2p/: cannot authenticate
    with pytest.raises(SettingsError, match=r"^coordinators: expected a coordinator.s multiaddr"):
        load_node_config(path, env={})
    path.write_text('trusted_coordinators = ["0x1234"]\n')
    with pytest.raises(SettingsError, match=r"^trusted_coordinators: "):
        load_node_config(path, env={})
    with pytest.raises(SettingsError, match=r"^SOGNI_NODE_BACKEND: Invalid enum value 'onnx'"):
        load_node_config(None, env={"SOGNI_NODE_BACKEND": "onnx"})
    with pytest.raises(
        SettingsError, match=r"must be greater .*\(env SOGNI_NODE_HEARTBEAT_TIMEOUT\)$"
    ):
        load_node_config(None, env={"SOGNI_NODE_HEARTBEAT_TIMEOUT": "1"})
    path.write_text("heartbeat_interval = 20.0\n")
    with pytest.raises(
        SettingsError, match=rf"^heartbeat_timeout .* \(in {re.escape(str(path))}\)$"
    ):
        load_node_config(path, env={})


def test_coordinator_defaults_and_env(tmp_path: Path) -> None:
    cfg = load_coordinator_config(None, env={})
    assert cfg.data_dir == Path.home() / ".sogni/coordinator"
    assert cfg.keystore == cfg.data_dir / "signer.json"
    assert cfg.database == cfg.data_dir / "coordinator.db"
    assert cfg.listen == "/ip4/127.0.0.1/tcp/4001"
    assert cfg.http_listen == "127.0.0.1:8080"
    assert cfg.chain_id == 131277322940537
    assert cfg.verifying_contract == "0x" + "00" * 20
    assert (cfg.heartbeat_interval, cfg.heartbeat_timeout) == (5.0, 15.0)
    assert cfg.models == []
    cfg = load_coordinator_config(
        None,
        env={
            "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
            "SOGNI_COORDINATOR_MODELS": "sogni-tiny-sd,sdxl-base-1.0",
            "SOGNI_COORDINATOR_CHAIN_ID": "8453",
            "SOGNI_COORDINATOR_BILLING": "required",  # not a local network: every job paid
        },
    )
    assert cfg.database == tmp_path / "coordinator.db"
    assert cfg.models == ["sogni-tiny-sd", "sdxl-base-1.0"]
    assert cfg.chain_id == 8453 and cfg.billing == "required" and not cfg.local
    with pytest.raises(SettingsError, match="billing must be 'required'"):
        load_coordinator_config(
            None,
            env={"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path), "SOGNI_COORDINATOR_CHAIN_ID": "8453"},
        )


def test_coordinator_errors() -> None:
    with pytest.raises(SettingsError, match=r"^SOGNI_COORDINATOR_MODELS: expected letters, digits"):
        load_coordinator_config(None, env={"SOGNI_COORDINATOR_MODELS": "bad model"})
    with pytest.raises(SettingsError, match="heartbeat_timeout"):
        load_coordinator_config(None, env={"SOGNI_COORDINATOR_HEARTBEAT_TIMEOUT": "5"})
    with pytest.raises(
        SettingsError, match=r"unknown setting: chainid \(did you mean chain_id\?\)"
    ):
        load_settings(CoordinatorConfig, "chainid = 1\n", {}, "SOGNI_COORDINATOR")


@pytest.mark.parametrize(
    ("loader", "env_name"),
    [
        (load_node_config, "SOGNI_NODE_HTTP_LISTEN"),
        (load_coordinator_config, "SOGNI_COORDINATOR_HTTP_LISTEN"),
    ],
)
def test_http_listen_is_host_port_or_off(
    tmp_path: Path, loader: Callable[..., Any], env_name: str
) -> None:
    for value in ("127.0.0.1:0", "0.0.0.0:8080", "[::1]:9860", "localhost:80", "off"):
        assert loader(None, env={env_name: value}).http_listen == value
    with pytest.raises(
        SettingsError, match=rf"^http_listen: '8080' is not host:port.* \(env {env_name}\)$"
    ):
        loader(None, env={env_name: "8080"})
    with pytest.raises(SettingsError, match=r"^http_listen: .*port must be 0-65535"):
        loader(None, env={env_name: "127.0.0.1:70000"})
    path = tmp_path / "daemon.toml"
    path.write_text('http_listen = "::1:80"\n')
    with pytest.raises(SettingsError, match=rf"in brackets.* \(in {re.escape(str(path))}\)$"):
        loader(path, env={})


def _uncommented(text: str) -> str:
    """The example with its commented-out example values switched on."""
    out = []
    for line in text.splitlines():
        if re.match(r"^# [a-z_]+ = ", line) or re.match(r'^  # "', line):
            line = line.replace("# ", "", 1)
        out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize(
    ("name", "loader", "cls"),
    [
        ("node.example.toml", load_node_config, NodeConfig),
        ("coordinator.example.toml", load_coordinator_config, CoordinatorConfig),
    ],
)
def test_example_configs_load(tmp_path: Path, name: str, loader: object, cls: type) -> None:
    path = CONFIGS / name
    cfg = loader(path, env={})  # type: ignore[operator]
    assert cfg == cls()  # the examples document the defaults
    enabled = tmp_path / name
    enabled.write_text(_uncommented(path.read_text()))
    assert enabled.read_text() != path.read_text()
    loader(enabled, env={})  # type: ignore[operator]  # and their commented examples are valid


def test_the_relay_floor_defaults_to_one_sogni_off_a_local_network() -> None:
    """Off a local network a relayed claim must add 1 SOGNI unless configured (a stranger
    would spend the relayer's gas on dust); on a dev chain any amount; set: as set."""
    assert CoordinatorConfig().relay_floor == 0  # the embedded chain
    public = CoordinatorConfig(chain_id=8453, billing="required")
    assert public.relay_floor == 10**18
    assert CoordinatorConfig(chain_id=8453, billing="required", relay_min_claim=5).relay_floor == 5
    assert CoordinatorConfig(relay_min_claim=7).relay_floor == 7


def _patterns(info: Any, seen: set[Any] | None = None) -> set[str]:
    """Every regex a config type (msgspec's inspect info) checks a string against."""
    import msgspec.inspect as mi

    seen = set() if seen is None else seen
    if isinstance(info, mi.StrType):
        return {info.pattern} if info.pattern else set()
    if isinstance(info, mi.StructType):
        if info.cls in seen:
            return set()
        seen.add(info.cls)
        return set().union(*(_patterns(f.type, seen) for f in info.fields))
    inner = [getattr(info, a) for a in ("item_type", "key_type", "value_type") if hasattr(info, a)]
    inner += list(getattr(info, "types", ()))
    return set().union(set(), *(_patterns(t, seen) for t in inner))


@pytest.mark.parametrize("cls", [NodeConfig, CoordinatorConfig])
def test_a_config_value_of_the_wrong_shape_is_named_in_words_not_as_a_regex(cls: type) -> None:
    """Every pattern a config field checks has words for its error ("expected an Ethereum
    address ..."): a node operator never reads `matching regex '^(/[A-Za-z0-9_.:%-]+)+...'`."""
    import msgspec.inspect as mi

    from sogni_protocol.settings import _in_words

    patterns = _patterns(mi.type_info(cls))
    assert patterns
    for pattern in patterns:
        shown = pattern.replace("\\", "\\\\")  # as msgspec's error prints it
        assert not _in_words(f"Expected `str` matching regex '{shown}'").startswith("Expected")


def test_a_malformed_coordinator_address_in_the_config_says_what_one_looks_like() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(NodeConfig, 'coordinators = ["hello"]', {}, "SOGNI_NODE", source="n.toml")
    assert "regex" not in str(err.value) and "/p2p/12D3KooW" in str(err.value)
    assert str(err.value).startswith("coordinators: expected a coordinator's multiaddr")
