"""`sogni-node dispute open JOB`: contest a refused result (or a proposed slash) on chain.

Why the node: the refusal names its wallet, and only that wallet may dispute it, posting the
bond (SOGNI, approved then pulled by the Disputes contract). The signed refusal comes from
the coordinator (`GET /disputes/refusals/0x<job>` on its HTTP port) or from a file saved
from there (`--refusal FILE`): it is what makes the dispute valid on chain (signed by a key
holding REPORTER_ROLE). `--slash CASE` disputes a proposed slash instead (no refusal needed).
`sogni-node dispute open-vote CASE` opens the node's own stalled vote (the coordinator did not
within its evidence window) on the original evidence, before the case's vote-by time: a
dispute whose vote nobody opened by then is lost. Each expected refusal (window closed, not
this wallet's, bond missing, already disputed, too early, too late) is one line before
anything is sent.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_node.cli_common import ConfigOption
from sogni_node.cli_common import load_config as _config
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from sogni_chain import Deployment
    from sogni_chain.disputes import Disputes

__all__ = ["app", "fetch_refusal", "pick_refusal"]

app = typer.Typer(help="Dispute a refused result or a proposed slash.", no_args_is_help=True)

_SOGNI = 10**18


def fetch_refusal(coordinator: str, job: str) -> dict[str, Any]:
    """The coordinator's signed refusals for `job` (HTTP, 127.0.0.1 or wherever it serves)."""
    url = f"{coordinator.rstrip('/')}/disputes/refusals/{job}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise Refused(f"the coordinator has no refusal for job {job}") from None
        raise Refused(f"the coordinator answered {exc.code} for job {job}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unavailable(f"cannot read refusals from {url}: {exc}") from None
    return body


def pick_refusal(body: dict[str, Any], job: str, wallet: str) -> dict[str, Any]:
    """This wallet's refusal for `job` among those given (a file or the coordinator's list)."""
    items = body.get("refusals", [body]) if isinstance(body, dict) else []
    mine = [
        r
        for r in items
        if isinstance(r, dict)
        and str(r.get("worker", "")).lower() == wallet.lower()
        and str(r.get("jobId", job)).lower().removeprefix("0x") == job.lower().removeprefix("0x")
    ]
    if not mine:
        raise Refused(f"no refusal of job {job} for this wallet {wallet}")
    return mine[-1]


def _disputes_and_wallet(
    config: Path | None, chain_url: str | None
) -> tuple[Deployment, Disputes, LocalAccount]:
    """The network's contracts, its Disputes contract and this node's unlocked wallet."""
    from sogni_node.rewards_cli import _required_deployment, _wallet

    cfg = _config(config)
    deployment = _required_deployment(cfg, chain_url)
    if deployment.disputes is None:
        raise Unavailable(
            "the addresses file names no Disputes contract", "ask the coordinator's operator"
        )
    return deployment, deployment.disputes, _wallet(cfg, deployment)


@app.command("open")
def open_cmd(
    job: Annotated[str, typer.Argument(help="The refused job's id (0x...), from the journal.")],
    config: ConfigOption = None,
    refusal: Annotated[
        Path | None, typer.Option("--refusal", help="A refusal JSON saved from the coordinator.")
    ] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator", help="The coordinator's HTTP url (e.g. http://127.0.0.1:8080)."
        ),
    ] = None,
    slash: Annotated[
        str | None, typer.Option("--slash", help="Dispute this proposed slash case instead.")
    ] = None,
    chain_url: Annotated[
        str | None, typer.Option("--chain-url", help="JSON-RPC url (default: config chain_url).")
    ] = None,
) -> None:
    """Post the bond and open a dispute; jurors then vote on the re-checked evidence."""
    from sogni_chain import ChainRevert
    from sogni_chain.disputes import DisputeRefused, Refusal, open_dispute

    deployment, disputes, worker = _disputes_and_wallet(config, chain_url)
    signed: Refusal | None = None
    case_id: bytes | None = None
    if slash is not None:
        try:
            case_id = bytes.fromhex(slash.lower().removeprefix("0x"))
        except ValueError:
            raise BadUsage(f"--slash {slash!r} is not a case id (0x + 64 hex)") from None
    else:
        if refusal is not None:
            try:
                body = json.loads(refusal.read_text())
            except (OSError, ValueError) as exc:
                raise BadUsage(f"cannot read the refusal {refusal}: {exc}") from None
        elif coordinator is not None:
            body = fetch_refusal(coordinator, job)
        else:
            raise BadUsage("give --coordinator URL or --refusal FILE (or --slash CASE)")
        try:
            signed = Refusal.from_json(pick_refusal(body, job, worker.address))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadUsage(f"not a refusal: {exc!r}") from None
    try:
        tx = open_dispute(
            disputes,
            deployment.token.address,
            worker=worker,
            refusal=signed,
            case_id=case_id,
        )
    except DisputeRefused as exc:
        raise Refused(str(exc)) from None
    except ChainRevert as exc:
        raise Refused(f"the dispute was refused: {exc}") from None
    ev = tx.event("DisputeOpened")
    typer.echo(
        f"dispute opened: case 0x{bytes(ev['caseId']).hex()}, bond "
        f"{int(ev['bond']) / _SOGNI:g} SOGNI; the coordinator re-checks the steps, then "
        f"stakers vote (`sogni dispute show 0x{bytes(ev['caseId']).hex()[:16]}`)"
    )


@app.command("open-vote")
def open_vote_cmd(
    case: Annotated[str, typer.Argument(help="This wallet's disputed case (0x + 64 hex).")],
    config: ConfigOption = None,
    chain_url: Annotated[
        str | None, typer.Option("--chain-url", help="JSON-RPC url (default: config chain_url).")
    ] = None,
) -> None:
    """Open the vote of this wallet's own stalled dispute, on the original evidence: once the
    coordinator's evidence window is over and before the case's vote-by time (after it the
    dispute is lost: the refusal or slash is upheld and the bond kept)."""
    from sogni_chain import ChainRevert
    from sogni_chain.disputes import DisputeRefused, open_stalled_vote

    try:
        case_id = bytes.fromhex(case.lower().removeprefix("0x"))
    except ValueError:
        case_id = b""
    if len(case_id) != 32:
        raise BadUsage(f"{case!r} is not a case id (0x + 64 hex)")
    _, disputes, worker = _disputes_and_wallet(config, chain_url)
    try:
        tx = open_stalled_vote(disputes, case_id, worker=worker)
    except DisputeRefused as exc:
        raise Refused(str(exc)) from None
    except ChainRevert as exc:
        raise Refused(f"opening the vote was refused: {exc}") from None
    ev = tx.event("VotingOpened")
    typer.echo(
        f"vote opened on case 0x{case_id.hex()} (on the original evidence); stakers commit "
        f"until {int(ev['commitEnd'])} and reveal until {int(ev['revealEnd'])} "
        f"(`sogni dispute show 0x{case_id.hex()[:16]}`)"
    )
