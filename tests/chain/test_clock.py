"""The embedded chain's clock: `advance_time` after the machine stalled between two blocks."""

from __future__ import annotations

import pytest
from eth._utils import headers

from sogni_chain.chain import connect


def test_advance_time_after_a_stall_never_travels_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-evm stamps the pending block with the wall clock when the latest is mined; a slow
    machine (a loaded CI run) can put it more than `seconds` past the latest block, and
    `time_travel(latest + seconds)` then refused ("Traveling backwards in time")."""
    chain = connect("embedded", accounts=1)
    real_now = headers.eth_now
    monkeypatch.setattr(headers, "eth_now", lambda: real_now() + 600)  # 10 min of stall
    chain.mine()  # the latest block keeps its earlier stamp; the pending one is 10 min on
    latest = chain.timestamp()
    moved = chain.advance_time(3)
    assert moved >= latest + 3 and moved >= real_now() + 599
    assert chain.advance_time(3) > moved  # and on from there
