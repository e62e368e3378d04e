"""A sampled receipt's step checks name their job in `step_verified` (the check passes `job=`
to `verify_step`): before, every line of a check logged `job=None`, so an operator could not
tie a verifier's answer to the job it judged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_coordinator.delivery import short
from sogni_protocol.logs import configure_logging

from .conftest import Harness
from .test_checks import ALL, _held, _paid_request, answer_challenge, answer_verify, until


@pytest.fixture
async def checked(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=ALL)
    yield h
    h.close()


def logged(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


async def test_every_step_check_names_its_job(
    checked: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", json=True, capture_warnings=False)
    h = checked
    await _paid_request(h)
    worker, verifier = h.node(0), h.node(1, ready=False)
    offer, t = await _held(h, worker)
    job_id = offer.offer.job_id
    await answer_challenge(h, worker, t)
    asked = await answer_verify(h, verifier, t, honest=True)
    await until(lambda: h.store.check_state(job_id) == "passed")
    lines = [e for e in logged(capsys.readouterr().err) if e["event"] == "step_verified"]
    assert asked and len(lines) == len(asked)
    assert {line["job"] for line in lines} == {short(job_id)}  # was None
    assert sorted(line["step"] for line in lines) == sorted(asked)
