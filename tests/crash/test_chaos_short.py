"""The chaos soak, short: 40 paid jobs on 3 node processes while nodes and the coordinator
are SIGKILLed and restarted (`bench/chaos.py`; `python -m bench chaos` is the long run).

The kills are triggered by the coordinator's own receipt count (a node after the 4th, 12th
and 26th receipt, the coordinator after the 18th), not by the clock, so each lands mid-run.
Asserted: every image reaches its client exactly once, one receipt and one settlement per
job, the payer charged exactly its quotes, the ledger balanced with nothing reserved, and
every daemon alive at the end.
"""

from __future__ import annotations

from pathlib import Path

from bench.chaos import Settings, soak

SETTINGS = Settings(
    nodes=3,
    clients=2,
    images=20,
    render_seconds=0.2,
    kill_probability=0.0,  # no clock kills: the counted ones below
    node_kills_at=(4, 12, 26),
    coordinator_restarts=1,
    coordinator_kills_at=(18,),
    deadline=120.0,
    seed=0,
)


async def test_chaos_short(tmp_path: Path) -> None:
    out = await soak(SETTINGS, tmp_path)
    assert out.node_kills == 3 and out.node_restarts == 3
    assert out.coordinator_restarts == 1
    assert out.errors == [], out.errors
    assert out.requested == SETTINGS.jobs == 40
    assert out.delivered == out.requested and out.failed == 0, "an image lost or failed"
    assert out.duplicates == 0, "an image handed to its client twice"
    assert out.receipts_match and out.receipts == out.requested, "not one receipt per job"
    assert out.settled_jobs == out.requested and out.paid_twice == 0, "a job paid twice or not"
    assert out.charged_micro == out.quoted_micro > 0, "payer not charged exactly its quotes"
    assert out.totals_zero and out.reservations_left == 0 and not out.negative_accounts
    assert out.alive, "a daemon was left dead"
    assert out.missed() == []
