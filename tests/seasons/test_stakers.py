"""Stakers board: Staking Power (stake x time within the season) from the Staking contract's
events on the in-process chain, and from a given list of changes."""

from __future__ import annotations

import datetime as dt

import pytest

from sogni_chain import Deployment, connect, deploy_all
from sogni_coordinator.seasons.stakers import (
    StakeChange,
    StakeHistory,
    board,
    stake_changes,
    staking_power,
)
from sogni_protocol.catalog import Season

SOGNI = 10**18
DAY = 86_400


def _season(start: float, days: int) -> Season:
    s = dt.datetime.fromtimestamp(start, dt.UTC)
    return Season(99, s, s + dt.timedelta(days=days))


def test_staking_power_counts_only_time_inside_the_season() -> None:
    a, b = "0x" + "a" * 40, "0x" + "b" * 40
    t0 = 1_700_000_000.0
    changes = [
        StakeChange(t0 - 10 * DAY, a, 100 * SOGNI),  # staked before: counts from the start
        StakeChange(t0 + 2 * DAY, a, 40 * SOGNI),  # unstaked 60 on day 2
        StakeChange(t0 + 1 * DAY, b, 50 * SOGNI),
        StakeChange(t0 + 3 * DAY, b, 0),  # all of it on day 3
        StakeChange(t0 + 5 * DAY, b, 10 * SOGNI),  # after the season: ignored
    ]
    power = staking_power(changes, t0, t0 + 4 * DAY)
    assert power[a].micro_sogni_days == (100 * 2 + 40 * 2) * 1_000_000
    assert power[b].micro_sogni_days == 50 * 2 * 1_000_000
    rows = board(changes, _season(t0, 4))
    assert [(r.address, r.days_active) for r in rows] == [(a, 4), (b, 2)]
    # both share the whole pool by Staking Power
    assert rows[0].prize_wei == 3_000_000 * SOGNI * 280 // 380
    assert rows[1].prize_wei == 3_000_000 * SOGNI * 100 // 380


def test_stakers_board_from_chain_events() -> None:
    chain = connect("embedded")
    treasury, slasher = chain.accounts[0], chain.accounts[2]
    staker, other = chain.accounts[3], chain.accounts[4]
    d = Deployment(chain, deploy_all(chain, treasury, slasher=slasher), sender=treasury)
    for who in (staker, other):
        d.token.transfer(who, 1_000 * SOGNI)
        d.token.approve(d.staking.address, 1_000 * SOGNI, sender=who)
    start = chain.timestamp()
    d.staking.stake(600 * SOGNI, sender=staker)
    t_stake = chain.timestamp()

    history = StakeHistory(d)  # read once now, then only the new blocks
    assert [c.active_wei for c in history.changes()] == [600 * SOGNI]
    chain.advance_time(2 * DAY)
    d.staking.request_unstake(200 * SOGNI, sender=staker)  # pending stake no longer counts
    t_unstake = chain.timestamp()
    d.staking.stake(100 * SOGNI, sender=other)
    t_other = chain.timestamp()
    chain.advance_time(DAY)
    d.staking.slash(other, 30 * SOGNI, "test", sender=slasher)
    t_slash = chain.timestamp()
    end = chain.timestamp()

    changes = history.changes()
    assert changes == stake_changes(d)  # the same as one read of the whole history
    assert [(c.account, c.active_wei) for c in changes] == [
        (staker.address.lower(), 600 * SOGNI),
        (staker.address.lower(), 400 * SOGNI),
        (other.address.lower(), 100 * SOGNI),
        (other.address.lower(), 70 * SOGNI),  # slashed from active
    ]
    rows = {r.address: r for r in board(changes, _season(start, 30), now=end)}
    want = (600 * (t_unstake - t_stake) + 400 * (end - t_unstake)) * 1_000_000 // DAY
    assert rows[staker.address.lower()].points_micro == want
    want_other = (100 * (t_slash - t_other) + 70 * (end - t_slash)) * 1_000_000 // DAY
    assert rows[other.address.lower()].points_micro == want_other
    assert rows[staker.address.lower()].rank == 1
    with pytest.raises(KeyError):
        rows[treasury.address.lower()]  # never staked
