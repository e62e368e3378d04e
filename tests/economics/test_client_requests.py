"""What the client puts in a request: LoRAs and output format from the API and `sogni render`,
and which EIP-712 domain payer messages are signed for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_app.api import DEFAULT_DOMAIN, parse_lora, render_request
from sogni_app.cli import app, resolve_domain
from sogni_protocol.messages import LoraRef

PEER = "12D3KooWGSS6nP8pdtfG2vxzs6XP9SZpGCHgFmuE2QR7Qj9oKyFq"


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("detail", LoraRef(id="detail", strength=1.0)),
        ("detail:0.8", LoraRef(id="detail", strength=0.8)),
        ("detail:-1.5", LoraRef(id="detail", strength=-1.5)),
        ("civitai:123:0.5", LoraRef(id="civitai:123", strength=0.5)),
    ],
)
def test_lora_syntax(text: str, ref: LoraRef) -> None:
    assert parse_lora(text) == ref


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("detail:strong", "strength 'strong' is not a number"),
        ("detail:", "strength '' is not a number"),
        (":0.5", "missing id"),
        ("detail:9", "$.strength"),
        ("bad id!", "$.id"),
    ],
)
def test_bad_lora_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("[", r"\[")) as info:
        parse_lora(text)
    assert says in str(info.value)


def test_request_keeps_loras_in_order_and_the_format() -> None:
    req = render_request(
        "a fox",
        model_id="sogni-tiny-sd",
        loras=["b:0.5", LoraRef(id="a"), "c"],
        output_format="webp",
    )
    assert [(r.id, r.strength) for r in req.loras] == [("b", 0.5), ("a", 1.0), ("c", 1.0)]
    assert req.output_format == "webp"
    with pytest.raises(ValueError, match=r"\$\.loras"):
        render_request("x", model_id="m", loras=[f"l{i}" for i in range(9)])  # at most 8
    with pytest.raises(ValueError, match=r"\$\.outputFormat"):
        render_request("x", model_id="m", output_format="gif")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--lora", "ghost:strong"], "strength 'strong' is not a number"),
        (["--format", "gif"], "--format: invalid enum value 'gif'"),  # the option typed
        (["--lora", "a", "--width", "100"], "--width"),
    ],
)
def test_sogni_render_refuses_bad_options_before_sending(args: list[str], says: str) -> None:
    result = CliRunner().invoke(
        app, ["render", "x", "--coordinator", f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}", *args]
    )
    assert result.exit_code == 2
    assert says in result.output


def test_domain_from_options_else_the_local_coordinator_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
    assert resolve_domain(addr, None, None) == DEFAULT_DOMAIN  # no local coordinator
    local = tmp_path / ".sogni" / "coordinator" / "coordinator.json"
    local.parent.mkdir(parents=True)
    contract = "0x" + "5a" * 20
    local.write_text(
        json.dumps(
            {"peerId": PEER, "addrs": [addr], "chainId": 8453, "verifyingContract": contract}
        )
    )
    assert resolve_domain(addr, None, None).verifying_contract == contract
    assert resolve_domain(addr, None, None).chain_id == 8453
    assert resolve_domain(addr, 1, None).chain_id == 1  # an option wins
    other = "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWA5o6wv6q7xTukcN6pJbQ8CxaPDKwmirDwi5Nd9qe6Z9M"
    assert resolve_domain(other, None, None) == DEFAULT_DOMAIN  # the file is not about it
    result = CliRunner().invoke(
        app, ["balance", "--coordinator", addr, "--verifying-contract", "0x12"]
    )
    assert result.exit_code == 2 and "not an Ethereum address" in result.output
