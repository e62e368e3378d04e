"""Issue #18 audit: the job state machine persisted on either engine, the state the restart
test on both engines (tests/coordinator/test_dispatcher.py) does not reach: FAILED.

A job handed back `MAX_ATTEMPTS` times is FAILED in the database, each attempt counted on
the way; a coordinator restarted on the same database (a SQLite file, then a PostgreSQL
database of its own) restores nothing of it and never offers it again.
"""

from __future__ import annotations

from pathlib import Path

import trio

from sogni_coordinator.dispatch import MAX_ATTEMPTS
from sogni_coordinator.job_state import JobState
from tests.coordinator.conftest import Harness, request


async def test_a_failed_job_stays_failed_across_a_restart_on_each_engine(
    database: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    coord = Harness(database, nursery, folder=tmp_path)
    try:
        sub = await coord.submit(request(2))
        doomed, waiting = sub.accepted.job_ids
        a = coord.node(0)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            coord.dispatcher.ready(a.link, 1)
            coord.dispatcher.match()
            (offer,) = a.offers()
            assert offer.offer.job_id == doomed
            coord.dispatcher.handed_back(a.link, doomed, "render failed")
            if attempt < MAX_ATTEMPTS:
                live = {s.job_id: s.attempts for s in coord.store.live_jobs()}
                assert live[doomed] == attempt  # persisted, attempt by attempt
        assert coord.store.job_state(doomed) is JobState.FAILED
        assert coord.store.job_state(waiting) is JobState.QUEUED

        coord.restart()
        assert coord.dispatcher.restore() == 1
        assert set(coord.dispatcher.jobs) == {waiting}
        assert coord.store.job_state(doomed) is JobState.FAILED
        b = coord.node(1, slots=2)
        coord.dispatcher.match()
        assert [o.offer.job_id for o in b.offers()] == [waiting]
    finally:
        coord.close()
