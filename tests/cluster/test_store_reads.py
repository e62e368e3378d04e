"""The store's reads a coordinator of a network uses, on both engines: jobs loaded by id
after a lease (live ones only, parameters unsealed) and a request's jobs as its owner needs
them (state, delivery, receipt)."""

from __future__ import annotations

import hashlib

from sogni_coordinator.job_state import JobState
from sogni_coordinator.store import Store
from sogni_protocol.messages import JobParams, Receipt

PARAMS = JobParams(
    model_id="m", positive_prompt="p", steps=4, guidance=1.0, width=64, height=64, seed=1
)


def test_jobs_by_id_and_job_outcomes(database: str) -> None:
    store = Store(database)
    try:
        rid = b"r" * 32
        ids = [bytes([i]) * 32 for i in range(3)]
        store.add_request(
            rid,
            model_id="m",
            network="fast",
            token_type="spark",
            client_peer="peer",
            jobs=[(j, PARAMS, 100) for j in ids],
        )
        receipt = Receipt(
            job_id=ids[0],
            offer_hash=b"o" * 32,
            worker="0x" + "11" * 20,
            coordinator="0x" + "22" * 20,
            model_id="m",
            result_hash=hashlib.sha256(b"img").digest(),
            steps_done=4,
            work_units=100,
            completed_at=1,
        )
        assert store.store_receipt(receipt, b"s" * 65, rid)
        store.save_job_states([(ids[1], JobState.FAILED, 2)])
        store.mark_delivered(rid, [ids[0]])

        live = store.jobs_by_id([ids[2], ids[0], ids[1], b"x" * 32])
        assert [(j.job_id, j.params, j.state) for j in live] == [(ids[2], PARAMS, JobState.QUEUED)]
        assert store.jobs_by_id([]) == []
        outcomes = store.job_outcomes(rid)
        assert [(o.job_id, o.state, o.delivered, o.steps) for o in outcomes] == [
            (ids[0], JobState.DONE, True, 4),
            (ids[1], JobState.FAILED, False, 4),
            (ids[2], JobState.QUEUED, False, 4),
        ]
        assert outcomes[0].receipt == receipt and outcomes[0].offer_hash == b"o" * 32
        assert outcomes[1].receipt is None and outcomes[2].offer_hash is None
    finally:
        store.close()
