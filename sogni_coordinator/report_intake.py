"""Where content reports come in: the libp2p client stream and the SDK gateway.

Why two doors, one check: an app on the client protocol proves it is the payer with an
EIP-712 signature (`sogni_protocol.report_signing`, bound to its peer id and an expiry); an
SDK app proves it with its API key, whose account is the payer of every project it started.
Both end in `Reports.file`, which compares the reporter with the ledger's payer of the
request again and keeps the evidence. The note is passed through, never logged.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from sogni_coordinator.final_reply import send_final_reply
from sogni_coordinator.reports import MAX_NOTE_CHARS, REASONS, ReportRefused, Reports
from sogni_net import Channel
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import ContentReport, ReportFiled, RequestRefused
from sogni_protocol.report_signing import check_report

if TYPE_CHECKING:
    from sogni_coordinator.dispatch import Dispatcher
    from sogni_coordinator.key_projects import KeyProjects

log = get_logger(__name__)

__all__ = ["file_report", "parse_gateway_report", "serve_report"]


def _peers(dispatcher: Dispatcher) -> dict[str, list[str]]:
    """Connected nodes' peer ids by lowercase wallet (read on the event loop)."""
    peers: dict[str, list[str]] = {}
    for link in dispatcher.nodes.values():
        peers.setdefault(link.wallet.lower(), []).append(link.peer_id)
    return peers


def _reports(dispatcher: Dispatcher) -> Reports:
    if dispatcher.reports is None:
        raise ReportRefused("reports_off", "this coordinator does not take reports")
    return dispatcher.reports


async def file_report(
    dispatcher: Dispatcher,
    request_id: bytes,
    *,
    reporter: str,
    via: str,
    reason: str,
    image_index: int = -1,
    note: str = "",
) -> int:
    """File a report (off the event loop); its id. Raises `ReportRefused`."""
    reports = _reports(dispatcher)
    return await trio.to_thread.run_sync(
        partial(
            reports.file,
            request_id,
            reporter=reporter,
            via=via,
            reason=reason,
            image_index=image_index,
            note=note,
            node_peers=_peers(dispatcher),
        )
    )


async def serve_report(channel: Channel, dispatcher: Dispatcher, req: ContentReport) -> None:
    """One `ContentReport` on a client stream: `ReportFiled` or `RequestRefused`, then close."""
    reply: ReportFiled | RequestRefused
    try:
        fault = check_report(dispatcher.domain, req, channel.remote_peer_id, time.time())
        if fault is not None:
            raise ReportRefused("unauthorized", fault)
        report_id = await file_report(
            dispatcher,
            req.request_id,
            reporter=req.payer,
            via="client",
            reason=req.reason,
            image_index=req.image_index,
            note=req.note,
        )
        reply = ReportFiled(report_id=report_id)
    except ReportRefused as exc:
        log.info("report_refused", code=exc.code, via="client")
        reply = RequestRefused(code=exc.code, reason=exc.reason)
    await send_final_reply(channel, reply, log)


def parse_gateway_report(data: Any) -> tuple[str, int, str, str]:
    """`(jobID, imageIndex, reason, note)` of a `POST /v1/report` body; raises
    `ReportRefused("invalid_report")` naming the field."""
    if not isinstance(data, dict):
        raise ReportRefused("invalid_report", "the body is a JSON object")
    unknown = set(data) - {"jobID", "imageIndex", "reason", "note"}
    if unknown:
        raise ReportRefused("invalid_report", f"unknown field {sorted(unknown)[0]!r}")
    job_id = data.get("jobID")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64 or not job_id.isprintable():
        raise ReportRefused("invalid_report", "jobID is the project id the SDK sent")
    index = data.get("imageIndex", -1)
    if isinstance(index, bool) or not isinstance(index, int) or not -1 <= index < 10_000:
        raise ReportRefused("invalid_report", "imageIndex is an image's index (or -1: all)")
    reason = data.get("reason")
    if reason not in REASONS:
        raise ReportRefused("invalid_report", f"reason is one of {', '.join(REASONS)}")
    note = data.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise ReportRefused("invalid_report", f"note is a string of at most {MAX_NOTE_CHARS}")
    return job_id.upper(), index, str(reason), note


async def gateway_request_id(
    records: KeyProjects, known: bytes | None, key_id: str, job_id: str
) -> bytes:
    """The request behind an API key's project (`known`: from memory), or `unknown_job`."""
    if known:
        return known
    record = await trio.to_thread.run_sync(records.get, key_id, job_id)
    if record is None or record.request_id is None:
        raise ReportRefused("unknown_job", "no job of yours has this id")
    return record.request_id
