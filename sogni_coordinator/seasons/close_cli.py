"""`sogni-coordinator season close N`: pay a finished season's prizes as an airdrop epoch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from sogni_chain import Signer

app = typer.Typer(help="Season prizes: the airdrop epoch at season end.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Coordinator TOML config.", exists=True)
]
CatalogOpt = Annotated[
    Path | None,
    typer.Option(help="Catalog TOML dating the seasons and setting their prize pools."),
]
ChainUrlOpt = Annotated[
    str | None, typer.Option(help="The shared chain's JSON-RPC url (default: chain_url).")
]


@app.command("close")
def season_close(
    season: Annotated[int, typer.Argument(help="The season number (it must have ended).")],
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    chain_url: ChainUrlOpt = None,
    keystore: Annotated[
        Path | None,
        typer.Option(
            help="Keystore of the key holding AIRDROP_ROLE (default: the settlement key).",
            exists=True,
        ),
    ] = None,
    password_env: Annotated[
        str, typer.Option(help="Variable holding --keystore's password.")
    ] = "SOGNI_AIRDROP_PASSWORD",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score all five boards of a finished season and post their prizes through the
    distributor as one airdrop epoch (AIRDROP_ROLE, capped per season by governance).
    Idempotent: a season already paid is shown, one planned is finished."""
    from sogni_chain import ChainRevert
    from sogni_coordinator.chain_cli import _config, _deployment, _shared_chain
    from sogni_coordinator.chain_link import publish_dir
    from sogni_coordinator.seasons.stakers import stake_changes
    from sogni_coordinator.settlement.airdrop import SeasonCloser
    from sogni_coordinator.settlement.epochs import SettlementError
    from sogni_coordinator.settlement.keys import settlement_sender
    from sogni_coordinator.settlement.rules import payout_rules
    from sogni_coordinator.store import Store
    from sogni_protocol.catalog import load_catalog
    from sogni_protocol.cli_errors import BadUsage, Refused
    from sogni_wallet.keystore import keystore_address, unlock_wallet

    cfg = _config(config)
    try:
        s = load_catalog(catalog).season(season)
    except (ValueError, OSError) as exc:
        raise BadUsage(str(exc)) from None
    if time.time() < s.end.timestamp():
        raise Refused(
            f"season {season} ends at {s.end:%Y-%m-%d %H:%M} UTC",
            "close it after it ends (its boards are still moving)",
        )
    chain = _shared_chain(cfg, chain_url)
    deployment = _deployment(cfg, chain)
    sender: Signer
    if keystore is not None:
        sender = chain.add_key(unlock_wallet(keystore, password_env).private_key)
    else:
        offer = keystore_address(cfg.keystore)
        sender = settlement_sender(
            cfg, chain, offer, lambda: unlock_wallet(cfg.keystore, cfg.password_env).private_key
        )
    if isinstance(sender, str):
        raise Refused(
            "the settlement key is offline; an airdrop is posted by an online AIRDROP_ROLE key",
            "pass --keystore with that key (and its password in --password-env)",
        )
    if not deployment.distributor.has_role("AIRDROP_ROLE", sender.address):
        raise Refused(
            f"{sender.address} lacks AIRDROP_ROLE on {deployment.distributor.address}",
            "governance grants it (grantRole) and sets the season's cap (setAirdropCap)",
        )
    store = Store(cfg.database)
    try:
        closer = SeasonCloser(
            store,
            deployment,
            sender=sender,
            rules=payout_rules(cfg),
            publish_dir=publish_dir(cfg),
        )
        result = closer.close(s, stake_changes(deployment))
    except (SettlementError, ChainRevert) as exc:
        raise Refused(str(exc), "see docs/ECONOMICS.md, Seasons") from None
    finally:
        store.close()
    e = result.epoch
    if as_json:
        out = e.as_json()
        out.update(season=season, already=result.already)
        typer.echo(json.dumps(out, indent=2))
        return
    verb = "was paid" if result.already else "is paid"
    typer.echo(
        f"season {season} {verb} as epoch {e.epoch}: {len(e.payouts)} winners, "
        f"{sum(e.payouts.values())} base units, root 0x{e.root.hex()}"
    )
    typer.echo(f"published {e.epoch_file} and {e.receipts_file}")


@app.command("cap")
def season_cap(
    season: Annotated[int, typer.Argument(help="The season number.")],
    keystore: Annotated[
        Path,
        typer.Option(help="Keystore of the distributor's admin (governance).", exists=True),
    ],
    sogni: Annotated[
        int | None,
        typer.Option(help="The cap in whole SOGNI (default: the season's five prize pools)."),
    ] = None,
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    chain_url: ChainUrlOpt = None,
    password_env: Annotated[
        str, typer.Option(help="Variable holding --keystore's password.")
    ] = "SOGNI_GOVERNANCE_PASSWORD",
) -> None:
    """Set the most a season's airdrop may pay (`setAirdropCap`, the distributor's admin
    only). Where stakers' Governor holds that role, propose the call with `sogni gov`."""
    from sogni_chain import ChainRevert
    from sogni_coordinator.chain_cli import _config, _deployment, _shared_chain
    from sogni_protocol.catalog import load_catalog
    from sogni_protocol.cli_errors import BadUsage, Refused
    from sogni_wallet.keystore import unlock_wallet

    cfg = _config(config)
    try:
        s = load_catalog(catalog).season(season)
    except (ValueError, OSError) as exc:
        raise BadUsage(str(exc)) from None
    whole = sum(pool for _board, pool in s.prizes) if sogni is None else sogni
    if whole <= 0:
        raise BadUsage(f"--sogni must be positive, not {whole}")
    chain = _shared_chain(cfg, chain_url)
    deployment = _deployment(cfg, chain)
    admin = chain.add_key(unlock_wallet(keystore, password_env).private_key)
    if not deployment.distributor.has_role("DEFAULT_ADMIN_ROLE", admin.address):
        raise Refused(
            f"{admin.address} is not the distributor's admin",
            "where the Governor holds the role, propose setAirdropCap with `sogni gov propose`",
        )
    try:
        deployment.distributor.set_airdrop_cap(season, whole * 10**18, sender=admin)
    except ChainRevert as exc:
        raise Refused(str(exc), "see docs/ECONOMICS.md, Season prizes") from None
    typer.echo(f"season {season}'s airdrop may pay at most {whole} SOGNI")
