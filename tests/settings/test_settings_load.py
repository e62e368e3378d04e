"""`load_settings`: TOML + env overrides, typed env conversion, errors naming key and source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest
from msgspec import Meta

from sogni_protocol.settings import (
    SettingsError,
    env_names,
    load_settings,
    settings_to_builtins,
    unused_env,
)


class Chain(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rpc: str = "embedded"
    chain_id: Annotated[int, Meta(ge=1)] = 1


class Sample(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    slots: Annotated[int, Meta(ge=1, le=16)] = 1
    ratio: float = 0.5
    enabled: bool = False
    name: str = "x"
    tags: list[str] = msgspec.field(default_factory=list)
    ports: list[int] = msgspec.field(default_factory=list)
    home: Path = Path("/tmp")
    json: bool | None = None
    payout: str | None = None
    mode: Literal["a", "b"] = "a"
    chain: Chain = msgspec.field(default_factory=Chain)


def load(text: str | None, env: dict[str, str] | None = None) -> Sample:
    return load_settings(Sample, text, env or {}, "APP", source="/etc/app.toml")


def test_defaults_without_file_or_env() -> None:
    assert load(None) == Sample()


def test_toml_values_and_nested_table() -> None:
    s = load('slots = 3\ntags = ["a", "b"]\nhome = "~/data"\n[chain]\nchain_id = 8453\n')
    assert s.slots == 3
    assert s.tags == ["a", "b"]
    assert s.home == Path("~/data").expanduser()
    assert s.chain == Chain(chain_id=8453)


def test_env_overrides_file_and_converts_types() -> None:
    env = {
        "APP_SLOTS": "4",
        "APP_RATIO": "0.25",
        "APP_ENABLED": "yes",
        "APP_TAGS": "x, y,,z",
        "APP_PORTS": "1,2",
        "APP_HOME": "/srv/app",
        "APP_JSON": "false",
        "APP_MODE": "b",
        "APP_CHAIN__CHAIN_ID": "10",
    }
    s = load("slots = 2\nenabled = false\n[chain]\nrpc = 'http://x'\n", env)
    assert (s.slots, s.ratio, s.enabled, s.mode) == (4, 0.25, True, "b")
    assert s.tags == ["x", "y", "z"]
    assert s.ports == [1, 2]
    assert s.home == Path("/srv/app")
    assert s.json is False
    assert s.chain == Chain(rpc="http://x", chain_id=10)  # env merges into the file's table


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("TRUE", True), ("off", False)])
def test_env_bool_spellings(raw: str, value: bool) -> None:
    assert load(None, {"APP_ENABLED": raw}).enabled is value


def test_empty_env_clears_optional_field() -> None:
    assert load('payout = "0xabc"', {"APP_PAYOUT": ""}).payout is None


def test_prefix_with_trailing_underscore() -> None:
    assert load_settings(Sample, None, {"APP_SLOTS": "5"}, "APP_").slots == 5


def test_file_error_names_key_and_file() -> None:
    with pytest.raises(SettingsError) as info:
        load("slots = 0")
    assert str(info.value) == "slots: Expected `int` >= 1 (in /etc/app.toml)"
    assert info.value.key == "slots"
    assert info.value.source == "/etc/app.toml"


def test_nested_error_names_dotted_key() -> None:
    with pytest.raises(SettingsError, match=r"^chain\.chain_id: Expected `int` >= 1"):
        load("[chain]\nchain_id = 0\n")


def test_env_error_names_env_var() -> None:
    with pytest.raises(SettingsError) as info:
        load("slots = 2", {"APP_SLOTS": "99"})
    assert str(info.value) == "APP_SLOTS: Expected `int` <= 16"
    assert info.value.source == "environment"


def test_env_error_for_list_item_and_nested_field() -> None:
    with pytest.raises(SettingsError, match=r"^APP_PORTS: Expected `int`"):
        load(None, {"APP_PORTS": "1,two"})
    with pytest.raises(SettingsError, match=r"^APP_CHAIN__CHAIN_ID: "):
        load(None, {"APP_CHAIN__CHAIN_ID": "nope"})


def test_unparseable_env_bool_is_an_error() -> None:
    with pytest.raises(SettingsError, match=r"^APP_ENABLED: Expected `bool`"):
        load(None, {"APP_ENABLED": "maybe"})


def test_wrong_type_in_file() -> None:
    with pytest.raises(
        SettingsError,
        match=r"^mode: Invalid enum value 'c'; expected one of: a, b \(in /etc/app.toml\)",
    ):
        load('mode = "c"')


def test_unknown_keys_are_named_with_suggestion() -> None:
    with pytest.raises(SettingsError) as info:
        load("slotz = 1\nbogus = 2\n[chain]\nrcp = 'x'\n")
    msg = str(info.value)
    assert msg.startswith("/etc/app.toml: unknown settings: ")
    assert "slotz (did you mean slots?)" in msg
    assert "bogus" in msg
    assert "chain.rcp (did you mean chain.rpc?)" in msg


def test_invalid_toml_names_file() -> None:
    with pytest.raises(SettingsError, match=r"^/etc/app.toml: not valid TOML"):
        load("slots = = 1")


def test_default_source_name() -> None:
    with pytest.raises(SettingsError, match=r"\(in <config>\)"):
        load_settings(Sample, "slots = 0", {}, "APP")


def test_env_names_and_unused_env() -> None:
    names = env_names(Sample, "APP")
    assert names["APP_SLOTS"] == ("slots",)
    assert names["APP_CHAIN__RPC"] == ("chain", "rpc")
    assert "APP_CHAIN" not in names
    env = {"APP_SLOTS": "1", "APP_SLOT": "1", "APP_PASSWORD": "pw", "OTHER": "1"}
    assert unused_env(Sample, env, "APP", ignore=["APP_PASSWORD"]) == ["APP_SLOT"]


def test_settings_to_builtins_for_printing() -> None:
    out = settings_to_builtins(Sample(home=Path("/h")))
    assert out["home"] == "/h"
    assert "payout" not in out  # None dropped
    assert out["chain"] == {"rpc": "embedded", "chain_id": 1}


def test_a_misspelt_variable_is_warned_about_with_the_closest_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sogni_node.config import NodeConfig

    env = {
        "SOGNI_NODE_HTTP_LISTN": "127.0.0.1:0",  # a typo: warned, ignored
        "SOGNI_NODE_PASSWORD": "x",  # the default password variable: a known name
        "SOGNI_NODE_CONFIG": "",  # the config-file variable: known
    }
    cfg = load_settings(NodeConfig, None, env, "SOGNI_NODE")
    assert cfg.http_listen == "127.0.0.1:9860"  # not applied
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: SOGNI_NODE_HTTP_LISTN is not a setting and is ignored; "
        "did you mean SOGNI_NODE_HTTP_LISTEN?"
    ]
