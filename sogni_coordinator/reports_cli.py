"""`sogni-coordinator reports list|show|file|resolve|block|unblock|blocks`: the operator's side of
content reports (docs/SAFETY.md, "Reports"). The logic is in `sogni_coordinator.reports`; a
running coordinator picks up a new block within `BLOCK_POLL_SECONDS`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from sogni_coordinator.cli_config import load_cli_config
from sogni_coordinator.reports import (
    ACTIONS,
    OPERATOR,
    REASONS,
    Block,
    Report,
    ReportRefused,
    Reports,
)
from sogni_protocol.cli_errors import BadUsage, Refused, register

__all__ = ["app"]

register(ReportRefused, Refused, "see sogni-coordinator reports list")

app = typer.Typer(help="Content reports and the blocks they lead to.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
IdArg = Annotated[int, typer.Argument(help="The report's id, from `reports list`.", min=1)]


def _open(config: Path | None) -> Reports:
    cfg = load_cli_config(config)
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Reports(cfg.database)


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _block_json(b: Block) -> dict[str, object]:
    return {
        "kind": b.kind,
        "account": b.account,
        "reportId": b.report_id,
        "note": b.note,
        "blockedAt": b.blocked_at,
    }


@app.command("list")
def list_reports(
    open_only: Annotated[bool, typer.Option("--open", help="Only reports not resolved.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Reports, oldest first: id, when, reason, state, payer, images."""
    reports = _open(config)
    try:
        found = reports.find(open_only=open_only)
    finally:
        reports.close()
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in found]))
        return
    if not found:
        typer.echo("no reports" + (" open" if open_only else ""))
        return
    typer.echo(f"{'ID':>5}  {'FILED (UTC)':<16}  {'REASON':<9} {'STATE':<20} {'PAYER':<42} IMAGES")
    for r in found:
        state = r.state if r.action is None else f"{r.state}:{r.action}"
        payer = r.payer or "-"
        typer.echo(
            f"{r.id:>5}  {_day(r.created_at):<16}  {r.reason:<9} {state:<20} {payer:<42} "
            f"{len(r.images)}"
        )


def _show(r: Report) -> None:
    typer.echo(f"report {r.id}  {r.state}" + (f" ({r.action})" if r.action else ""))
    typer.echo(f"  reason       {r.reason}")
    typer.echo(f"  filed        {_day(r.created_at)} UTC by {r.reporter} via {r.via}")
    typer.echo(f"  request      {r.request_id}")
    scope = "all" if r.image_index < 0 else str(r.image_index)
    typer.echo(f"  images       {scope}")
    typer.echo(f"  payer        {r.payer or '-'}")
    typer.echo(f"  model        {r.model_id}")
    typer.echo(f"  requested    {_day(r.requested_at)} UTC by peer {r.client_peer}")
    shredded = "none (the prompt was shredded before the report)"
    typer.echo(f"  prompt hash  {r.prompt_hash or shredded}")
    for i in r.images:
        typer.echo(f"  image {i.index:<4}   sha256 {i.image_sha256}  node {i.worker}")
    if r.node_peers:
        typer.echo(f"  node peers   {', '.join(r.node_peers)}")
    if r.note:
        typer.echo(f"  note         {r.note}")
    if r.resolved_at is not None:
        typer.echo(f"  resolved     {_day(r.resolved_at)} UTC {r.resolution}")


@app.command("show")
def show(report_id: IdArg, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One report with its evidence (image hashes, nodes, payer, keyed prompt hash)."""
    reports = _open(config)
    try:
        found = reports.get(report_id)
    finally:
        reports.close()
    if found is None:
        raise Refused(f"no report {report_id}", "see sogni-coordinator reports list")
    if as_json:
        typer.echo(json.dumps(found.as_json()))
        return
    _show(found)


@app.command("file")
def file_report(
    request_id: Annotated[str, typer.Argument(help="The request id (64 hex digits).")],
    reason: Annotated[str, typer.Option("--reason", help=f"One of: {', '.join(REASONS)}.")],
    image: Annotated[
        int | None, typer.Option("--image", min=0, help="One image's index (default: all).")
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Where the complaint came from.")] = "",
    config: ConfigOpt = None,
) -> None:
    """File a report as the operator (a complaint that came another way, a free request)."""
    text = request_id[2:] if request_id[:2].lower() == "0x" else request_id
    try:
        rid = bytes.fromhex(text)
    except ValueError:
        rid = b""
    if len(rid) != 32:
        raise BadUsage("REQUEST_ID is 64 hex digits", None)
    reports = _open(config)
    try:
        report_id = reports.file(
            rid,
            reporter=OPERATOR,
            via="operator",
            reason=reason,
            image_index=-1 if image is None else image,
            note=note,
        )
    finally:
        reports.close()
    typer.echo(f"report {report_id} filed")


@app.command("resolve")
def resolve(
    report_id: IdArg,
    action: Annotated[
        str, typer.Option("--action", help=f"One of: {', '.join(ACTIONS)}.", show_default=False)
    ],
    note: Annotated[str, typer.Option("--note", help="Why (kept with the report).")] = "",
    config: ConfigOpt = None,
) -> None:
    """Close a report; `block-payer` refuses its payer's requests, `block-node` its node(s)."""
    if action not in ACTIONS:
        raise BadUsage(f"--action must be one of {', '.join(ACTIONS)}", None)
    reports = _open(config)
    try:
        blocks = reports.resolve(report_id, action, note)
    finally:
        reports.close()
    done = ", ".join(f"blocked {b.kind} {b.account}" for b in blocks) or "no block"
    typer.echo(f"report {report_id} resolved ({action}): {done}")


@app.command("block")
def block(
    kind: Annotated[str, typer.Argument(help="payer or node")],
    account: Annotated[str, typer.Argument(help="The payer account or node wallet (0x...).")],
    note: Annotated[str, typer.Option("--note", help="Why.")] = "",
    config: ConfigOpt = None,
) -> None:
    """Block a payer or a node wallet without a report."""
    if kind not in ("payer", "node") or not _is_address(account):
        raise BadUsage("usage: reports block payer|node 0xACCOUNT", None)
    reports = _open(config)
    try:
        added = reports.block(kind, account, note)
    finally:
        reports.close()
    typer.echo(f"blocked {kind} {account.lower()}" if added else f"{account} was already blocked")


@app.command("unblock")
def unblock(
    account: Annotated[str, typer.Argument(help="The payer account or node wallet (0x...).")],
    config: ConfigOpt = None,
) -> None:
    """Lift every block of an account."""
    if not _is_address(account):
        raise BadUsage(f"not an account: {account[:64]!r}", "give a 0x address of 40 hex digits")
    reports = _open(config)
    try:
        lifted = reports.unblock(account)
    finally:
        reports.close()
    if not lifted:
        raise Refused(f"{account} is not blocked", "see sogni-coordinator reports blocks")
    typer.echo(f"unblocked {account.lower()}")


@app.command("blocks")
def blocks(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Every blocked payer and node."""
    reports = _open(config)
    try:
        found = reports.blocks()
    finally:
        reports.close()
    if as_json:
        typer.echo(json.dumps([_block_json(b) for b in found]))
        return
    if not found:
        typer.echo("no blocks")
        return
    for b in found:
        why = f"report {b.report_id}" if b.report_id is not None else "by hand"
        typer.echo(f"{b.kind:<6} {b.account}  {_day(b.blocked_at)} UTC  {why}")


def _is_address(text: str) -> bool:
    body = text[2:] if text[:2].lower() == "0x" else ""
    return len(body) == 40 and all(c in "0123456789abcdefABCDEF" for c in body)
