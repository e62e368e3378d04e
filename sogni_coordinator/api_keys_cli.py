"""`sogni-coordinator api-keys create|list|revoke`: keys of the SDK gateway
(docs/GATEWAY_KEYS.md). The logic is in `sogni_coordinator.api_keys`; this module reads the
config, prints, and turns refusals into one line each."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from sogni_coordinator.api_keys import ApiKeyError, ApiKeyRecord, ApiKeys
from sogni_coordinator.config import load_coordinator_config
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable, register
from sogni_protocol.pricing import MICRO
from sogni_protocol.settings import SettingsError
from sogni_wallet.addresses import AddressesFileError

__all__ = ["app"]

register(ApiKeyError, BadUsage, "see sogni-coordinator api-keys create --help")
register("sogni_coordinator.result_urls.ResultUrlKeyError", Unavailable, None)

app = typer.Typer(
    help="API keys of the SDK gateway (each is a payer account).", no_args_is_help=True
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _open(config: Path | None) -> ApiKeys:
    try:
        cfg = load_coordinator_config(config)
    except (SettingsError, AddressesFileError):
        raise
    except ValueError as exc:  # e.g. chain_id contradicting the addresses file
        raise BadUsage(
            str(exc), "fix the config file or the SOGNI_COORDINATOR_* variables"
        ) from exc
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return ApiKeys(cfg.database)


def _as_json(record: ApiKeyRecord) -> dict[str, object]:
    limit = record.daily_limit_micro
    return {
        "keyId": record.key_id,
        "name": record.name,
        "account": record.account,
        "revoked": record.revoked,
        "dailyLimitSpark": None if limit is None else limit / MICRO,
        "createdAt": record.created_at,
    }


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (shown in list).")],
    daily_limit: Annotated[
        float | None,
        typer.Option("--daily-limit", help="Most Spark the key may spend per UTC day.", min=0),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Create a key and its ledger account; the key is printed once, here."""
    keys = _open(config)
    try:
        key, account = keys.create(name, daily_limit)
    finally:
        keys.close()
    if as_json:
        typer.echo(json.dumps({"apiKey": key, "account": account}))
        return
    typer.echo(f"api key  {key}")
    typer.echo(f"account  {account}")
    typer.echo(
        "Store the key now: it is not shown again. Fund the account with "
        f"`sogni-coordinator credit {account} SPARK`."
    )


@app.command("list")
def list_keys(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Every key: id, name, account, limit, state (never the key itself)."""
    keys = _open(config)
    try:
        records = keys.list()
    finally:
        keys.close()
    if as_json:
        typer.echo(json.dumps([_as_json(r) for r in records]))
        return
    if not records:
        typer.echo("no API keys (sogni-coordinator api-keys create --name NAME)")
        return
    header = ("KEY ID", "ACCOUNT", "LIMIT/DAY", "STATE", "CREATED", "NAME")
    typer.echo("{:<22}{:<44}{:>12}  {:<8}  {:<10}  {}".format(*header))
    for r in records:
        limit = "-" if r.daily_limit_micro is None else f"{r.daily_limit_micro / MICRO:g}"
        day = time.strftime("%Y-%m-%d", time.gmtime(r.created_at))
        state = "revoked" if r.revoked else "active"
        typer.echo(f"{r.key_id:<22}{r.account:<44}{limit:>12}  {state:<8}  {day}  {r.name}")


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, from `api-keys list`.")],
    config: ConfigOpt = None,
) -> None:
    """Refuse a key from now on (its account and balance stay)."""
    keys = _open(config)
    try:
        record = keys.get(key_id)
        if record is None:
            raise Refused(f"no API key {key_id!r}", "see sogni-coordinator api-keys list")
        if not keys.revoke(key_id):
            raise Refused(f"API key {key_id} was already revoked", None)
    finally:
        keys.close()
    typer.echo(f"revoked {key_id} ({record.name}); its account {record.account} keeps its balance")
