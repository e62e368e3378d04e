"""`sogni-coordinator`: run a coordinator and manage its offer-signing key.

Errors are one line with the exit code of their class (`sogni_protocol.cli_errors`,
docs/CLI.md). The entry point is `sogni_coordinator.__main__:main`, which checks the
`coordinator` extra before importing this module.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import trio
import typer

from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_protocol.cli_errors import (
    NEGATIVE_AS_ARGUMENT,
    BadUsage,
    CliGroup,
    DebugOption,
    Refused,
    parse_amount,
    register,
)
from sogni_protocol.logs import configure_logging
from sogni_protocol.settings import READ_ONLY_SENDER, SettingsError
from sogni_wallet.addresses import AddressesFileError
from sogni_wallet.keystore import (
    create_keystore,
    keystore_address,
    password_from_env_or_prompt,
    unlock_wallet,
)

app = typer.Typer(
    help="Sogni Supernet coordinator.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a key in a local must never reach a terminal
    cls=CliGroup,
)
keys_app = typer.Typer(help="The coordinator's offer-signing key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]
_HINT = "sogni-coordinator keys create"

register("sogni_coordinator.settlement.epochs.SettlementError", Refused, None)
register("sogni_coordinator.ledger.LedgerError", Refused, None)
register("sogni_coordinator.data_dir_lock.DataDirBusy", Refused, None)
register(
    "sogni_coordinator.key_rotation.RotationError",
    Refused,
    'see docs/OPERATIONS.md, "Rotating the offer key"',
)


@app.callback()
def _main(debug: DebugOption = False) -> None:
    """Sub-commands below."""


def _config(path: Path | None) -> CoordinatorConfig:
    """The effective config; a value it refuses is a usage error (exit 2)."""
    try:
        return load_coordinator_config(path)
    except (SettingsError, AddressesFileError):
        raise
    except ValueError as exc:  # e.g. chain_id contradicting the addresses file
        raise BadUsage(
            str(exc), "fix the config file or the SOGNI_COORDINATOR_* variables"
        ) from exc


@keys_app.command("create")
def keys_create(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing key (kept as .bak).")] = False,
    settlement: Annotated[
        bool,
        typer.Option(
            "--settlement",
            help="Create the separate settlement key at `settlement_keystore` instead.",
        ),
    ] = False,
) -> None:
    """Create the encrypted signing key (password from the env var or a prompt)."""
    cfg = _config(config)
    if settlement:
        if cfg.settlement_keystore is None:
            raise BadUsage(
                "settlement_keystore is not set", "set it in the config (a path), then run again"
            )
        password = password_from_env_or_prompt(cfg.settlement_password_env, confirm=True)
        address = create_keystore(
            cfg.settlement_keystore,
            password,
            force=force,
            create_hint="sogni-coordinator keys create --settlement",
        )
        typer.echo(
            f"settlement key {address} in {cfg.settlement_keystore}: grant it SETTLEMENT_ROLE "
            "(chain deploy --settler ADDRESS), and keep it offline if you like"
        )
        return
    password = password_from_env_or_prompt(cfg.password_env, confirm=True)
    address = create_keystore(cfg.keystore, password, force=force, create_hint=_HINT)
    typer.echo(f"coordinator signer {address} in {cfg.keystore}")


@keys_app.command("show")
def keys_show(config: ConfigOpt = None) -> None:
    """Print the signer address nodes must list in `trusted_coordinators`."""
    cfg = _config(config)
    address = keystore_address(cfg.keystore, create_hint=_HINT)
    typer.echo(json.dumps({"address": address, "keystore": str(cfg.keystore)}))


@keys_app.command("rotate")
def keys_rotate(config: ConfigOpt = None) -> None:
    """Hand over to a new offer-signing key, signed by the old one (nodes follow it).

    The old keystore is kept as `<keystore>.<address>.bak`; restart the coordinator to sign
    with the new key. docs/OPERATIONS.md, "Rotating the offer key".
    """
    from sogni_coordinator.key_rotation import chain_path, rotate
    from sogni_protocol.eip712 import Domain

    cfg = _config(config)
    password = password_from_env_or_prompt(cfg.password_env)
    done = rotate(
        cfg.keystore, password, cfg.data_dir, Domain(cfg.chain_id, cfg.verifying_contract)
    )
    what = "finished the interrupted rotation" if done.resumed else "rotated"
    typer.echo(
        f"{what}: offer key {done.old} -> {done.new} (old keystore kept as {done.backup}, "
        f"chain in {chain_path(cfg.data_dir)}); restart the coordinator to sign with the new key"
    )


@app.command("start")
def start(
    config: ConfigOpt = None,
    announce: Annotated[
        bool, typer.Option(help="Print one JSON line on stdout when ready (for launchers).")
    ] = False,
) -> None:
    """Serve nodes and clients until SIGINT/SIGTERM."""
    from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator

    cfg = _config(config)
    configure_logging(cfg.log_level, json=cfg.log_json)
    wallet = unlock_wallet(cfg.keystore, cfg.password_env, create_hint=_HINT)
    signer = Signer(wallet.address, wallet.private_key)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running: RunningCoordinator = await nursery.start(run_coordinator, cfg, signer)
            if announce:
                line = {
                    "event": "ready",
                    "peerId": running.peer_id,
                    "addrs": running.addrs,
                    "address": running.address,
                    "http": running.http_url,
                }
                print(json.dumps(line), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)
    sys.stderr.flush()


@app.command("workers")
def workers(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each worker's reputation score, tier, stake, jobs, failures and earnings."""
    import time

    from sogni_coordinator.chain_link import WEI_PER_SOGNI
    from sogni_coordinator.reputation import Reputation
    from sogni_protocol.pricing import BASELINE_RENDER_SECONDS

    cfg = _config(config)
    reputation = Reputation(cfg.database)
    standing = None
    if cfg.chain_url and cfg.addresses_file:
        from sogni_chain import Addresses, Deployment, connect

        chain = connect(cfg.chain_url, keys=[])  # reads only
        addresses = Addresses.load(cfg.addresses_file, chain_id=chain.chain_id)
        standing = Deployment(chain, addresses, sender=READ_ONLY_SENDER)
    now = time.time()
    rows = []
    for rec in sorted(reputation.records.values(), key=lambda r: -r.score(now)):
        stake = licensed = None
        if standing is not None:
            stake = standing.staking.active_stake(rec.wallet) // WEI_PER_SOGNI
            licensed = standing.license.has_valid_license(rec.wallet)
        rows.append(
            {
                "wallet": rec.wallet,
                "score": round(rec.score(now), 3),
                "tier": "unknown" if licensed is None else ("fast" if licensed else "relaxed"),
                "stake": stake,
                "jobs": rec.jobs,
                "failures": rec.failures,
                "earnedSpark": round(rec.earned_units / 1000 / BASELINE_RENDER_SECONDS, 6),
                "blacklisted": rec.blacklisted_until > now,
            }
        )
    reputation.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(
        f"{'wallet':<44}{'score':>7}{'tier':>9}{'stake':>10}{'jobs':>7}{'fail':>6}{'spark':>12}"
    )
    for r in rows:
        stake_text = "-" if r["stake"] is None else str(r["stake"])
        typer.echo(
            f"{r['wallet']:<44}{r['score']:>7}{r['tier']:>9}{stake_text:>10}"
            f"{r['jobs']:>7}{r['failures']:>6}{r['earnedSpark']:>12}"
            + ("  BLACKLISTED" if r["blacklisted"] else "")
        )


MAX_CREDIT_MICRO = 2**53
"""The most one `credit` adds (about 9 billion units): balances are 64-bit micro units."""


@app.command("credit", context_settings=NEGATIVE_AS_ARGUMENT)
def credit(
    account: Annotated[str, typer.Argument(help="Payer wallet address.")],
    amount: Annotated[
        str, typer.Argument(help="Spark (or SOGNI with --sogni), e.g. 100 or 2.5 (6 decimals).")
    ],
    sogni: Annotated[bool, typer.Option("--sogni", help="Credit SOGNI instead of Spark.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Credit a payer: stands for a card purchase of Spark, or a SOGNI deposit."""
    from eth_utils import is_address

    from sogni_coordinator.ledger import Ledger

    unit = "SOGNI" if sogni else "Spark"
    micro = parse_amount(amount, unit=unit, decimals=6)  # the ledger counts micro units
    if micro > MAX_CREDIT_MICRO:
        raise BadUsage(
            f"not an amount of {unit}: {amount.strip()[:40]!r} is more than the ledger holds",
            f"give at most {MAX_CREDIT_MICRO // 10**6} {unit}",
        )
    if not is_address(account):
        raise BadUsage(f"{account!r} is not an Ethereum address", "give a 0x... address")
    cfg = _config(config)
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger = Ledger(cfg.database)
    try:
        if sogni:
            ledger.deposit_sogni(account, micro)
        else:
            ledger.credit_purchase(account, micro, micro=True)
        typer.echo(json.dumps({"account": account, "balance": ledger.balance(account)}))
    finally:
        ledger.close()


@app.command("balance")
def balance(
    account: Annotated[str, typer.Argument(help="Wallet address.")],
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (micro units).")] = False,
) -> None:
    """Balances of an account: free Spark, paid Spark and SOGNI."""
    from eth_utils import is_address

    from sogni_coordinator.ledger import MICRO, Ledger

    if not is_address(account):
        raise BadUsage(f"{account!r} is not an Ethereum address", "give a 0x... address")
    ledger = Ledger(_config(config).database)
    try:
        held = ledger.balance(account)
    finally:
        ledger.close()
    if as_json:
        typer.echo(json.dumps({"account": account, "balance": held}))
        return
    typer.echo(f"account     {account}")
    rows = (
        ("free Spark", held["spark_free"]),
        ("paid Spark", held["spark_paid"]),
        ("SOGNI", held["sogni"]),
    )
    for unit, amount in rows:
        typer.echo(f"{unit:<11} {amount / MICRO:,.6f}")


app.command("leaderboard")(__import__("sogni_coordinator.leaderboard").leaderboard.leaderboard_cmd)
app.add_typer(
    __import__("sogni_coordinator.seasons.close_cli", fromlist=["app"]).app, name="season"
)


app.add_typer(__import__("sogni_coordinator.chain_cli", fromlist=["app"]).app)
app.add_typer(__import__("sogni_coordinator.slash_cli", fromlist=["app"]).app, name="slash")
app.add_typer(__import__("sogni_coordinator.api_keys_cli", fromlist=["app"]).app, name="api-keys")
app.add_typer(__import__("sogni_coordinator.reports_cli", fromlist=["app"]).app, name="reports")
app.add_typer(__import__("sogni_coordinator.network_signers", fromlist=["app"]).app, name="network")
app.registered_commands += __import__(
    "sogni_coordinator.backup_cli", fromlist=["app"]
).app.registered_commands

if __name__ == "__main__":
    from sogni_protocol.cli_errors import main

    main(app, prog_name="sogni-coordinator")
