"""The docs a new user reads first agree with the code: the fresh-clone flow says where anvil
comes from before it is needed, every config key is in the example files with the code's
default, and docs/CLI.md and docs/REWARDS.md name the options and fields the walkthrough
found undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sogni_coordinator.config import CoordinatorConfig
from sogni_node.config import NodeConfig
from sogni_protocol.payout_rules import SettlementConfig

ROOT = Path(__file__).resolve().parents[2]


def _doc(name: str) -> str:
    return " ".join((ROOT / name).read_text().split())  # line breaks do not matter


def test_the_fresh_clone_flow_says_anvil_comes_from_npm_before_it_runs_anvil() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("from a fresh clone (after `make install`)")
    anvil = text.index("python -m sogni_chain anvil --port 8545", start)
    assert "npm ci --prefix contracts" in text[start:anvil]


@pytest.mark.parametrize(
    ("cls", "name", "extra"),
    [
        (NodeConfig, "configs/node.example.toml", {}),
        (CoordinatorConfig, "configs/coordinator.example.toml", {"settlement": SettlementConfig}),
    ],
)
def test_every_config_key_is_in_the_example_with_its_default(
    cls: type, name: str, extra: dict[str, type]
) -> None:
    text = (ROOT / name).read_text()
    for field in cls.__struct_fields__:  # type: ignore[attr-defined]
        assert re.search(rf"^[# ]*\[?{field}\]?( =|\s*$)", text, re.M), f"{name} lacks {field}"
    for table, sub in extra.items():
        body = text.split(f"[{table}]", 1)[1].split("\n[", 1)[0]
        assert "epoch_seconds" in body, f"[{table}] lacks epoch_seconds"
        assert f"epoch_seconds = {sub().epoch_seconds}" in body  # type: ignore[attr-defined]
    defaults = cls()
    for key in ("job_deadline_base", "chain_poll_seconds", "fast_min_stake", "advert_interval"):
        if key in cls.__struct_fields__:  # type: ignore[attr-defined]
            value = getattr(defaults, key)
            assert f"# {key} = {value}" in text, (key, value)


@pytest.mark.parametrize(
    "words",
    [
        "network signers show",
        "--reconnect-for",
        "--negative",
        "--guidance",
        "--kdf-n",
        "--device",
        "--runs",
        "--class",
        "--config-dir",
        "--tokenizer",
        "--models-dir",
        "chain grant-settler",
        "advert_interval",
        "job_deadline_base",
        "credit ADDRESS AMOUNT",
    ],
)
def test_cli_md_documents_what_the_walkthrough_found_undocumented(words: str) -> None:
    assert words in _doc("docs/CLI.md")


def test_cli_md_puts_a_missing_epochs_folder_under_exit_4_only() -> None:
    rows = {line.split("|")[1].strip(): line for line in _doc_lines("docs/CLI.md")}
    assert "--epochs-dir" not in rows["2"]
    assert "--epochs-dir" in rows["4"] and "--published" in rows["4"]


def _doc_lines(name: str) -> list[str]:
    return [
        line for line in (ROOT / name).read_text().splitlines() if re.match(r"^\| \d+ \|", line)
    ]


def test_rewards_md_documents_unpaid_receipts_and_nothing_to_claim() -> None:
    text = _doc("docs/REWARDS.md")
    assert "`unpaidReceipts`" in text and "nothing to claim" in text


def test_model_md_and_the_render_default_agree() -> None:
    from sogni_app.cli import MODEL_GUIDANCE
    from sogni_protocol.ids import EMBEDDED_MODEL_ID

    assert f"guidance {MODEL_GUIDANCE[EMBEDDED_MODEL_ID]}" in _doc("docs/MODEL.md")
