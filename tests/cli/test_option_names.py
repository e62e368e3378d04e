"""Input errors name the option the user typed (`-n/--number`), never the wire field
(`$.numberOfImages`): `sogni render` and `sogni quote` through their real command code."""

from __future__ import annotations

import msgspec
import pytest
from typer.testing import CliRunner

from sogni_app.cli import app
from sogni_app.option_names import REQUEST_OPTIONS, in_option_terms
from sogni_protocol.messages import RenderRequest

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["render", "hi", "-n", "0"], "error: -n/--number: expected `int` >= 1"),
        (["render", "hi", "--steps", "0"], "error: --steps: expected `int` >= 1"),
        (
            ["render", "hi", "--format", "gif"],
            "error: --format: invalid enum value 'gif' (one of: png, jpeg, webp)",
        ),
        (
            ["quote", "--network", "slow"],
            "error: --network: invalid enum value 'slow' (one of: fast, relaxed)",
        ),
        (
            ["quote", "--token-type", "eth"],
            "error: --token-type: invalid enum value 'eth' (one of: spark, sogni)",
        ),
        (["render", "hi", "--lora", "glow:99"], "error: --lora glow:99: strength: expected"),
        (["quote", "--model", "sogni-shapes-64", "-n", "0"], "error: -n/--number: expected"),
        (["quote", "--model", "sogni-shapes-64", "--width", "3"], "error: --width: expected"),
    ],
)
def test_input_errors_name_the_option_typed(args: list[str], line: str) -> None:
    result = runner.invoke(app, args, env={"SOGNI_COORDINATOR_ADDR": ""})
    assert result.exit_code == 2, result.output
    assert result.output.startswith(line), result.output
    assert "$." not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_request_field_an_option_sets_is_mapped() -> None:
    fields = {f.encode_name for f in msgspec.structs.fields(RenderRequest)}
    assert set(REQUEST_OPTIONS) <= fields  # no stale wire names
    assert in_option_terms("Expected `int` - at `$.unknownField`") == (
        "Expected `int` - at `$.unknownField`"  # a field no option sets stays as it was
    )
