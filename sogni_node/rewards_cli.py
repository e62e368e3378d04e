"""`sogni-node rewards [claim | auto-stake]`, `sogni-node stake | unstake | withdraw`.

`rewards` reads the published epochs from the node's coordinators by default (libp2p
`/sogni/epochs/1.0.0`, or their HTTP listener when `epoch_sources` lists URLs), keeps a copy
under `data_dir/epochs` and checks it before use (`epoch_audit.audit_folder`, then the node's
own audit against its journal); `--epochs-dir` (or `epochs_dir`) reads a local copy instead.
With a chain url it also checks the posted roots and shows claimed and claimable amounts.

`rewards claim` claims against the newest matured root. The wallet pays its own gas, or with
`--relay` a coordinator submits the claim and pays it (the tokens still go to the wallet);
`--stake-share` (or `auto_stake_share`) stakes that share of the claim at once. Staking
sends transactions signed by the node wallet, so it needs a shared chain (`chain_url`, e.g.
anvil) and the keystore password. See docs/REWARDS.md.

With `payout_address` set, the rewards are the payout account's: `rewards` reports its leaf
(every receipt paying it) and audits this wallet's journal against it, and `rewards claim`
claims for it (a plain claim may be sent by anyone; the tokens go to the account). Staking
a share at claim time needs the payout account's own signature, so it is refused there:
stake from the payout wallet itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_node.cli_common import ConfigOption, JsonOption
from sogni_node.cli_common import load_config as _config
from sogni_node.config import CONFIG_ENV, ENV_PREFIX, NodeConfig
from sogni_protocol.cli_errors import (
    NEGATIVE_AS_ARGUMENT,
    BadUsage,
    CliError,
    Refused,
    Unavailable,
    no_funds,
    parse_amount,
    register,
    too_little_eth,
)
from sogni_protocol.settings import READ_ONLY_SENDER
from sogni_wallet.addresses import AddressesFileError
from sogni_wallet.keystore import keystore_address, unlock_wallet

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from sogni_chain import Deployment
    from sogni_node.rewards import PublishedEpoch

__all__ = ["app", "rewards_app"]

for _name, _kind, _todo in (
    ("sogni_node.epoch_fetch.EpochsRejected", Refused, "tell the coordinator's operator"),
    (
        "sogni_node.epoch_fetch.EpochFetchError",
        Unavailable,
        "check that a coordinator is running and reachable, or pass --epochs-dir",
    ),
    ("sogni_node.epoch_fetch.RelayFailed", Refused, None),
    ("sogni_node.epoch_fetch.EpochCacheError", Unavailable, None),  # its own todo: local
    ("sogni_node.rewards.NotMatured", Refused, "try again once it has matured"),
    ("sogni_protocol.epoch_audit.PublishedFolderError", Unavailable, "check --epochs-dir"),
):
    register(_name, _kind, _todo)

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
    typer.Option(
        "--epochs-dir",
        help="A local copy of the published epochs (default: epochs_dir, else fetch them).",
    ),
]
FromOption = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Coordinator to fetch epochs from and relay through: a /p2p/ multiaddr or an "
        "http(s):// URL (default: epoch_sources, else coordinators).",
    ),
]
GAS_TODO = "fund the wallet with a little ETH, or add --relay to have a coordinator submit it"
AUTHORIZATION_SECONDS = 3600
"""How long a stake authorization signed for a relayed claim stays valid."""


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
        chain = connect(url, keys=[])  # only the wallet signs (added below): never dev keys
        addresses = Addresses.load(cfg.addresses_file, chain_id=chain.chain_id)
        deployment = Deployment(chain, addresses, sender=READ_ONLY_SENDER)  # sends name the wallet
    except AddressesFileError:
        raise
    except ValueError as exc:  # an unsupported url, or addresses for another chain
        raise BadUsage(str(exc), "check chain_url and addresses_file") from exc
    return deployment


def _accounts(cfg: NodeConfig) -> tuple[str, str]:
    """(the account rewards are paid to, the wallet that signs receipts)."""
    wallet = keystore_address(cfg.keystore)
    return cfg.payout_address or wallet, wallet


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


def _sources(cfg: NodeConfig, source: str | None) -> list[str]:
    if source is not None:
        import msgspec

        from sogni_node.config import EpochSource

        try:
            return [msgspec.convert(source, EpochSource)]
        except msgspec.ValidationError:
            raise BadUsage(
                f"--from {source[:100]!r} is neither a coordinator multiaddr nor an HTTP URL",
                "give /ip4/.../tcp/.../p2p/<peer id> or http(s)://host:port",
            ) from None
    return list(cfg.epoch_sources or cfg.coordinators)


def _epochs_dir(
    cfg: NodeConfig, option: Path | None, source: str | None, *, through: int | None = None
) -> Path:
    """A checked folder of published epochs: the local copy given, else fetched.

    A local copy is checked here (`audit_folder`, up to `through`); a fetched one was
    checked before it replaced the cache.
    """
    import trio

    local = option if option is not None else (cfg.epochs_dir if source is None else None)
    if local is not None:
        from sogni_protocol.epoch_audit import audit_folder

        if not Path(local).is_dir():  # a typo must not read as "earned 0 SOGNI"
            raise Unavailable(  # a missing path is exit 4, as `epoch audit --published`
                f"published epochs folder {local} does not exist", "check the path"
            )
        if not any(Path(local).glob("epoch-*.json")):
            return Path(local)  # nothing published yet: an empty report
        report = audit_folder(Path(local), through=through)
        if not report.ok:
            raise Refused(
                f"published epochs in {local} fail the check: {report.first_problem}",
                "ask the coordinator's operator",
            )
        return Path(local)
    sources = _sources(cfg, source)
    if not sources:
        raise BadUsage(
            "no published epochs to read",
            "list coordinators (or epoch_sources) in the config, or pass --epochs-dir",
        )
    from sogni_node.epoch_fetch import fetch_epochs

    fetched = trio.run(fetch_epochs, sources, cfg.epochs_cache)
    if fetched.stale is not None:
        typer.echo(
            f"warning: no coordinator answered ({fetched.stale}); using the copy of "
            f"{fetched.source} checked earlier",
            err=True,
        )
    return fetched.path


def _posted(
    epochs: list[PublishedEpoch], deployment: Deployment | None
) -> tuple[list[PublishedEpoch], list[int]]:
    """The epochs whose root is on chain, and the numbers of those published but not yet."""
    if deployment is None:
        return epochs, []
    latest = deployment.distributor.latest_epoch()
    return [e for e in epochs if e.epoch <= latest], [e.epoch for e in epochs if e.epoch > latest]


# --- rewards -------------------------------------------------------------------------------
@rewards_app.callback()
def rewards(
    ctx: typer.Context,
    config: ConfigOption = None,
    epochs_dir: EpochsOption = None,
    source: FromOption = None,
    chain_url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show rewards per epoch and audit the published batches (exit 3 on any problem)."""
    if ctx.invoked_subcommand is not None:
        return
    from sogni_node.journal import Journal
    from sogni_node.rewards import audit, format_sogni

    cfg = _config(config)
    account, signer = _accounts(cfg)
    folder = _epochs_dir(cfg, epochs_dir, source)
    deployment = _deployment(cfg, chain_url)
    epochs, unposted = _posted(_published(folder), deployment)
    with Journal(cfg.journal_path) as journal:
        report = audit(
            account,
            journal.receipts(),
            epochs,
            distributor=deployment.distributor if deployment is not None else None,
            worker=signer,
        )
    if as_json:
        _print_json({**report.as_json(), "epochsDir": str(folder), "unposted": unposted})
    else:
        typer.echo(f"account    {account}")
        if signer.lower() != account.lower():
            typer.echo(f"signed by  {signer} (payout_address: rewards go to the account)")
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
        for n in unposted:
            typer.echo(f"epoch {n:>5}  published, its root is not on chain yet")
        typer.echo(f"earned     {format_sogni(report.earned)} SOGNI")
        if report.claimed is not None and report.claimable is not None:
            typer.echo(f"claimed    {format_sogni(report.claimed)} SOGNI")
            typer.echo(
                f"claimable  {format_sogni(report.claimable)} SOGNI"
                f" (epoch {report.matured_epoch}, the newest matured)"
            )
        typer.echo(f"verified   {report.verified} journal receipts; {len(report.pending)} pending")
        if report.unpaid:
            typer.echo(f"unpaid     {len(report.unpaid)} receipts for free work (nobody paid)")
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(3)


@rewards_app.command("claim")
def rewards_claim(
    config: ConfigOption = None,
    epochs_dir: EpochsOption = None,
    source: FromOption = None,
    chain_url: UrlOption = None,
    relay: Annotated[
        bool,
        typer.Option(
            "--relay",
            help="Have a coordinator submit the claim and pay its gas (the wallet needs no ETH).",
        ),
    ] = False,
    stake_share: Annotated[
        float | None,
        typer.Option(
            "--stake-share",
            min=0.0,
            max=1.0,
            help="Share of the claim to stake at once, 0..1 (default: auto_stake_share).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Claim everything earned so far against the newest matured root (one transaction)."""
    import trio

    from sogni_node.journal import Journal
    from sogni_node.rewards import (
        ClaimResult,
        NoGas,
        NotMatured,
        audit,
        format_sogni,
        gas_shortfall,
        plan_claim,
        stake_bps_of,
        submit_claim,
    )

    cfg = _config(config)
    deployment = _required_deployment(cfg, chain_url)
    d = deployment.distributor
    share = stake_share if stake_share is not None else cfg.auto_stake_share
    bps = stake_bps_of(share)
    account, signer = _accounts(cfg)
    if bps and signer.lower() != account.lower():
        raise BadUsage(
            f"staking at claim time needs the payout account {account}'s own signature, "
            f"and this node signs as {signer}",
            "claim with --stake-share 0, then stake from the payout wallet",
        )
    matured = d.matured_epoch()
    if matured == 0:
        raise NotMatured(d.matures_at(1) if d.latest_epoch() else None)
    folder = _epochs_dir(cfg, epochs_dir, source, through=matured)
    epochs, _unposted = _posted(_published(folder), deployment)
    with Journal(cfg.journal_path) as journal:
        report = audit(account, journal.receipts(), epochs, distributor=d, worker=signer)
    for problem in report.problems:  # a claim never gives up a later correction: go on
        typer.echo(f"warning: {problem}", err=True)
    plan = plan_claim(d, account, epochs)  # NotMatured: exit 3
    result: ClaimResult | None = None
    relayer: str | None = None
    if plan is not None:
        deadline = deployment.chain.timestamp() + AUTHORIZATION_SECONDS if bps else 0
        if relay:
            from sogni_node.epoch_fetch import relay_claim
            from sogni_protocol.relay_messages import RelayClaim

            signature = b""
            if bps:
                wallet = _wallet(cfg, deployment)
                signature = d.sign_stake_authorization(wallet, plan.cumulative, bps, deadline)
            request = RelayClaim(
                account=account,
                cumulative_amount=str(plan.cumulative),
                proof=plan.proof,
                stake_bps=bps,
                deadline=deadline,
                signature=signature,
            )
            sources = _sources(cfg, source)
            if not sources:
                raise BadUsage(
                    "no coordinator to relay the claim",
                    "list coordinators (or epoch_sources) in the config, or pass --from",
                )
            relayer, done = trio.run(relay_claim, sources, request)
            result = ClaimResult(int(done.amount), int(done.staked), "0x" + done.tx_hash.hex())
        else:
            shortfall = gas_shortfall(d, plan, stake_bps=bps, deadline=deadline, sender=signer)
            if shortfall is not None:
                raise Refused(_no_gas(signer, *shortfall), GAS_TODO)
            wallet = _wallet(cfg, deployment)
            try:
                result = submit_claim(d, wallet, plan, stake_bps=bps, deadline=deadline)
            except NoGas as exc:
                raise Refused(str(exc), GAS_TODO) from None
    amount = result.amount if result is not None else 0
    staked = result.staked if result is not None else 0
    if as_json:
        out: dict[str, Any] = {"account": account, "claimed": str(amount)}
        if relay or bps:
            out.update(
                {
                    "staked": str(staked),
                    "paid": str(amount - staked),
                    "epoch": plan.epoch if plan is not None else matured,
                    "txHash": result.tx_hash if result is not None else None,
                    "relayer": relayer,
                }
            )
        _print_json(out)
    elif plan is None:  # not "claimed 0 SOGNI": nothing was sent
        typer.echo(_nothing_due(account, d.claimed(account), report.earned, matured))
    else:
        extra = f", {format_sogni(staked)} SOGNI of it staked" if staked else ""
        via = f" (relayed by {relayer})" if relayer else ""
        typer.echo(f"claimed {format_sogni(amount)} SOGNI to {account}{extra}{via}")


def _nothing_due(account: str, claimed: int, earned: int, matured: int) -> str:
    """Why a claim sends nothing: all claimed already, or nothing earned, by the newest
    matured epoch; and whether later epochs hold more."""
    from sogni_node.rewards import format_sogni

    why = (
        f"{account} already claimed {format_sogni(claimed)} SOGNI, all it earned"
        if claimed
        else f"{account} earned nothing"
    )
    later = earned - claimed
    more = (
        f"; {format_sogni(later)} SOGNI more is in epochs not matured yet: claim again then"
        if later > 0
        else ""
    )
    return f"nothing to claim ({why} through epoch {matured}, the newest matured{more})"


def _no_gas(account: str, needed: int, balance: int) -> str:
    def eth(wei: int) -> str:
        return f"{wei / 10**18:.6f}".rstrip("0").rstrip(".") or "0"

    return (
        f"wallet {account} has {eth(balance)} ETH, too little for the claim's gas "
        f"(about {eth(needed)} ETH)"
    )


@rewards_app.command("auto-stake")
def rewards_auto_stake(
    share: Annotated[
        float | None,
        typer.Argument(min=0.0, max=1.0, help="Share of each claim to stake, 0..1 (0: none)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Show, or set in the config file, the share of every claim staked at once."""
    from sogni_protocol.atomic import atomic_write_bytes
    from sogni_protocol.settings import load_settings

    path = config
    if path is None and os.environ.get(CONFIG_ENV, "").strip():
        path = Path(os.environ[CONFIG_ENV].strip())
    if share is None:
        cfg = _config(config)
        _print_json({"autoStakeShare": cfg.auto_stake_share, "config": str(path) if path else None})
        return
    if path is None:
        raise BadUsage(
            "no config file to write auto_stake_share to",
            f"pass --config PATH (created if missing) or set {CONFIG_ENV}; or set "
            f"{ENV_PREFIX}_AUTO_STAKE_SHARE",
        )
    path = path.expanduser()
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise Unavailable(f"cannot read {path}: {exc}") from exc
    updated = set_top_level_key(text, "auto_stake_share", repr(float(share)))
    load_settings(NodeConfig, updated, {}, ENV_PREFIX, source=str(path))  # still valid
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    atomic_write_bytes(path, updated.encode("utf-8"), mode=mode)
    override = os.environ.get(f"{ENV_PREFIX}_AUTO_STAKE_SHARE")
    if override:
        typer.echo(
            f"warning: {ENV_PREFIX}_AUTO_STAKE_SHARE={override} overrides the file", err=True
        )
    _print_json({"autoStakeShare": float(share), "config": str(path)})


_TABLE = re.compile(r"^\s*\[")


def set_top_level_key(text: str, key: str, value: str) -> str:
    """`text` (TOML) with top-level `key = value`: its line replaced, else added before the
    first table (comments and everything else kept as they are)."""
    lines = text.splitlines(keepends=True)
    assignment = re.compile(rf"^\s*{re.escape(key)}\s*=")
    first_table = next((i for i, line in enumerate(lines) if _TABLE.match(line)), len(lines))
    new_line = f"{key} = {value}\n"
    for i in range(first_table):
        if assignment.match(lines[i]):
            lines[i] = new_line
            return "".join(lines)
    if first_table and not lines[first_table - 1].endswith("\n"):
        lines[first_table - 1] += "\n"
    block = [
        "# Share of each `sogni-node rewards claim` staked at once (0..1).\n",
        new_line,
    ]
    if first_table < len(lines):
        block.append("\n")
    lines[first_table:first_table] = block
    return "".join(lines)


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
    """SOGNI typed on the command line, in base units (exit 2 for anything else)."""
    return parse_amount(text, unit="SOGNI")


def _staking_tx(
    config: Path | None, chain_url: str | None, send: Callable[[Deployment, LocalAccount], object]
) -> None:
    """Run one staking transaction with the node wallet and print the resulting stake."""
    cfg = _config(config)
    deployment = _required_deployment(cfg, chain_url)
    wallet = _wallet(cfg, deployment)
    try:
        send(deployment, wallet)  # a revert (e.g. CooldownActive) is refused: exit 3
    except CliError:
        raise
    except Exception as exc:
        if no_funds(exc):  # the chain's own words: a web3 or eth-tester error
            balance = deployment.chain.eth_balance(wallet.address)
            raise too_little_eth(wallet.address, balance) from None
        raise
    _print_json(_stake_state(deployment, wallet.address))


def _too_little_sogni(address: str, balance: int, wei: int) -> Refused:
    from sogni_node.rewards import format_sogni

    return Refused(
        f"wallet {address} holds {format_sogni(balance)} SOGNI, less than the "
        f"{format_sogni(wei)} SOGNI to stake",
        "stake less, claim rewards first (`sogni-node rewards claim`), or send SOGNI to it",
    )


@app.command("stake", context_settings=NEGATIVE_AS_ARGUMENT)
def stake(
    amount: Annotated[str, typer.Argument(help="SOGNI to stake (e.g. 1000 or 0.5).")],
    config: ConfigOption = None,
    chain_url: UrlOption = None,
) -> None:
    """Stake SOGNI from the node wallet (approve + stake): lowers the platform take rate."""
    wei = _amount(amount)

    def send(deployment: Deployment, wallet: LocalAccount) -> None:
        from sogni_chain import ChainRevert

        balance = deployment.token.balance_of(wallet.address)
        if balance < wei:  # in words, not as the token's ERC20InsufficientBalance(...)
            raise _too_little_sogni(wallet.address, balance, wei)
        if deployment.token.allowance(wallet, deployment.staking.address) < wei:
            deployment.token.approve(deployment.staking.address, wei, sender=wallet)
        try:
            deployment.staking.stake(wei, sender=wallet)
        except ChainRevert as exc:  # spent between the check and the stake
            if exc.error != "ERC20InsufficientBalance":
                raise
            now = deployment.token.balance_of(wallet.address)
            raise _too_little_sogni(wallet.address, now, wei) from None

    _staking_tx(config, chain_url, send)


@app.command("unstake", context_settings=NEGATIVE_AS_ARGUMENT)
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
