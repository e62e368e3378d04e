"""`sogni-node rewards [claim]`, `sogni-node stake | unstake | withdraw`.

`rewards` works from files alone (the coordinator's published `epochs/` folder and the node's
journal); with a chain url it also checks the posted roots and shows claimed and claimable
amounts. Claims and staking send transactions signed by the node wallet, so they need a shared
chain (`chain_url`, e.g. anvil) and the keystore password.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_node.cli_common import ConfigOption, JsonOption
from sogni_node.cli_common import load_config as _config
from sogni_node.config import NodeConfig
from sogni_protocol.cli_errors import BadUsage, Refused
from sogni_wallet.addresses import AddressesFileError
from sogni_wallet.keystore import keystore_address, unlock_wallet

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from sogni_chain import Deployment
    from sogni_node.rewards import PublishedEpoch

__all__ = ["app", "rewards_app"]

app = typer.Typer(add_completion=False)
"""Nameless: `sogni_node.cli` merges `rewards`, `stake`, `unstake`, `withdraw` into its own."""
rewards_app = typer.Typer(
    help="Earned, claimable and claimed rewards per epoch, checked against the journal.",
    invoke_without_command=True,
)
app.add_typer(rewards_app, name="rewards")

UrlOption = Annotated[
    str | None, typer.Option("--chain-url", help="JSON-RPC url (default: config chain_url).")
]
EpochsOption = Annotated[
    Path | None,
    typer.Option("--epochs-dir", help="Coordinator's published epochs (default: epochs_dir)."),
]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _deployment(cfg: NodeConfig, url: str | None) -> Deployment | None:
    """The deployment on the configured chain, or None when no chain url is set."""
    url = url or cfg.chain_url
    return None if url is None else _required_deployment(cfg, url)


def _required_deployment(cfg: NodeConfig, url: str | None) -> Deployment:
    from sogni_chain import Addresses, Deployment, connect

    url = url or cfg.chain_url
    if url is None:
        raise BadUsage(
            "this needs a chain", "set chain_url (e.g. http://127.0.0.1:8545) or --chain-url"
        )
    if cfg.addresses_file is None:
        raise BadUsage(
            "this needs the contracts' addresses",
            "set addresses_file (the coordinator's `chain deploy` output)",
        )
    try:
        chain = connect(url)
        deployment = Deployment(chain, Addresses.load(cfg.addresses_file, chain_id=chain.chain_id))
    except AddressesFileError:
        raise
    except ValueError as exc:  # an unsupported url, or addresses for another chain
        raise BadUsage(str(exc), "check chain_url and addresses_file") from exc
    return deployment


def _wallet(cfg: NodeConfig, deployment: Deployment) -> LocalAccount:
    wallet = unlock_wallet(cfg.keystore, cfg.password_env)
    return deployment.chain.add_key(wallet.private_key)


def _published(path: Path) -> list[PublishedEpoch]:
    """The published epochs, or `Refused` when they contradict each other."""
    from sogni_node.rewards import PublicationError, load_published

    try:
        return load_published(path)
    except PublicationError as exc:
        raise Refused(
            f"published epochs are inconsistent: {exc}", "ask the coordinator's operator"
        ) from exc


def _epochs_dir(cfg: NodeConfig, option: Path | None) -> Path:
    path = option if option is not None else cfg.epochs_dir
    if path is None:
        raise BadUsage(
            "no published epochs to read",
            "set epochs_dir (the coordinator's published epochs folder) or --epochs-dir",
        )
    return path


# --- rewards -------------------------------------------------------------------------------
@rewards_app.callback()
def rewards(
    ctx: typer.Context,
    config: ConfigOption = None,
    epochs_dir: EpochsOption = None,
    chain_url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show rewards per epoch and audit the published batches (exit 3 on any problem)."""
    if ctx.invoked_subcommand is not None:
        return
    from sogni_node.journal import Journal
    from sogni_node.rewards import audit, format_sogni

    cfg = _config(config)
    account = keystore_address(cfg.keystore)
    epochs = _published(_epochs_dir(cfg, epochs_dir))
    deployment = _deployment(cfg, chain_url)
    with Journal(cfg.journal_path) as journal:
        report = audit(
            account,
            journal.receipts(),
            epochs,
            distributor=deployment.distributor if deployment is not None else None,
        )
    if as_json:
        _print_json(report.as_json())
    else:
        typer.echo(f"account    {account}")
        for e in report.epochs:
            status = (
                ""
                if report.claimed is None
                else ("  claimed" if report.claimed >= e.cumulative else "  unclaimed")
            )
            typer.echo(
                f"epoch {e.epoch:>5}  earned {format_sogni(e.earned):>14} SOGNI  "
                f"cumulative {format_sogni(e.cumulative):>14}  receipts {e.receipts}{status}"
            )
        typer.echo(f"earned     {format_sogni(report.earned)} SOGNI")
        if report.claimed is not None and report.claimable is not None:
            typer.echo(f"claimed    {format_sogni(report.claimed)} SOGNI")
            typer.echo(f"claimable  {format_sogni(report.claimable)} SOGNI")
        typer.echo(f"verified   {report.verified} journal receipts; {len(report.pending)} pending")
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(3)


@rewards_app.command("claim")
def rewards_claim(
    config: ConfigOption = None,
    epochs_dir: EpochsOption = None,
    chain_url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Claim everything earned so far against the latest root (one transaction)."""
    from sogni_node.rewards import claim, format_sogni

    cfg = _config(config)
    deployment = _required_deployment(cfg, chain_url)
    epochs = _published(_epochs_dir(cfg, epochs_dir))
    wallet = _wallet(cfg, deployment)
    amount = claim(deployment.distributor, wallet, epochs)  # ChainRevert: refused, exit 3
    if as_json:
        _print_json({"account": wallet.address, "claimed": str(amount)})
    else:
        typer.echo(f"claimed {format_sogni(amount)} SOGNI to {wallet.address}")


# --- staking -------------------------------------------------------------------------------
def _stake_state(deployment: Deployment, address: str) -> dict[str, str]:
    pending, unlock_at = deployment.staking.pending_stake(address)
    return {
        "account": address,
        "active": str(deployment.staking.active_stake(address)),
        "pending": str(pending),
        "unlockAt": str(unlock_at),
        "balance": str(deployment.token.balance_of(address)),
    }


def _amount(text: str) -> int:
    from sogni_node.rewards import parse_sogni

    try:
        return parse_sogni(text)
    except ValueError as exc:
        raise BadUsage(str(exc), "give an amount of SOGNI such as 1000 or 0.5") from exc


def _staking_tx(
    config: Path | None, chain_url: str | None, send: Callable[[Deployment, LocalAccount], object]
) -> None:
    """Run one staking transaction with the node wallet and print the resulting stake."""
    cfg = _config(config)
    deployment = _required_deployment(cfg, chain_url)
    wallet = _wallet(cfg, deployment)
    send(deployment, wallet)  # a revert (e.g. CooldownActive) is refused: exit 3
    _print_json(_stake_state(deployment, wallet.address))


@app.command("stake")
def stake(
    amount: Annotated[str, typer.Argument(help="SOGNI to stake (e.g. 1000 or 0.5).")],
    config: ConfigOption = None,
    chain_url: UrlOption = None,
) -> None:
    """Stake SOGNI from the node wallet (approve + stake): lowers the platform take rate."""
    wei = _amount(amount)

    def send(deployment: Deployment, wallet: LocalAccount) -> None:
        if deployment.token.allowance(wallet, deployment.staking.address) < wei:
            deployment.token.approve(deployment.staking.address, wei, sender=wallet)
        deployment.staking.stake(wei, sender=wallet)

    _staking_tx(config, chain_url, send)


@app.command("unstake")
def unstake(
    amount: Annotated[str, typer.Argument(help="SOGNI to move to the 7-day unstake bucket.")],
    config: ConfigOption = None,
    chain_url: UrlOption = None,
) -> None:
    """Request an unstake: it stops counting now and can be withdrawn after 7 days."""
    wei = _amount(amount)
    _staking_tx(config, chain_url, lambda d, w: d.staking.request_unstake(wei, sender=w))


@app.command("withdraw")
def withdraw(config: ConfigOption = None, chain_url: UrlOption = None) -> None:
    """Withdraw the unstaked bucket once its cooldown is over."""
    _staking_tx(config, chain_url, lambda d, w: d.staking.withdraw(sender=w))
