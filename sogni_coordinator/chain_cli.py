"""`sogni-coordinator chain ...` and `sogni-coordinator epoch ...`: contracts and settlement.

Commands that change chain state across processes need a shared chain, i.e. a JSON-RPC url
(`--chain-url`, or `chain_url` in the config; anvil locally). The embedded chain exists only
inside one process: `chain deploy` without a url deploys on a throwaway embedded chain just to
write its (deterministic) addresses file; settling on the embedded chain is done in-process by
`sogni_coordinator.settlement.settle_and_claim` (the local demo does that).
"""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_coordinator.chain_link import publish_dir
from sogni_coordinator.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    CoordinatorConfig,
    load_coordinator_config,
)
from sogni_protocol.cli_errors import (
    BadUsage,
    Refused,
    Unavailable,
    no_funds,
    parse_amount,
    too_little_eth,
)
from sogni_protocol.logs import configure_logging
from sogni_protocol.settings import (
    READ_ONLY_SENDER,
    SettingsError,
    load_settings,
    read_config_text,
)
from sogni_wallet.addresses import AddressesFileError

if TYPE_CHECKING:
    from sogni_chain import Chain, Deployment
    from sogni_coordinator.settlement.epochs import Settler
    from sogni_coordinator.store import Store

__all__ = ["app", "chain_app", "epoch_app"]

app = typer.Typer(add_completion=False)
"""Nameless: `sogni_coordinator.cli` merges its two groups (`chain`, `epoch`) into its own."""
chain_app = typer.Typer(
    help="The settlement contracts (deploy, dev funding, settlement role).", no_args_is_help=True
)
epoch_app = typer.Typer(
    help="Settlement epochs: close, sign, submit, show, list, watch, audit.", no_args_is_help=True
)
app.add_typer(chain_app, name="chain")
app.add_typer(epoch_app, name="epoch")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--chain-url", help="JSON-RPC url (default: config chain_url; none: embedded)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_HINT = "sogni-coordinator keys create"
_SETTLEMENT_HINT = "sogni-coordinator keys create --settlement"


def _bad_config(exc: ValueError) -> BadUsage:
    return BadUsage(str(exc), "fix the config file or the SOGNI_COORDINATOR_* variables")


def _config(path: Path | None) -> CoordinatorConfig:
    """Load the config; logs go to stderr at its level (stdout carries `--json` output)."""
    try:
        cfg = load_coordinator_config(path)
    except (SettingsError, AddressesFileError):
        raise
    except ValueError as exc:
        raise _bad_config(exc) from exc
    configure_logging(cfg.log_level, json=cfg.log_json, capture_warnings=False)
    return cfg


def _config_before_deploy(path: Path | None) -> tuple[CoordinatorConfig, Path]:
    """The config and where `chain deploy` writes, even if `addresses_file` does not exist yet.

    A configured but missing addresses file makes the config refuse to load (a coordinator
    must never sign under a guessed domain), yet writing that file is this command's job.
    """
    text, source = read_config_text(path, os.environ, CONFIG_ENV)
    configured = os.environ.get(f"{ENV_PREFIX}_ADDRESSES_FILE") or None
    if configured is None and text:
        try:
            raw = tomllib.loads(text).get("addresses_file")
        except tomllib.TOMLDecodeError:
            raw = None  # load_settings reports it below
        configured = str(raw) if raw else None
    env = {**os.environ, f"{ENV_PREFIX}_ADDRESSES_FILE": ""}  # empty: unset for this load
    try:
        cfg = load_settings(CoordinatorConfig, text, env, ENV_PREFIX, source=source)
    except SettingsError:
        raise
    except ValueError as exc:
        raise _bad_config(exc) from exc
    configure_logging(cfg.log_level, json=cfg.log_json, capture_warnings=False)
    target = Path(configured).expanduser() if configured else _addresses_path(cfg)
    return cfg, target


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _addresses_path(cfg: CoordinatorConfig) -> Path:
    return cfg.addresses_file if cfg.addresses_file is not None else cfg.data_dir / "addresses.json"


def _shared_chain(cfg: CoordinatorConfig, url: str | None) -> Chain:
    url = url or cfg.chain_url
    if url is None or url == "embedded":
        raise BadUsage(
            "this needs a shared chain; the embedded chain lives only inside one process",
            "set chain_url (e.g. anvil at http://127.0.0.1:8545) or pass --chain-url; "
            "see docs/SETTLEMENT.md",
        )
    return _connect(url)


def _connect(url: str | None) -> Chain:
    """`connect`; nothing answering is unavailable (exit 4, by the layer), a bad url usage.
    A JSON-RPC chain gets anvil's public dev keys only when it is a local dev chain (`chain
    fund`, `deploy` there); elsewhere only the keys a command adds (settlement, admin):
    `connect`'s default refused every command on a real network."""
    from sogni_chain import anvil_dev_keys, connect
    from sogni_protocol.settings import DEV_CHAIN_IDS

    try:
        if url is None or url == "embedded":
            return connect(url)
        chain = connect(url, keys=[])
    except ConnectionError:
        raise
    except ValueError as exc:
        raise BadUsage(str(exc), "use http(s)://host:port, or 'embedded'") from exc
    if chain.chain_id in DEV_CHAIN_IDS:
        for key in anvil_dev_keys():
            chain.add_key(key)
    return chain


def _deployment(cfg: CoordinatorConfig, chain: Chain) -> Deployment:
    from sogni_chain import Addresses, Deployment

    path = _addresses_path(cfg)
    addresses = Addresses.load(path, chain_id=chain.chain_id)  # AddressesFileError: exit 4
    # off a dev chain no key is loaded (`_connect`): each command's sends name their signer
    deployment = Deployment(chain, addresses, sender=None if chain.accounts else READ_ONLY_SENDER)
    if not deployment.is_deployed():
        raise Unavailable(
            f"no contracts at the addresses in {path} (was the chain reset?)",
            "deploy them again with `sogni-coordinator chain deploy --force`",
        )
    return deployment


def _settler(cfg: CoordinatorConfig, url: str | None, store: Store) -> Settler:
    from sogni_coordinator.disputes import DisputeBook, Restorations
    from sogni_coordinator.network_params import network_params_for
    from sogni_coordinator.settlement.epochs import Settler
    from sogni_coordinator.settlement.keys import settlement_sender
    from sogni_coordinator.settlement.rules import payout_rules
    from sogni_wallet.keystore import keystore_address, unlock_wallet

    chain = _shared_chain(cfg, url)
    deployment = _deployment(cfg, chain)
    offer_address = keystore_address(cfg.keystore, create_hint=_HINT)
    sender = settlement_sender(
        cfg,
        chain,
        offer_address,
        lambda: unlock_wallet(cfg.keystore, cfg.password_env, create_hint=_HINT).private_key,
    )
    address = sender if isinstance(sender, str) else sender.address
    if not deployment.distributor.has_role("SETTLEMENT_ROLE", address):
        raise Refused(
            f"the settlement key {address} lacks SETTLEMENT_ROLE on "
            f"{deployment.distributor.address}",
            f"grant it with the admin key: `sogni-coordinator chain grant-settler {address}`"
            " (or deploy with it as settler: `chain deploy --settler`)",
        )
    settler = Settler(
        store,
        deployment,
        sender=sender,
        rules=payout_rules(cfg),
        publish_dir=publish_dir(cfg),
        network_id=cfg.network_id,
        dispute_window=cfg.verification.dispute_window,
        params=network_params_for(chain, _addresses_path(cfg)),
        confirmations=cfg.settlement.confirmations_on(local=cfg.local),
    )
    if deployment.disputes is not None:  # won disputes are paid by whichever closer plans
        settler.restorations = Restorations(DisputeBook(cfg.database))
    return settler


# --- chain ---------------------------------------------------------------------------------
@chain_app.command("deploy")
def chain_deploy(
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Addresses file (default: addresses_file, else data_dir)."),
    ] = None,
    fund_distributor: Annotated[
        int, typer.Option(help="Whole SOGNI moved from the treasury to the distributor.")
    ] = 1_000_000,
    settler: Annotated[
        str | None,
        typer.Option(help="Address given SETTLEMENT_ROLE (default: this coordinator's key)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Deploy even if the file's contracts exist.")] = False,
    slasher: Annotated[
        str | None,
        typer.Option(
            help="Address given SLASHER_ROLE on Staking (default: the settlement key, "
            "settlement_keystore; never the offer key)."
        ),
    ] = None,
    claim_delay: Annotated[
        int | None,
        typer.Option(
            "--claim-delay",
            min=0,
            help="Seconds a posted root waits before claims use it "
            "(default: 0 on dev chains, 86400 elsewhere; at most 30 days).",
        ),
    ] = None,
    max_total_growth: Annotated[
        int | None,
        typer.Option(
            "--max-total-growth",
            min=0,
            help="Whole SOGNI one epoch's root may add to the total (default: 1000000000).",
        ),
    ] = None,
    disputes: Annotated[
        bool,
        typer.Option(
            "--disputes",
            help="Also deploy Disputes.sol: it alone may slash (after a dispute window); "
            "the offer key signs refusals (docs/GOVERNANCE.md, Disputes).",
        ),
    ] = False,
    governed: Annotated[
        bool,
        typer.Option(
            "--governed",
            help="Also deploy stakers' Governor, timelock and NetworkParameters and hand the "
            "contracts' admin to the timelock; writes <addresses>.governance.json "
            "(docs/GOVERNANCE.md).",
        ),
    ] = False,
) -> None:
    """Deploy token, staking, licence and distributor; write the addresses file.

    Dev account 0 (anvil's first key) is treasury and governance. The distributor's address is
    the EIP-712 verifying contract: point coordinators' and nodes' `addresses_file` at the file.
    """
    from sogni_chain import Addresses, Deployment, deploy_all
    from sogni_chain.disputes import Disputes, dispute_params
    from sogni_wallet.keystore import KeystoreError, keystore_address

    cfg, default_path = _config_before_deploy(config)
    chain = _connect(chain_url or cfg.chain_url)
    path = out if out is not None else default_path
    if path.is_file() and not force:
        try:
            existing = Addresses.load(path, chain_id=chain.chain_id)
        except ValueError:
            existing = None  # a file for another chain: replace it
        if existing is not None and Deployment(chain, existing).is_deployed():
            raise Refused(f"{path} already names deployed contracts", "--force deploys new ones")
    try:
        offer: str | None = keystore_address(cfg.keystore, create_hint=_HINT)
    except KeystoreError:
        offer = None
    if settler is None:
        settler = offer if offer is not None else chain.accounts[1].address
    if slasher is None and cfg.settlement_keystore is not None:
        try:
            slasher = keystore_address(cfg.settlement_keystore, create_hint=_SETTLEMENT_HINT)
        except KeystoreError:
            slasher = None  # not created yet: the admin grants the role later (SLASHING.md)
    if slasher is None and (offer is None or settler.lower() != offer.lower()):
        slasher = settler  # a settlement key named with --settler (or a dev account)
    if slasher is not None and offer is not None and slasher.lower() == offer.lower():
        raise Refused(
            f"{slasher} is the offer-signing key, which must never hold SLASHER_ROLE",
            "give the settlement key's address (--slasher)",
        )
    treasury = chain.accounts[0]
    addresses = deploy_all(
        chain,
        treasury,
        coordinator=settler,
        slasher=slasher,
        distributor_funding=fund_distributor * 10**18,
        path=path,
        claim_delay=claim_delay,
        max_total_growth=None if max_total_growth is None else max_total_growth * 10**18,
        disputes=dispute_params(chain.chain_id) if disputes else None,
    )
    if addresses.disputes is not None and offer is not None:  # it signs refusals
        Disputes(chain, addresses.disputes, treasury).grant_role("REPORTER_ROLE", offer)
    governance: str | None = None
    if governed:  # after the grants above: the deployer stops being admin here
        from sogni_chain.governance import deploy_governance, governance_path

        deploy_governance(chain, addresses, treasury, path=governance_path(path))
        governance = str(governance_path(path))
    for gas_user in dict.fromkeys(a for a in (settler, slasher) if a is not None):
        if chain.eth_balance(gas_user) < 10**18:  # gas for postRoot / slash
            chain.send_eth(gas_user, 10 * 10**18, sender=treasury)
    if chain.kind == "embedded":
        typer.echo(
            "warning: no --chain-url, so these contracts were deployed on an embedded chain "
            "inside this command and vanished when it exited: nothing can stake, settle or "
            "claim against them. To deploy contracts that stay, start a local chain "
            "(`anvil`) and run `sogni-coordinator chain deploy --chain-url "
            "http://127.0.0.1:8545` (or set chain_url in the config). The file written only "
            "matches another fresh embedded deployment made the same way.",
            err=True,
        )
    _print_json(
        {
            **addresses.__dict__,
            "settler": settler,
            "slasher": slasher,
            "file": str(path),
            "governance": governance,
        }
    )


@chain_app.command("fund")
def chain_fund(
    address: Annotated[str, typer.Argument(help="Account to fund (e.g. a node wallet).")],
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    eth: Annotated[str, typer.Option(help="ETH for gas (0: none).")] = "1",
    sogni: Annotated[str, typer.Option(help="SOGNI from the treasury (for staking).")] = "0",
) -> None:
    """Dev faucet: ETH and SOGNI from dev account 0 (the treasury of `chain deploy`)."""
    from eth_utils import is_address

    from sogni_chain import ChainRevert

    eth_wei = parse_amount(eth, unit="ETH", allow_zero=True)  # exit 2 before any chain call
    sogni_wei = parse_amount(sogni, unit="SOGNI", allow_zero=True)
    if not is_address(address):
        raise BadUsage(f"{address[:60]!r} is not an Ethereum address", "give a 0x... address")
    cfg = _config(config)
    chain = _shared_chain(cfg, chain_url)
    deployment = _deployment(cfg, chain)
    treasury = chain.accounts[0]
    try:
        if eth_wei > 0:
            chain.send_eth(address, eth_wei, sender=treasury)
        if sogni_wei > 0:
            deployment.token.transfer(address, sogni_wei, sender=treasury)
    except ChainRevert:
        raise
    except ValueError as exc:  # e.g. not an address
        raise BadUsage(str(exc), "give a 0x... address") from exc
    except Exception as exc:
        if not no_funds(exc):  # the treasury cannot pay what was asked and the gas
            raise
        balance = chain.eth_balance(treasury.address)
        raise too_little_eth(
            treasury.address, balance, sending=f"sending {eth} ETH", todo="ask for less --eth"
        ) from None
    _print_json(
        {
            "address": address,
            "eth": str(chain.eth_balance(address)),
            "sogni": str(deployment.token.balance_of(address)),
        }
    )


def _admin_chain(
    cfg: CoordinatorConfig, url: str | None, keystore: Path | None, password_env: str
) -> tuple[Chain, Any]:
    """The chain and the admin signer: dev account 0 (the treasury and admin of `chain
    deploy` on a dev chain), or the key in `keystore` (any chain, dev keys not loaded)."""
    if keystore is None:
        chain = _shared_chain(cfg, url)
        return chain, chain.accounts[0]
    from sogni_chain import connect
    from sogni_wallet.keystore import unlock_wallet

    url = url or cfg.chain_url
    if url is None or url == "embedded":
        _shared_chain(cfg, url)  # refuses in words
    if not keystore.expanduser().is_file():
        raise Unavailable(
            f"{keystore}: No such file or directory", "give --keystore the admin's keystore file"
        )
    wallet = unlock_wallet(keystore, password_env, create_hint="sogni-coordinator keys create")
    try:
        chain = connect(url, keys=[])
    except ConnectionError:
        raise
    except ValueError as exc:
        raise BadUsage(str(exc), "use http(s)://host:port") from exc
    return chain, chain.add_key(wallet.private_key)


@chain_app.command("grant-settler")
def chain_grant_settler(
    address: Annotated[
        str,
        typer.Argument(help="The settlement key's address (e.g. the new key after `keys rotate`)."),
    ],
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    keystore: Annotated[
        Path | None,
        typer.Option(
            "--keystore",
            help="The admin's keystore (default: dev account 0, the admin `chain deploy` "
            "makes on a dev chain).",
        ),
    ] = None,
    password_env: Annotated[
        str, typer.Option(help="Env var holding the admin keystore's password (else prompted).")
    ] = "SOGNI_ADMIN_PASSWORD",
) -> None:
    """Give ADDRESS SETTLEMENT_ROLE on the RewardDistributor (it may post epoch roots),
    sent from the distributor's admin: what `epoch close` needs after `keys rotate` on a
    network where the offer key settles."""
    from eth_utils import is_address, to_checksum_address

    if not is_address(address):
        raise BadUsage(f"{address[:60]!r} is not an Ethereum address", "give a 0x... address")
    address = to_checksum_address(address)
    cfg = _config(config)
    chain, admin = _admin_chain(cfg, chain_url, keystore, password_env)
    distributor = _deployment(cfg, chain).distributor
    if not distributor.has_role("DEFAULT_ADMIN_ROLE", admin.address):
        raise Refused(
            f"{admin.address} is not the admin of the RewardDistributor {distributor.address} "
            f"(its admin is {distributor.default_admin()})",
            "run it with the admin's key (--keystore); on a governed network a governance "
            "proposal grants the role",
        )
    granted = distributor.has_role("SETTLEMENT_ROLE", address)
    tx: str | None = None
    if not granted:
        try:
            tx = distributor.grant_role("SETTLEMENT_ROLE", address, sender=admin).hash
        except Exception as exc:
            if not no_funds(exc):
                raise
            raise too_little_eth(
                admin.address, chain.eth_balance(admin.address), sending="the grant"
            ) from None
    eth = chain.eth_balance(address)
    _print_json(
        {
            "address": address,
            "role": "SETTLEMENT_ROLE",
            "distributor": distributor.address,
            "alreadyHeld": granted,
            "tx": tx,
            "eth": str(eth),
        }
    )
    if eth == 0:
        typer.echo(
            f"note: {address} holds no ETH to pay for posting roots: "
            f"`sogni-coordinator chain fund {address}` on a local chain",
            err=True,
        )


# --- epoch ---------------------------------------------------------------------------------
@epoch_app.command("close")
def epoch_close(
    config: ConfigOpt = None, chain_url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Settle every receipt not yet in an epoch and post the root (idempotent, resumable)."""
    from sogni_coordinator.store import Store

    cfg = _config(config)
    store = Store(cfg.database)
    try:
        result = _settler(cfg, chain_url, store).close_epoch()  # SettlementError: exit 3
    finally:
        store.close()
    if result is None:
        if as_json:
            _print_json(None)
        else:
            typer.echo("nothing to settle: no new payable receipts")
        return
    if as_json:
        _print_json(result.as_json())
        return
    typer.echo(
        f"epoch {result.epoch}{' (resumed)' if result.resumed else ''}: "
        f"{result.paid_receipts} receipts paid, {result.refused_receipts} refused, "
        f"{len(result.payouts)} accounts, total {result.total}, root 0x{result.root.hex()}"
    )
    typer.echo(f"published {result.epoch_file} and {result.receipts_file}")
    if result.unsigned_tx is not None:
        typer.echo(
            f"the root awaits the offline settlement key: sign {result.unsigned_tx} with "
            "`sogni-coordinator epoch sign FILE --keystore KEY` on its machine, then "
            "`sogni-coordinator epoch submit SIGNED`"
        )


@epoch_app.command("sign")
def epoch_sign(
    unsigned: Annotated[Path, typer.Argument(help="The unsigned postRoot file.", exists=True)],
    keystore: Annotated[Path, typer.Option(help="The settlement key's keystore.", exists=True)],
    password_env: Annotated[
        str, typer.Option(help="Env var holding its password (else prompted).")
    ] = "SOGNI_SETTLEMENT_PASSWORD",
    out: Annotated[Path | None, typer.Option(help="Default: FILE with .signed.json.")] = None,
    distributor: Annotated[
        str | None,
        typer.Option(help="The RewardDistributor's address: refuse a file sent elsewhere."),
    ] = None,
) -> None:
    """Sign an epoch's postRoot with the settlement key, offline (no chain, no config).

    What is signed is decoded from the transaction and checked against the file's labels
    (and `--distributor`) first; the line printed shows what was decoded, not the labels."""
    from sogni_coordinator.settlement.epochs import SettlementError, sign_offline
    from sogni_wallet.keystore import load_wallet, password_from_env_or_prompt

    try:
        document = json.loads(unsigned.read_text())
    except (OSError, ValueError) as exc:
        raise BadUsage(
            f"cannot read {unsigned}: {exc}", "pass the file epoch close wrote"
        ) from None
    password = password_from_env_or_prompt(password_env)
    wallet = load_wallet(
        keystore, password, create_hint="sogni-coordinator keys create --settlement"
    )
    try:
        signed = sign_offline(document, wallet.private_key, distributor=distributor)
    except (SettlementError, KeyError, TypeError, ValueError) as exc:
        raise Refused(
            f"not signed: {exc}", "sign the file `epoch close` wrote, with its key"
        ) from None
    target = out or unsigned.with_suffix(".signed.json")
    target.write_text(json.dumps(signed, indent=2))
    typer.echo(
        f"signed epoch {signed['epoch']} root {signed['root']} (total {signed['total']}, "
        f"receiptsHash {signed['receiptsHash']}) to distributor {signed['to']} on chain "
        f"{signed['chainId']}, at most {signed['maxCostWei']} wei of gas, from "
        f"{signed['from']}: {target}"
    )


@epoch_app.command("submit")
def epoch_submit(
    signed: Annotated[Path, typer.Argument(help="The signed postRoot file.", exists=True)],
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Broadcast a planned epoch's root signed offline, and record it as posted."""
    from sogni_coordinator.settlement.epochs import Settler
    from sogni_coordinator.store import Store

    try:
        document = json.loads(signed.read_text())
    except (OSError, ValueError) as exc:
        raise BadUsage(f"cannot read {signed}: {exc}", "pass the file epoch sign wrote") from None
    from sogni_coordinator.settlement.rules import payout_rules

    cfg = _config(config)
    chain = _shared_chain(cfg, chain_url)
    store = Store(cfg.database)
    try:
        settler = Settler(
            store,
            _deployment(cfg, chain),
            sender=str(document.get("from", "")),
            rules=payout_rules(cfg),
            publish_dir=publish_dir(cfg),
            network_id=cfg.network_id,
            dispute_window=cfg.verification.dispute_window,
        )
        result = settler.submit_signed(document)  # SettlementError: exit 3
    finally:
        store.close()
    if as_json:
        _print_json(result.as_json())
        return
    typer.echo(f"epoch {result.epoch} posted: root 0x{result.root.hex()} tx {result.tx_hash}")


@epoch_app.command("show")
def epoch_show(
    epoch: Annotated[int, typer.Argument(help="Epoch number.", min=1)],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """An epoch's root, receiptsHash and every claim with its Merkle proof."""
    from sogni_coordinator.settlement.epochs import epoch_claims
    from sogni_coordinator.store import Store

    cfg = _config(config)
    store = Store(cfg.database)
    try:
        record = store.epoch_record(epoch)
    finally:
        store.close()
    if record is None:
        raise BadUsage(f"no epoch {epoch} in {cfg.database}", "see `sogni-coordinator epoch list`")
    data = epoch_claims(record)
    if as_json:
        _print_json(data)
        return
    for key in ("epoch", "state", "root", "receiptsHash", "total", "txHash", "receiptsFile"):
        typer.echo(f"{key + ':':<14}{data[key]}")
    for c in data["claims"]:
        typer.echo(f"  {c['account']}  {c['cumulativeAmount']}")


@epoch_app.command("list")
def epoch_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every epoch with its state, total and receipt counts."""
    from sogni_coordinator.store import Store

    cfg = _config(config)
    store = Store(cfg.database)
    try:
        rows = store.epoch_summaries()
    finally:
        store.close()
    items = [
        {"epoch": e, "state": s, "total": str(t), "paidReceipts": p, "refusedReceipts": r}
        for e, s, t, p, r in rows
    ]
    if as_json:
        _print_json(items)
        return
    for it in items:
        typer.echo(
            f"{it['epoch']:>6}  {it['state']:<8} {it['paidReceipts']:>7} paid "
            f"{it['refusedReceipts']:>5} refused  total {it['total']}"
        )


@epoch_app.command("watch")
def epoch_watch(
    config: ConfigOpt = None,
    chain_url: UrlOpt = None,
    every: Annotated[
        float | None, typer.Option(help="Seconds between closes (default: epoch_seconds).")
    ] = None,
) -> None:
    """Close an epoch every `epoch_seconds` until SIGINT/SIGTERM (the settlement timer)."""
    import trio

    from sogni_coordinator.settlement.timer import run_epoch_timer
    from sogni_coordinator.store import Store

    cfg = _config(config)
    store = Store(cfg.database)
    settler = _settler(cfg, chain_url, store)
    period = every if every is not None else cfg.settlement.epoch_seconds

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_epoch_timer, settler, period)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()


from sogni_coordinator.audit_cli import audit as _audit  # noqa: E402

epoch_app.command("audit")(_audit)
