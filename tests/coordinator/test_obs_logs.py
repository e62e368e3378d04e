"""Log lines an operator can follow and trust: one id prefix length everywhere, a request's
jobs named where it is accepted, a verifier's answer tied to its job and check id (as the
verifier node logs it), and a refused value quoted at a short bound (a peer chooses it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from sogni_coordinator.delivery import short
from sogni_coordinator.verifiers import PendingVerifications, probe_step
from sogni_protocol.errors import InvalidMessage
from sogni_protocol.logs import configure_logging
from sogni_protocol.messages import (
    QUOTED_LIMIT,
    JobParams,
    Message,
    RequestAccepted,
    RequestRefused,
    ScalarEntry,
    StepOpeningWire,
    StepVerified,
    TensorEntry,
    VerifyStep,
    decode,
    encode,
)

from .conftest import request
from .test_obs_metrics import MeteredHarness, serve


@pytest.fixture
async def metered_coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[MeteredHarness]:
    h = MeteredHarness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


def logged(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_ids_in_logs_are_16_hex_digits_as_everywhere_else() -> None:
    ident = bytes(range(32))
    assert short(ident) == ident.hex()[:16]  # the job and check prefix dispatch.py logs


def test_a_refused_value_is_quoted_at_a_short_bound() -> None:
    raw = msgspec.to_builtins(request(1))
    value = "x" * 5000 + "-tail"
    with pytest.raises(InvalidMessage) as info:
        decode(msgspec.msgpack.encode({**raw, "network": value}))
    text = str(info.value)
    assert len(text) < 200 and "-tail" not in text
    assert text == (
        f"invalid message: Invalid enum value '{'x' * QUOTED_LIMIT}...' (5005 characters)"
        " - at `$.network`"
    )
    with pytest.raises(InvalidMessage) as info:  # a short one is quoted whole, as before
        decode(msgspec.msgpack.encode({**raw, "network": "slow"}))
    assert str(info.value) == "invalid message: Invalid enum value 'slow' - at `$.network`"
    with pytest.raises(InvalidMessage) as info:  # an unknown message type
        decode(msgspec.msgpack.encode({**raw, "type": "t" * 300}))
    assert len(str(info.value)) < 200


async def test_the_client_hears_and_the_log_keeps_a_bounded_error(
    metered_coord: MeteredHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", json=True, capture_warnings=False)
    raw = msgspec.to_builtins(request(1))
    channel = await serve(metered_coord, msgspec.msgpack.encode({**raw, "tokenType": "z" * 9000}))
    (refused,) = channel.sent
    assert isinstance(refused, RequestRefused) and refused.code == "invalid_request"
    assert len(refused.reason) < 200 and "(9000 characters)" in refused.reason
    (line,) = [e for e in logged(capsys.readouterr().err) if e["event"] == "client_request_invalid"]
    assert len(line["error"]) < 200 and "z" * (QUOTED_LIMIT + 1) not in line["error"]


async def test_request_accepted_names_the_request_and_its_jobs(
    metered_coord: MeteredHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per request (not per job): its jobs' ids, the prefix `offer_sent`, receipts
    and checks use, so a job's lines lead back to its request."""
    configure_logging("info", json=True, capture_warnings=False)
    channel = await serve(metered_coord, encode(request(3)))
    accepted = channel.sent[0]
    assert isinstance(accepted, RequestAccepted)
    (line,) = [e for e in logged(capsys.readouterr().err) if e["event"] == "request_accepted"]
    assert line["request"] == accepted.request_id.hex()[:16]
    assert line["jobs"] == [job_id.hex()[:16] for job_id in accepted.job_ids]
    assert line["image_count"] == 3


def _opening(step: int, value: float) -> StepOpeningWire:
    data = np.full((1, 4, 8, 8), value, np.float32).tobytes()
    return StepOpeningWire(
        step=step,
        tensors=[TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=data)],
        scalars=[ScalarEntry(name="timestep", value=None)],
        proof=[],
        n_leaves=4,
    )


async def test_step_verified_names_its_job_and_check(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True, capture_warnings=False)
    send, inbox = trio.open_memory_channel[Message](4)
    dispatcher = SimpleNamespace(
        nodes={"verifier": SimpleNamespace(outbox=send)}, verifications=PendingVerifications()
    )
    params = JobParams(
        model_id="m", positive_prompt="p", steps=3, guidance=4.0, width=64, height=64, seed=1
    )
    ok, nxt = _opening(1, 1.0), _opening(2, 2.0)
    job = b"\x07" * 32
    asked: list[VerifyStep] = []

    async def verifier() -> None:
        msg = await inbox.receive()
        assert isinstance(msg, VerifyStep)
        asked.append(msg)
        answer = StepVerified(check_id=msg.check_id, latents=nxt.tensors[0])
        assert dispatcher.verifications.answered("verifier", answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(verifier)
        verdict = await probe_step(
            dispatcher,  # type: ignore[arg-type]
            "verifier",
            params=params,
            scheduler="",
            opening_k=ok,
            opening_next=nxt,
            dtype="float32",
            timeout=5,
            job=job,
        )
    assert verdict.passed
    (line,) = [e for e in logged(capsys.readouterr().err) if e["event"] == "step_verified"]
    assert line["job"] == job.hex()[:16]
    assert line["check"] == asked[0].check_id.hex()[:16]  # what the verifier node logs
    assert (line["step"], line["verifier"], line["passed"]) == (1, "verifier", True)
