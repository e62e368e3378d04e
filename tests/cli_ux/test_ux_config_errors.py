"""Config values both daemons accepted and then crashed (or looped) on, now refused when the
config loads: one line naming the key and where it came from, exit 2.

`listen` must be /ip4|ip6/<ip>/tcp/<port>; a node's `coordinators` must be dialable and name
a real peer id; a node must trust someone (`trusted_coordinators` or `network_operators`);
a path key given a number, an enum value not in its choices, a missing or broken config file
each say what to do about it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sogni_node
from sogni_coordinator.cli import app as coordinator_app
from sogni_node.cli import app as node_app
from sogni_protocol.settings import check_peer_addr, check_peer_id
from tests.cli_ux.one_line import one_line

runner = CliRunner()
PEER = "12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
COORDINATOR = f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}"
TRUSTED = "0x" + "ab" * 20
BAD_LISTEN = {
    "/ip4/127.0.0.1/udp/4001": "TCP only",
    "/dns4/localhost/tcp/1": "TCP only",
    "/ip4/300.1.1.1/tcp/4001": "is not IPv4",
    "/ip4/127.0.0.1/tcp/99999": "a port is 0-65535",
}
BAD_COORDINATORS = {
    f"/ip4/300.1.1.1/tcp/4001/p2p/{PEER}": "is not IPv4",
    f"/ip4/127.0.0.1/tcp/99999/p2p/{PEER}": "a port is 0-65535",
    "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWxxxx": "'12D3KooWxxxx' is not a peer id",
    f"/ip4/127.0.0.1/udp/4001/p2p/{PEER}": "no IP (or DNS name) and TCP port",
}


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """`sogni-node start` runs this instead of the daemon: it records the config it got."""
    started: list[object] = []
    fake = types.ModuleType("sogni_node.daemon")
    fake.run = lambda cfg, announce=False: started.append(cfg)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sogni_node.daemon", fake)
    monkeypatch.setattr(sogni_node, "daemon", fake, raising=False)
    return started


def _node_env(tmp_path: Path, **extra: str | None) -> dict[str, str | None]:
    return {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_NODE_COORDINATORS": COORDINATOR,
        "SOGNI_NODE_TRUSTED_COORDINATORS": TRUSTED,
        "SOGNI_NODE_NETWORK_OPERATORS": None,
        "SOGNI_NODE_LISTEN": None,
        "SOGNI_DEBUG": None,
        **extra,
    }


def test_node_start_refuses_a_listen_address_it_cannot_serve(
    tmp_path: Path, fake_daemon: list[object]
) -> None:
    for value, why in BAD_LISTEN.items():
        result = runner.invoke(
            node_app, ["start"], env=_node_env(tmp_path, SOGNI_NODE_LISTEN=value)
        )
        line = one_line(result, 2)
        assert line.startswith(f"error: listen: {value!r}") and why in line, line
        assert "(env SOGNI_NODE_LISTEN)" in line
    assert fake_daemon == []
    ok = runner.invoke(node_app, ["start"], env=_node_env(tmp_path))  # the same, well set
    assert ok.exit_code == 0, ok.output
    assert len(fake_daemon) == 1


def test_coordinator_start_refuses_a_listen_address_it_cannot_serve(tmp_path: Path) -> None:
    for value, why in BAD_LISTEN.items():
        env = {
            "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
            "SOGNI_COORDINATOR_CONFIG": None,
            "SOGNI_COORDINATOR_LISTEN": value,
            "SOGNI_DEBUG": None,
        }
        line = one_line(runner.invoke(coordinator_app, ["start"], env=env), 2)
        assert line.startswith(f"error: listen: {value!r}") and why in line, line


def test_a_listen_address_in_a_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('listen = "/ip4/127.0.0.1/udp/4001"\n')
    line = one_line(
        runner.invoke(node_app, ["config", "-c", str(config)], env=_node_env(tmp_path)), 2
    )
    assert f"(in {config})" in line and "listen:" in line


def test_node_start_refuses_coordinators_it_could_never_reach(
    tmp_path: Path, fake_daemon: list[object]
) -> None:
    for value, why in BAD_COORDINATORS.items():
        env = _node_env(tmp_path, SOGNI_NODE_COORDINATORS=value)
        line = one_line(runner.invoke(node_app, ["start"], env=env), 2)
        assert line.startswith("error: coordinators: ") and why in line, line
        assert "(env SOGNI_NODE_COORDINATORS)" in line
    assert fake_daemon == []


def test_node_start_refuses_to_run_trusting_no_coordinator(
    tmp_path: Path, fake_daemon: list[object]
) -> None:
    """`coordinators` without `trusted_coordinators` or `network_operators`: every offer
    would be declined, forever."""
    env = _node_env(tmp_path, SOGNI_NODE_TRUSTED_COORDINATORS=None)
    line = one_line(runner.invoke(node_app, ["start"], env=env), 2)
    assert "none is trusted" in line and "trusted_coordinators" in line
    assert "network_operators" in line and "SOGNI_NODE_TRUSTED_COORDINATORS" in line
    assert fake_daemon == []
    operators = _node_env(
        tmp_path, SOGNI_NODE_TRUSTED_COORDINATORS=None, SOGNI_NODE_NETWORK_OPERATORS=TRUSTED
    )
    assert runner.invoke(node_app, ["start"], env=operators).exit_code == 0
    assert len(fake_daemon) == 1


def test_peer_ids_are_checked_not_just_base58() -> None:
    for good in (
        PEER,
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha2-256 of an RSA key
        "16Uiu2HAm4pUKfrDutP1o12dVE3rikuAjXiZtPvfbHUXTTv7cPctJ",  # secp256k1
    ):
        check_peer_id(good)
    for bad in ("garbage", "12D3KooWxxxx", PEER[:-1], PEER + "1", "", "0OIl"):
        with pytest.raises(ValueError, match="is not a peer id"):
            check_peer_id(bad)
    check_peer_addr(f"/dns4/c.example/tcp/4001/p2p/{PEER}")
    with pytest.raises(ValueError, match="ends without /p2p/"):
        check_peer_addr("/ip4/127.0.0.1/tcp/4001")


def test_a_number_where_a_path_belongs_names_the_key_and_file(tmp_path: Path) -> None:
    node_toml = tmp_path / "node.toml"
    node_toml.write_text("data_dir = 5\n")
    line = one_line(runner.invoke(node_app, ["config", "-c", str(node_toml)]), 2)
    assert line.startswith("error: data_dir: Expected a path") and f"(in {node_toml})" in line
    coordinator_toml = tmp_path / "coordinator.toml"
    coordinator_toml.write_text("database = 5\n")
    result = runner.invoke(coordinator_app, ["workers", "-c", str(coordinator_toml)])
    line = one_line(result, 2)
    assert line.startswith("error: database: Expected a path") and str(coordinator_toml) in line


def test_an_enum_error_lists_the_choices(tmp_path: Path) -> None:
    result = runner.invoke(node_app, ["config"], env=_node_env(tmp_path, SOGNI_NODE_DEVICE="tpu"))
    line = one_line(result, 2)
    assert "SOGNI_NODE_DEVICE: Invalid enum value 'tpu'" in line
    assert "expected one of: auto, cpu, cuda, mps" in line


def test_a_missing_or_broken_config_file_is_not_a_key_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.toml"
    line = one_line(runner.invoke(node_app, ["config", "-c", str(missing)]), 2)
    assert f"config file {missing} not found" in line and "fix that key" not in line
    assert "SOGNI_NODE_CONFIG" in line
    broken = tmp_path / "bad.toml"
    broken.write_text("x =\n")
    line = one_line(runner.invoke(node_app, ["config", "-c", str(broken)]), 2)
    assert "not valid TOML" in line and "fix the TOML syntax" in line
    assert "fix that key" not in line


def test_a_malformed_postgres_url_is_a_config_error_without_its_password(
    tmp_path: Path,
) -> None:
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_DEBUG": None,
    }
    for url in ("postgres://user:SECRETPW@[bad", "postgresql://user:SECRETPW@db:99999/x"):
        env["SOGNI_COORDINATOR_DATABASE"] = url
        result = runner.invoke(coordinator_app, ["workers"], env=env)
        line = one_line(result, 2)
        assert line.startswith("error: database: not a valid PostgreSQL URL"), line
        assert "SECRETPW" not in result.output
    # what libpq accepts loads: a password with `#` unencoded (urlsplit read it as a port)
    from sogni_coordinator.config import check_database_url

    check_database_url("postgresql://sogni:se#cretpw@db.example:5432/sogni")


def test_one_coordinator_listed_twice_is_refused_naming_the_key(tmp_path: Path) -> None:
    """Each address got its own session to the same coordinator, each replacing the other:
    sessions flapped, jobs dropped mid-render ("node replaced or removed" 20 times in 40 s)."""
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(
        f'coordinators = ["/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",'
        f' "/dns4/c.example/tcp/4001/p2p/{PEER}"]\n'
    )
    line = one_line(runner.invoke(node_app, ["config", "-c", str(node_toml)]), 2)
    assert "coordinators:" in line and "one coordinator" in line and PEER in line
