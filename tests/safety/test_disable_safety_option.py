"""The client asks for `disableSafety` the way the official SDKs do: off unless asked."""

from __future__ import annotations

import msgspec
from typer.testing import CliRunner

from sogni_app.api import render_request
from sogni_app.cli import app


def test_the_request_carries_disable_safety_only_when_asked() -> None:
    plain = msgspec.json.decode(msgspec.json.encode(render_request("a cat", model_id="m")))
    opted = render_request("a cat", model_id="m", disable_safety=True)
    assert plain["disableSafety"] is False
    assert msgspec.json.decode(msgspec.json.encode(opted))["disableSafety"] is True


def test_sogni_render_has_the_option() -> None:
    result = CliRunner().invoke(app, ["render", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--disable-safety" in result.output
