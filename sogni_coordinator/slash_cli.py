"""`sogni-coordinator slash ...`: review, sign and submit slash proposals (docs/SLASHING.md).

The coordinator proposes a slash when failed result checks blacklist a wallet; nothing here
runs by itself. The operator lists and reviews proposals, writes the unsigned `Staking.slash`
(`propose-tx`, online), signs it with the settlement key (`sign`, may be offline; the offer
key never slashes), and sends it (`submit`), or dismisses a proposal. The logic lives in
`sogni_coordinator.settlement.slashes`; this module only parses, prints and picks keys.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_coordinator.chain_cli import _config, _deployment, _shared_chain
from sogni_protocol.cli_errors import BadUsage, Refused, parse_amount, register

if TYPE_CHECKING:
    from sogni_chain import Chain
    from sogni_coordinator.config import CoordinatorConfig
    from sogni_coordinator.store import SlashProposal, Store

__all__ = ["app"]

app = typer.Typer(
    help="Slash proposals after failed result checks: list, show, propose-tx, sign, submit, "
    "dismiss (docs/SLASHING.md).",
    no_args_is_help=True,
)
register("sogni_coordinator.settlement.slashes.SlashError", Refused, None)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]
UrlOpt = Annotated[
    str | None, typer.Option("--chain-url", help="JSON-RPC url (default: config chain_url).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
IdArg = Annotated[int, typer.Argument(help="Proposal id (see `slash list`).", min=1)]
_OFFER_HINT = "sogni-coordinator keys create"
_SETTLEMENT_HINT = "sogni-coordinator keys create --settlement"
_WEI = 10**18


def _chain(cfg: CoordinatorConfig, url: str | None) -> Chain:
    """The shared chain (tests substitute an in-process one here)."""
    return _shared_chain(cfg, url)


def _store(cfg: CoordinatorConfig) -> Store:
    from sogni_coordinator.store import Store

    if not cfg.database.exists():
        raise BadUsage(f"no coordinator database at {cfg.database}", "check data_dir")
    return Store(cfg.database)


def _offer_address(cfg: CoordinatorConfig) -> str | None:
    from sogni_wallet.keystore import keystore_address

    if not Path(cfg.keystore).expanduser().exists():
        return None
    return keystore_address(cfg.keystore, create_hint=_OFFER_HINT)


def _settlement_address(cfg: CoordinatorConfig) -> str:
    """The settlement key's address; never the offer key, on any network."""
    from sogni_wallet.keystore import keystore_address

    if cfg.settlement_keystore is None:
        raise Refused(
            "slashing needs the separate settlement key, and settlement_keystore is not set",
            f"set it in the config and create it with `{_SETTLEMENT_HINT}`; the offer-signing "
            "key never slashes",
        )
    address = keystore_address(cfg.settlement_keystore, create_hint=_SETTLEMENT_HINT)
    offer = _offer_address(cfg)
    if offer is not None and offer.lower() == address.lower():
        raise Refused(
            f"settlement_keystore holds the offer-signing key {address}, which never slashes",
            "use a separate key for settlement (keys create --settlement)",
        )
    return address


def _sogni(wei: int) -> str:
    whole, frac = divmod(wei, _WEI)
    return f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole)


def _as_json(p: SlashProposal) -> dict[str, Any]:
    return {
        "id": p.id,
        "wallet": p.wallet,
        "failedChecks": len(p.job_ids),
        "jobIds": ["0x" + j.hex() for j in p.job_ids],
        "reason": p.reason,
        "state": p.state,
        "proposedAt": p.proposed_at,
        "note": p.note,
    }


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _disputes_of(cfg: CoordinatorConfig) -> dict[int, dict[str, Any]]:
    """Proposal id -> its slash case on Disputes as the coordinator's desk follows it (case
    id, `voteBy` once disputed, outcome, and the failures its published bundle lists)."""
    from sogni_coordinator.disputes import DisputeBook

    book = DisputeBook(cfg.database)
    try:
        cases = book.slash_cases()
        pardoned = {c.case_id: book.pardoned(c.worker, c.job_ids) for c in cases}
    finally:
        book.close()
    out: dict[int, dict[str, Any]] = {}
    for c in cases:
        failures: list[dict[str, Any]] = []
        if c.bundle_path is not None:
            try:
                failures = list(json.loads(Path(c.bundle_path).read_text()).get("failures", []))
            except (OSError, ValueError, AttributeError):
                failures = []
        out[c.proposal_id] = {
            "caseId": "0x" + c.case_id.hex(),
            "voteBy": c.vote_by,
            "outcome": c.outcome,
            "bundle": c.bundle_path,
            "failures": failures,
            "pardoned": ["0x" + j.hex() for j in c.job_ids if j in pardoned[c.case_id]],
        }
    return out


def _dispute_line(dispute: dict[str, Any]) -> str:
    line = f"case {dispute['caseId'][:18]}"
    if dispute["voteBy"]:
        line += f", disputed: vote by {_when(dispute['voteBy'])}"
    line += f", {dispute['outcome']}" if dispute["outcome"] else ""
    if dispute.get("pardoned"):  # a won dispute took their strikes back
        line += f", {len(dispute['pardoned'])} failed checks pardoned"
    return line


def _find(store: Store, proposal_id: int) -> SlashProposal:
    for p in store.slash_proposals():
        if p.id == proposal_id:
            return p
    raise BadUsage(f"no slash proposal {proposal_id}", "see `sogni-coordinator slash list`")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadUsage(f"cannot read {path}: {exc}", f"pass the file {what} wrote") from None
    if not isinstance(document, dict):
        raise BadUsage(f"{path} is not a JSON object", f"pass the file {what} wrote")
    return document


@app.command("list")
def slash_list(
    config: ConfigOpt = None,
    state: Annotated[
        str | None, typer.Option(help="Only proposals in this state (proposed, submitted, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every slash proposal: id, wallet, failed checks, state and reason."""
    cfg = _config(config)
    store = _store(cfg)
    try:
        items = [_as_json(p) for p in store.slash_proposals(state)]
    finally:
        store.close()
    disputes = _disputes_of(cfg)
    for it in items:
        it["dispute"] = disputes.get(it["id"])
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("no slash proposals")
        return
    typer.echo(f"{'id':>5}  {'wallet':<42}  {'fails':>5}  {'state':<9}  reason")
    for it in items:
        reason = it["reason"] if len(it["reason"]) <= 60 else it["reason"][:57] + "..."
        typer.echo(
            f"{it['id']:>5}  {it['wallet']:<42}  {it['failedChecks']:>5}  {it['state']:<9}  "
            f"{reason}"
        )
        if it["dispute"] is not None:
            typer.echo(f"{'':>5}  {_dispute_line(it['dispute'])}")


@app.command("show")
def slash_show(proposal_id: IdArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """A proposal with its failed receipts (why each failed) and the evidence kept."""
    cfg = _config(config)
    store = _store(cfg)
    try:
        proposal = _find(store, proposal_id)
        failures: list[dict[str, Any]] = []
        for job_id in proposal.job_ids:
            evidence = [len(e) for e in store.failed_evidence(job_id)]
            for _job, worker, receipt, reason in store.failed_receipts(job_id):
                if worker.lower() != proposal.wallet.lower():
                    continue  # another worker failed the same job: not this wallet's evidence
                failures.append(
                    {
                        "jobId": "0x" + job_id.hex(),
                        "modelId": receipt.model_id,
                        "stepsDone": receipt.steps_done,
                        "reason": reason,
                        "evidenceBytes": evidence,
                    }
                )
    finally:
        store.close()
    dispute = _disputes_of(cfg).get(proposal.id)
    data = {**_as_json(proposal), "failures": failures, "dispute": dispute}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    when = dt.datetime.fromtimestamp(proposal.proposed_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    typer.echo(f"proposal {proposal.id}: {proposal.wallet} ({proposal.state}), proposed {when}")
    typer.echo(f"reason: {proposal.reason}")
    if proposal.note:
        typer.echo(f"note:   {proposal.note}")
    for f in failures:
        sizes = ", ".join(str(n) for n in f["evidenceBytes"]) or "none"
        typer.echo(
            f"  {f['jobId']}  {f['modelId']}  {f['stepsDone']} steps  evidence bytes: {sizes}"
        )
        typer.echo(f"    {f['reason']}")
    if dispute is not None:
        typer.echo(_dispute_line(dispute))
        for f in dispute["failures"]:
            typer.echo(f"  bundle: {f.get('jobId')}  {f.get('modelId')}  {f.get('reason')}")


@app.command("propose-tx")
def slash_propose_tx(
    proposal_id: IdArg,
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    amount: Annotated[
        str | None, typer.Option(help="SOGNI to slash, e.g. 250.5 (default: --share-bps).")
    ] = None,
    share_bps: Annotated[
        int,
        typer.Option(help="Share of the wallet's active + pending stake, in basis points."),
    ] = 10_000,
    as_json: JsonOpt = False,
) -> None:
    """Write the unsigned Staking.slash for a proposal, from the settlement key.

    Dismisses the proposal instead when the wallet has nothing staked (active + pending).
    """
    from sogni_coordinator.settlement.slashes import prepare

    wei = None if amount is None else parse_amount(amount, unit="SOGNI")  # exit 2: "inf", "-5"
    cfg = _config(config)
    sender = _settlement_address(cfg)
    chain = _chain(cfg, chain_url)
    deployment = _deployment(cfg, chain)
    store = _store(cfg)
    try:
        done = prepare(
            store,
            deployment,
            proposal_id,
            sender,
            cfg.data_dir,
            offer_address=_offer_address(cfg),
            amount=wei,
            share_bps=share_bps,
        )
    finally:
        store.close()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "proposal": done.proposal_id,
                    "wallet": done.wallet,
                    "staked": str(done.staked),
                    "amount": str(done.amount),
                    "unsignedTx": None if done.path is None else str(done.path),
                    "state": "dismissed" if done.path is None else "proposed",
                },
                indent=2,
            )
        )
        return
    if done.path is None:
        typer.echo(f"proposal {proposal_id} dismissed: {done.wallet} has nothing staked")
        return
    typer.echo(
        f"slash {_sogni(done.amount)} of {_sogni(done.staked)} SOGNI staked by {done.wallet}: "
        f"sign {done.path} with `sogni-coordinator slash sign FILE` (settlement key), then "
        "`sogni-coordinator slash submit SIGNED`"
    )


@app.command("sign")
def slash_sign(
    unsigned: Annotated[Path, typer.Argument(help="The unsigned slash file.", exists=True)],
    keystore: Annotated[
        Path | None,
        typer.Option(help="The settlement key's keystore (default: settlement_keystore)."),
    ] = None,
    config: ConfigOpt = None,
    password_env: Annotated[
        str | None,
        typer.Option(help="Env var holding its password (default: settlement_password_env)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Default: FILE with .signed.json.")] = None,
) -> None:
    """Sign a slash with the settlement key, offline (no chain; refuses the offer key).

    With a config (or without --keystore) the key defaults to settlement_keystore, and when
    the coordinator database is there the proposal must still be open.
    """
    from sogni_coordinator.settlement.slashes import sign_offline
    from sogni_wallet.keystore import load_wallet, password_from_env_or_prompt

    document = _read_json(unsigned, "`slash propose-tx`")
    offer: str | None = None
    env_name = password_env or "SOGNI_SETTLEMENT_PASSWORD"
    if keystore is None or config is not None:
        cfg = _config(config)
        offer = _offer_address(cfg)
        if keystore is None:
            keystore = cfg.settlement_keystore
            if keystore is None:
                raise BadUsage(
                    "no settlement key: settlement_keystore is not set",
                    "pass --keystore KEY (the settlement key, never the offer key)",
                )
            keystore = Path(keystore)
        env_name = password_env or cfg.settlement_password_env
        if cfg.database.exists():  # signing where the proposals are: it must still be open
            from sogni_coordinator.settlement.slashes import open_proposal

            store = _store(cfg)
            try:
                proposal = document.get("proposal")
                if not isinstance(proposal, int):
                    raise BadUsage(f"{unsigned} names no proposal", "pass the propose-tx file")
                open_proposal(store, proposal)
            finally:
                store.close()
    password = password_from_env_or_prompt(env_name)
    wallet = load_wallet(keystore, password, create_hint=_SETTLEMENT_HINT)
    if offer is not None and offer.lower() == wallet.address.lower():
        raise Refused(
            f"{keystore} holds the offer-signing key {wallet.address}, which never slashes",
            "sign with the settlement key",
        )
    signed = sign_offline(document, wallet.private_key)
    target = out or unsigned.with_suffix(".signed.json")
    target.write_text(json.dumps(signed, indent=2))
    typer.echo(
        f"signed: slash {_sogni(int(signed['amount']))} SOGNI from {signed['wallet']} "
        f"(proposal {signed['proposal']}) by {signed['from']}: {target}"
    )


@app.command("submit")
def slash_submit(
    signed: Annotated[Path, typer.Argument(help="The signed slash file.", exists=True)],
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a signed slash and mark its proposal submitted.

    The signed transaction must be the one `propose-tx` wrote for the still-open proposal, so
    an edited file or a second submission is refused before anything is sent.
    """
    from sogni_coordinator.settlement.slashes import submit

    document = _read_json(signed, "`slash sign`")
    cfg = _config(config)
    chain = _chain(cfg, chain_url)
    deployment = _deployment(cfg, chain)
    store = _store(cfg)
    try:
        done = submit(store, deployment, document, cfg.data_dir, offer_address=_offer_address(cfg))
    finally:
        store.close()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "proposal": done.proposal_id,
                    "wallet": done.wallet,
                    "txHash": done.tx_hash,
                    "slashed": str(done.slashed),
                    "recipient": done.recipient,
                    "resumed": done.resumed,
                },
                indent=2,
            )
        )
        return
    typer.echo(
        f"proposal {done.proposal_id} submitted{' (already mined)' if done.resumed else ''}: "
        f"slashed {_sogni(done.slashed)} SOGNI from {done.wallet} to {done.recipient}, "
        f"tx {done.tx_hash}"
    )


@app.command("dismiss")
def slash_dismiss(
    proposal_id: IdArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept as the proposal's note).")],
    config: ConfigOpt = None,
) -> None:
    """Close a proposal without slashing (the operator's judgement, e.g. after a dispute)."""
    from sogni_coordinator.settlement.slashes import dismiss

    cfg = _config(config)
    store = _store(cfg)
    try:
        dismiss(store, proposal_id, reason)
    finally:
        store.close()
    typer.echo(f"proposal {proposal_id} dismissed: {reason.strip()}")
