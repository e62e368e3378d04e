"""A benchmark run proposes pricing factors; only `--adopt` changes the committed file that
every coordinator of a network prices with."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import pricing_scaling


def test_measured_factors_are_a_proposal_unless_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed, proposal = tmp_path / "configs" / "f.toml", tmp_path / ".cache" / "p.toml"
    monkeypatch.setattr(pricing_scaling, "FACTORS_TOML", committed)
    monkeypatch.setattr(pricing_scaling, "PROPOSAL_TOML", proposal)
    assert pricing_scaling.write_factors("measured = 1\n") == proposal
    assert proposal.read_text() == "measured = 1\n" and not committed.exists()
    assert pricing_scaling.write_factors("measured = 2\n", adopt=True) == committed
    assert committed.read_text() == "measured = 2\n"
