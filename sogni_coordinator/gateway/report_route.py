"""`POST /v1/report`: an SDK app reports one of its API key's projects.

Body: `{"jobID": ..., "imageIndex": n (optional, -1 all), "reason": "minor" | "sexual" |
"violence" | "hate" | "other", "note": "..." (optional, at most 1000 characters)}`. The key's
account is the payer of every project it started, so the key is the proof; a jobID of
another key is unknown here. The answer is `{status: "success", data: {reportId}}` or one
error line with an `errorCode` (400 4000 bad body, 404 4004 unknown job, 409 4009 already
reported, 429 4029 too many reports). The note is never logged.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sogni_coordinator.report_intake import file_report, gateway_request_id, parse_gateway_report
from sogni_coordinator.reports import ReportRefused
from sogni_net.http import SlowBody, read_body
from sogni_protocol.json_depth import TooDeep, check_depth

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from sogni_coordinator.gateway.core import AuthedKey, Gateway

__all__ = ["MAX_BODY_BYTES", "gateway_report"]

MAX_BODY_BYTES = 8192
_STATUS = {
    "invalid_report": (400, 4000),
    "unknown_job": (404, 4004),
    "not_delivered": (409, 4009),
    "duplicate_report": (409, 4009),
    "rate_limited": (429, 4029),
    "too_slow": (408, 4008),
    "reports_off": (503, 5003),
}


def _answer(status: int, body: dict[str, object]) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _body(request: Request) -> object:
    try:
        raw = await read_body(request, MAX_BODY_BYTES)
    except SlowBody as exc:
        raise ReportRefused("too_slow", str(exc)) from None
    if raw is None:
        raise ReportRefused("invalid_report", f"the body is at most {MAX_BODY_BYTES} bytes")
    try:
        check_depth(raw)  # stdlib json recurses: 8 KB of "[" ended in a RecursionError (500)
        return json.loads(raw)
    except TooDeep as exc:
        raise ReportRefused("invalid_report", str(exc)) from None
    except (ValueError, UnicodeDecodeError):
        raise ReportRefused("invalid_report", "the body is not JSON") from None


async def gateway_report(gateway: Gateway, key: AuthedKey, request: Request) -> Response:
    try:
        job_id, index, reason, note = parse_gateway_report(await _body(request))
        project = gateway.projects.get(key.key_id, job_id)
        known = project.request_id if project is not None else None
        request_id = await gateway_request_id(gateway.records, known, key.key_id, job_id)
        report_id = await file_report(
            gateway.dispatcher,
            request_id,
            reporter=key.record.account,
            via="gateway",
            reason=reason,
            image_index=index,
            note=note,
        )
    except ReportRefused as exc:
        status, code = _STATUS.get(exc.code, (400, 4000))
        return _answer(status, {"status": "error", "message": exc.reason, "errorCode": code})
    return _answer(200, {"status": "success", "data": {"reportId": report_id}})
