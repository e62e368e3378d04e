"""Ids in log and error lines are the first 16 hex digits everywhere (`delivery.short`): the
job queue's errors, a stored result's name and `report_filed` gave 12, so a grep for the
prefix other lines give missed them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sogni_coordinator.delivery import short
from sogni_coordinator.queue.base import short as queue_short
from sogni_coordinator.reports import OPERATOR, ReportedImage, Reports
from sogni_coordinator.results.base import ResultKey
from sogni_coordinator.store import Store
from sogni_protocol.messages import split_request
from tests.e2e.conftest import tiny_request

IDENT = bytes(range(32))


def test_the_queue_names_jobs_by_the_common_prefix() -> None:
    assert queue_short(IDENT) == short(IDENT) == IDENT.hex()[:16]


def test_a_stored_results_name_starts_with_the_request_prefix() -> None:
    key = ResultKey(IDENT, 3, b"\xab" * 32)
    assert key.name == f"{IDENT.hex()[:16]}/0003-abababab"


def test_report_filed_names_the_request_by_the_common_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "coordinator.db"
    store, reports = Store(path), Reports(path)
    try:
        request_id = os.urandom(32)
        req = tiny_request(1)
        store.add_request(
            request_id,
            model_id=req.model_id,
            network=req.network,
            token_type=req.token_type,
            client_peer="peer",
            jobs=[(os.urandom(32), split_request(req)[0], 1)],
        )
        image = ReportedImage(
            index=0,
            job_id="00" * 32,
            image_sha256="11" * 32,
            worker="0x" + "22" * 20,
            completed_at=1,
        )

        def delivered(*_: Any) -> list[ReportedImage]:  # a receipt, without rendering one
            return [image]

        monkeypatch.setattr(Reports, "_images", staticmethod(delivered))
        with capture_logs() as logs:
            reports.file(request_id, reporter=OPERATOR, via="operator", reason="other")
        (filed,) = [e for e in logs if e["event"] == "report_filed"]
        assert filed["request"] == request_id.hex()[:16]
    finally:
        reports.close()
        store.close()
