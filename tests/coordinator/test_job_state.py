"""The job lifecycle table, pair by pair: every (state, event) either gives the expected state
or is refused."""

from __future__ import annotations

import itertools

import pytest

from sogni_coordinator.job_state import (
    TERMINAL,
    TRANSITIONS,
    Forbidden,
    JobEvent,
    JobState,
    stored,
    transition,
)

S, E = JobState, JobEvent
EXPECTED = {
    (S.QUEUED, E.OFFER): S.RUNNING,
    (S.RUNNING, E.OFFER): S.RUNNING,  # a straggler's copy
    (S.RUNNING, E.RELEASE): S.QUEUED,
    (S.CANCELLING, E.RELEASE): S.CANCELLED,  # handed back unpaid after the cancel
    (S.QUEUED, E.GIVE_UP): S.FAILED,
    (S.QUEUED, E.CANCEL): S.CANCELLED,
    (S.RUNNING, E.CANCEL): S.CANCELLING,
    (S.QUEUED, E.RECEIPT): S.DONE,  # a late receipt from a node past its deadline
    (S.RUNNING, E.RECEIPT): S.DONE,
    (S.CANCELLING, E.RECEIPT): S.DONE,  # finished before the cancel reached it
    (S.CANCELLING, E.PARTIAL_RECEIPT): S.CANCELLED,
    (S.QUEUED, E.RESTORE): S.QUEUED,
    (S.RUNNING, E.RESTORE): S.QUEUED,
    (S.CANCELLING, E.RESTORE): S.CANCELLED,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(JobState, JobEvent)))
def test_every_state_event_pair(state: JobState, event: JobEvent) -> None:
    want = EXPECTED.get((state, event))
    if want is None:
        with pytest.raises(Forbidden) as info:
            transition(state, event)
        assert (info.value.state, info.value.event) == (state, event)
        assert state.value in str(info.value) and event.value in str(info.value)
    else:
        assert transition(state, event) is want


def test_the_table_is_exactly_the_expected_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


def test_ended_jobs_take_no_event_and_live_ones_can_always_end() -> None:
    for state in TERMINAL:
        assert not [e for e in JobEvent if (state, e) in TRANSITIONS]
    for state in set(JobState) - TERMINAL:  # no live state is a dead end
        reachable = {TRANSITIONS[(state, e)] for e in JobEvent if (state, e) in TRANSITIONS}
        assert reachable & TERMINAL


def test_an_offer_is_not_durable() -> None:
    assert stored(S.RUNNING) is S.QUEUED
    assert all(stored(s) is s for s in JobState if s is not S.RUNNING)
