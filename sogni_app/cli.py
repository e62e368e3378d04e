"""`sogni`: render images on the Supernet, claim the Daily Boost and read balances.

Paying commands sign with the payer's wallet, an encrypted keystore v3 file (`--keystore`,
password from `--password-env` or a prompt), for the coordinator's EIP-712 domain
(`--chain-id`, `--verifying-contract`) and network (`--network-id`: render authorizations and
Daily Boost claims name it, so they are good on that network only); for the local
coordinator all three are read from the address file it writes.

Errors are one line with the exit code of their class (`sogni_protocol.cli_errors`,
docs/CLI.md): 2 usage, 3 refused (by the coordinator or the keystore), 4 unavailable (nothing
listening, no keystore). Exit 1 means the command ran with a negative result: some images
failed, or today's Daily Boost was already claimed.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sogni_app.api import (
    DEFAULT_DOMAIN,
    DEFAULT_NETWORK_ID,
    AccountRefused,
    CoordinatorLost,
    RenderedImage,
    RenderRefused,
    RenderResult,
    ResumeTicket,
    balance_sync,
    claim_daily_boost_sync,
    collect_sync,
    referral_sync,
    render_request,
    render_sync,
    report_sync,
    save_image,
    save_ticket,
    valid_network_id,
)
from sogni_app.option_names import in_option_terms
from sogni_net import peer_info
from sogni_protocol.cli_errors import (
    BadUsage,
    CliGroup,
    DebugOption,
    Refused,
    Unavailable,
    interrupted,
    register,
)
from sogni_protocol.cli_errors import main as run_cli
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import EMBEDDED_MODEL_ID
from sogni_protocol.logs import configure_logging
from sogni_protocol.messages import Balances, ReferralReport
from sogni_wallet.keystore import (
    Wallet,
    create_keystore,
    keystore_address,
    password_from_env_or_prompt,
    unlock_wallet,
)

app = typer.Typer(
    help="Render images on the Sogni Supernet.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a key in a local must never reach a terminal
    cls=CliGroup,
)
keys_app = typer.Typer(help="The payer wallet that signs requests.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DEFAULT_MODEL = EMBEDDED_MODEL_ID
DEFAULT_COORDINATOR_FILE = Path("~/.sogni/coordinator/coordinator.json")
DEFAULT_KEYSTORE = Path("~/.sogni/client/payer.json")
_KEYS_HINT = "sogni keys create"
MODEL_GUIDANCE: dict[str, float] = {DEFAULT_MODEL: 5.0, "sogni-tiny-sd": 5.0}
"""The guidance of the models a node ships, as their specs have it (sogni_node.models:
SHAPES_DEFAULT_GUIDANCE, TINY_DEFAULT_GUIDANCE; a test keeps them equal)."""
OTHER_MODEL_GUIDANCE = 7.5
"""Any other model: what a node's model spec and a `RenderRequest` default to."""
MICRO = 1_000_000

_T = TypeVar("_T")

CoordinatorOpt = Annotated[str | None, typer.Option(help="Coordinator multiaddr.")]
CoordinatorsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--coordinator",
        help="Coordinator multiaddr; repeat it for other coordinators of the same network, "
        "tried in turn if one cannot be reached.",
    ),
]
KeystoreOpt = Annotated[
    Path,
    typer.Option("--keystore", envvar="SOGNI_KEYSTORE", help="Payer wallet: a keystore v3 file."),
]
PasswordEnvOpt = Annotated[
    str,
    typer.Option("--password-env", help="Env var holding the keystore password (else a prompt)."),
]
ChainIdOpt = Annotated[
    int | None,
    typer.Option(
        "--chain-id",
        envvar="SOGNI_CHAIN_ID",
        min=1,
        help="Coordinator's chain id (default: the local coordinator's, else the embedded chain).",
    ),
]
ContractOpt = Annotated[
    str | None,
    typer.Option(
        "--verifying-contract",
        envvar="SOGNI_VERIFYING_CONTRACT",
        help="Coordinator's reward distributor address (EIP-712 verifying contract).",
    ),
]
NetworkIdOpt = Annotated[
    str | None,
    typer.Option(
        "--network-id",
        envvar="SOGNI_NETWORK_ID",
        help=(
            "Coordinator's network (the ledger its coordinators share), named in what the payer "
            f"signs (default: the local coordinator's, else {DEFAULT_NETWORK_ID!r})."
        ),
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ReconnectOpt = Annotated[
    float,
    typer.Option(
        "--reconnect-for",
        min=0,
        help="Seconds to keep trying to reach a lost coordinator before giving up.",
    ),
]

register(RenderRefused, Refused, None)  # the coordinator's reason says what it needs
_SIGN_FOR_IT = (
    "sign for the coordinator's network and domain: --network-id, --chain-id, --verifying-contract"
)
register(CoordinatorLost, Unavailable, "collect the rest later with `sogni collect`")


def default_guidance(model_id: str) -> float:
    """The guidance `sogni render` asks for when `--guidance` is not given: the model's."""
    return MODEL_GUIDANCE.get(model_id, OTHER_MODEL_GUIDANCE)


def _damaged(path: Path, what: str) -> Refused:
    return Refused(
        f"{path} is damaged: {what}",
        "restart the local coordinator (it writes the file anew), or pass --coordinator",
    )


def _local_coordinator() -> dict[str, Any] | None:
    """What the local coordinator wrote in its address file (None: no file). A damaged
    file is one line naming it (`Refused`), never a KeyError or a JSON traceback."""
    info = DEFAULT_COORDINATOR_FILE.expanduser()
    if not info.exists():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _damaged(info, "it is not JSON") from None
    if not isinstance(data, dict):
        raise _damaged(info, "it is not a JSON object")
    return data


def _checked_local(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`data` once the values `keys` name have the shape the coordinator writes."""
    info = DEFAULT_COORDINATOR_FILE.expanduser()
    kinds: dict[str, type] = {"peerId": str, "chainId": int, "verifyingContract": str}
    for key in keys:
        if key == "addrs":
            addrs = data.get("addrs")
            if (
                not isinstance(addrs, list)
                or not addrs
                or not all(isinstance(a, str) for a in addrs)
            ):
                raise _damaged(info, "it lists no address (`addrs`)")
            continue
        value, kind = data.get(key), kinds.get(key, str)
        if key in data and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _damaged(info, f"its `{key}` is not a {'number' if kind is int else 'string'}")
    return data


def resolve_coordinator(explicit: str | None) -> str:
    """--coordinator, then $SOGNI_COORDINATOR_ADDR, then the local coordinator's address file."""
    if explicit:
        return explicit
    if env := os.environ.get("SOGNI_COORDINATOR_ADDR"):
        return env
    local = _local_coordinator()
    if local is not None:
        return str(_checked_local(local, "addrs")["addrs"][0])
    raise typer.BadParameter(
        "no coordinator: pass --coordinator /ip4/.../p2p/..., set SOGNI_COORDINATOR_ADDR, "
        f"or run a local coordinator (it writes {DEFAULT_COORDINATOR_FILE})",
        param_hint="--coordinator",
    )


def _local_coordinator_at(addr: str) -> dict[str, Any]:
    """What the local coordinator wrote in its address file, if `addr` is that coordinator
    (else nothing: the file is not about it)."""
    try:
        local = _local_coordinator()
    except Refused:  # not JSON: it cannot say it is about `addr`
        return {}
    if local is not None and addr.endswith(f"/p2p/{local.get('peerId')}"):
        return _checked_local(local, "chainId", "verifyingContract", "networkId")
    return {}


def resolve_domain(addr: str, chain_id: int | None, contract: str | None) -> Domain:
    """The EIP-712 domain payer messages are signed for: the options, else what the local
    coordinator wrote in its address file (when `addr` is that coordinator), else the
    defaults of a local coordinator."""
    from eth_utils import is_address

    if contract is not None and not is_address(contract):
        raise typer.BadParameter(
            f"{contract!r} is not an Ethereum address", param_hint="--verifying-contract"
        )
    local = _local_coordinator_at(addr)
    chain_id = chain_id or local.get("chainId")
    contract = contract or local.get("verifyingContract")
    return Domain(
        int(chain_id or DEFAULT_DOMAIN.chain_id),
        str(contract or DEFAULT_DOMAIN.verifying_contract),
    )


def resolve_network_id(addr: str, network_id: str | None) -> str:
    """The network render authorizations and boost claims are signed for: the option, else
    what the local coordinator wrote in its address file (when `addr` is that coordinator),
    else a local network's (`DEFAULT_NETWORK_ID`)."""
    chosen = network_id or _local_coordinator_at(addr).get("networkId") or DEFAULT_NETWORK_ID
    try:
        return valid_network_id(str(chosen))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--network-id") from None


def _wallet(keystore: Path, password_env: str) -> Wallet:
    return unlock_wallet(keystore, password_env, create_hint=_KEYS_HINT)


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro(b: Balances) -> dict[str, int]:
    return {"sparkFree": b.spark_free, "sparkPaid": b.spark_paid, "sogni": b.sogni}


def _refused(exc: AccountRefused, as_json: bool) -> Exception:
    """Already claimed today is a result (exit 1); any other refusal is an error (exit 3)."""
    if as_json:
        typer.echo(json.dumps({"refused": True, "code": exc.code, "reason": exc.reason}))
    if exc.code == "already_claimed":
        if not as_json:
            typer.echo(f"refused: {exc}", err=True)
        return typer.Exit(1)
    todo = _SIGN_FOR_IT if exc.code == "unauthorized" else "see the reason"
    return Refused(f"the coordinator refused: {exc}", todo)


@app.callback()
def _main(debug: DebugOption = False) -> None:
    """Sub-commands below."""
    configure_logging("warning")  # to stderr: stdout carries the command's output (--json)


@app.command("render")
def render_cmd(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    n: Annotated[int, typer.Option("-n", "--number", help="Number of images (1-512).")] = 1,
    model: Annotated[str, typer.Option("--model", help="Model id.")] = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 8,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance scale (default: the model's own, "
            f"{MODEL_GUIDANCE[DEFAULT_MODEL]} for {DEFAULT_MODEL}; else {OTHER_MODEL_GUIDANCE}).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed+i.")] = 0,
    width: Annotated[int, typer.Option(help="Width in pixels.")] = 64,
    height: Annotated[int, typer.Option(help="Height in pixels.")] = 64,
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    network: Annotated[str, typer.Option(help="fast or relaxed.")] = "fast",
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            metavar="ID[:STRENGTH]",
            help="LoRA to apply (repeatable, in order, at most 8; strength default 1.0).",
        ),
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="Image format: png, jpeg or webp.")
    ] = "png",
    token_type: Annotated[str, typer.Option(help="Pay in spark or sogni.")] = "spark",
    disable_safety: Annotated[
        bool,
        typer.Option(
            "--disable-safety",
            help="Ask for adult content (delivered unblurred only where the operator allows it).",
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="Folder for images and receipts.jsonl.")] = Path("out"),
    coordinator: CoordinatorsOpt = None,
    keystore: Annotated[
        Path | None,
        typer.Option(
            "--keystore",
            envvar="SOGNI_KEYSTORE",
            help="Payer wallet (keystore v3); without one the request names no payer.",
        ),
    ] = None,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    network_id: NetworkIdOpt = None,
    reconnect_for: ReconnectOpt = 120.0,
) -> None:
    """Render PROMPT and save the images with their signed receipts.

    The request id and its resume token go to OUT/request.json (0600): if the coordinator
    is lost for longer than --reconnect-for, `sogni collect ID --out OUT` fetches the rest."""
    try:
        request = render_request(
            prompt,
            model_id=model,
            negative_prompt=negative,
            steps=steps,
            guidance=default_guidance(model) if guidance is None else guidance,
            seed=seed,
            width=width,
            height=height,
            number_of_images=n,
            loras=lora or [],
            output_format=output_format,  # type: ignore[arg-type]  # validated inside
            network=network,  # type: ignore[arg-type]
            token_type=token_type,  # type: ignore[arg-type]
            disable_safety=disable_safety,
        )
    except ValueError as exc:  # in the options' names, not the wire fields'
        raise BadUsage(in_option_terms(str(exc)), "see `sogni render --help`") from None
    if out.exists() and not out.is_dir():  # before anything is sent (and paid for)
        raise BadUsage(f"--out {out} is a file, not a folder", "give a folder for the images")
    addr = resolve_coordinator(coordinator[0] if coordinator else None)  # after the inputs
    others = [c for c in coordinator or [] if c != addr]
    for given in (addr, *others):  # a malformed one is a usage error, not "unavailable"
        peer_info(given)
    paying: dict[str, Any] = {}
    if keystore is not None:
        paying = {  # the options are checked before the wallet asks for its password
            "domain": resolve_domain(addr, chain_id, verifying_contract),
            "network_id": resolve_network_id(addr, network_id),
            "payer_key": _wallet(keystore, password_env).private_key,
        }
    tickets: list[ResumeTicket] = []

    def on_accepted(ticket: ResumeTicket) -> None:
        tickets.append(ticket)
        path = save_ticket(ticket, out)
        typer.echo(f"request {ticket.request_id.hex()} accepted (resume ticket: {path})", err=True)

    try:
        with _ProgressBar("rendering", n * steps) as bar:

            def on_image(image: RenderedImage) -> None:
                save_image(tickets[0].request_id, image, out)  # saved before it is acknowledged
                bar.image(image.index, steps)

            try:
                result = render_sync(
                    [addr, *others],
                    request,
                    on_progress=bar.progress,
                    on_image=on_image,
                    on_accepted=on_accepted,
                    reconnect_for=reconnect_for,
                    **paying,
                )
            except CoordinatorLost as exc:
                raise _lost(exc, out) from None
            except RenderRefused as exc:
                if paying and exc.code == "unauthorized":  # signed for another network/domain
                    raise Refused(f"the coordinator refused: {exc}", _SIGN_FOR_IT) from None
                raise
    except BaseException as exc:  # Ctrl-C: the request was accepted and keeps running
        if tickets and interrupted(exc):
            rid = tickets[0].request_id.hex()
            typer.echo(
                f"request {rid} keeps running on the coordinator: fetch its images with "
                f"`sogni collect {rid} --out {out}`",
                err=True,
            )
        raise
    _report(result, out, token_type, images=n, steps=steps)


@app.command("collect")
def collect_cmd(
    request_id: Annotated[str, typer.Argument(help="The request id `sogni render` printed.")],
    token: Annotated[
        str | None,
        typer.Option(help="Its resume token (default: from OUT/request.json)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for images and receipts.jsonl.")] = Path("out"),
    coordinator: CoordinatorsOpt = None,
    reconnect_for: ReconnectOpt = 10.0,
) -> None:
    """Fetch the images of a request that `sogni render` left (it stopped, or lost the
    coordinator): those not yet saved, and the rest once rendered."""
    ticket = _ticket(request_id, token, out, coordinator)
    with _ProgressBar("collecting", 0) as bar:

        def on_image(image: RenderedImage) -> None:
            save_image(ticket.request_id, image, out)
            bar.image(image.index, 0)

        try:
            result = collect_sync(ticket, on_image=on_image, reconnect_for=reconnect_for)
        except CoordinatorLost as exc:
            raise _lost(exc, out) from None
    _report(result, out, None)


def _ticket(
    request_id: str, token: str | None, out: Path, coordinator: list[str] | None
) -> ResumeTicket:
    """The ticket from the options, completed from `<out>/request.json` when it is this
    request's."""
    try:
        rid = bytes.fromhex(request_id.removeprefix("0x"))
        if len(rid) != 32:
            raise ValueError("not 32 bytes")
    except ValueError as exc:
        raise BadUsage(f"request id {request_id!r} is not 64 hex digits ({exc})") from None
    secret: bytes | None = None
    if token is not None:
        try:
            secret = bytes.fromhex(token.removeprefix("0x"))
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise BadUsage("--token must be 64 hex digits")
    for given in coordinator or []:
        peer_info(given)  # a usage error now, not "unavailable" after the dial
    saved: ResumeTicket | None = None
    path = out / "request.json"
    if path.exists():
        try:
            saved = ResumeTicket.from_json(path.read_text(encoding="utf-8"))
        except ValueError:  # its own words are Python's ("'list' object has no ...")
            damaged = f"{path} is damaged: it is not the request ticket `sogni render` writes"
            if secret is None:
                raise BadUsage(
                    damaged, "pass --token (and --coordinator), or --out another folder"
                ) from None
            if not coordinator:  # the file would have named the coordinator
                raise BadUsage(damaged, "pass --coordinator too, or move the file away") from None
        if saved is not None and saved.request_id != rid:
            saved = None
    if secret is None:
        if saved is None:
            raise BadUsage(
                f"no resume token for request {request_id[:12]}...",
                "pass --token, or --out the folder whose request.json names it",
            )
        secret = saved.token
    if coordinator:  # named here: these, in this order
        return ResumeTicket(coordinator[0], rid, secret, tuple(coordinator[1:]))
    if saved is not None:
        return ResumeTicket(saved.coordinator, rid, secret, saved.alternates)
    return ResumeTicket(resolve_coordinator(None), rid, secret)


def _lost(exc: CoordinatorLost, out: Path) -> Unavailable:
    rid = exc.ticket.request_id.hex()
    return Unavailable(str(exc), f"collect it later: sogni collect {rid} --out {out}")


def charged_micro(result: RenderResult, images: int, steps: int) -> int:
    """What the request was charged, in micro units, as the coordinator settles it: each
    delivered image's share of the reserved `cost_micro` (pro rata of its steps for a
    cancelled one, rounded down); failed images and the rest of the reservation are
    refunded. `images` and `steps` are the request's."""
    if not result.cost_micro or images < 1 or steps < 1:
        return 0
    per_image = result.cost_micro // images  # the quote's total is exactly images x per_image
    return sum(
        per_image * max(0, min(im.receipt.steps_done, steps)) // steps for im in result.images
    )


def cost_summary(reserved_micro: int, charged: int, unit: str) -> str:
    """ "0.019352 spark", or what was charged of what was reserved when part was refunded."""
    if charged >= reserved_micro:
        return f"{charged / MICRO:.6f} {unit}"
    if charged == 0:
        return f"nothing ({reserved_micro / MICRO:.6f} {unit} reserved, all refunded)"
    refunded = reserved_micro - charged
    return (
        f"{charged / MICRO:.6f} {unit} ({reserved_micro / MICRO:.6f} reserved, "
        f"{refunded / MICRO:.6f} refunded)"
    )


def _report(
    result: RenderResult, out: Path, token_type: str | None, *, images: int = 0, steps: int = 0
) -> None:
    """The summary line: what was charged (of the reservation) when the request is known;
    exit 1 when some images failed."""
    cost = ""
    if result.cost_micro and token_type is not None:
        charged = charged_micro(result, images, steps)
        cost = f" for {cost_summary(result.cost_micro, charged, token_type)}"
    typer.echo(f"{len(result.images)} images and receipts in {out}/ (receipts.jsonl){cost}")
    for index, reason in result.failed:
        typer.echo(f"image {index} failed: {reason}", err=True)
    if result.failed:
        raise typer.Exit(1)


class _ProgressBar:
    """Steps done over all images (rich; to stderr)."""

    def __init__(self, label: str, total: int) -> None:
        self._bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._task = self._bar.add_task(label, total=total or None)
        self._steps: dict[int, int] = {}

    def __enter__(self) -> _ProgressBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def progress(self, index: int, step: int, _steps: int) -> None:
        self._steps[index] = step
        self._bar.update(self._task, completed=sum(self._steps.values()))

    def image(self, index: int, steps: int) -> None:
        self._steps[index] = steps or 1
        self._bar.update(self._task, completed=sum(self._steps.values()))


def _account_call(
    call: Callable[..., _T],
    coordinator: str | None,
    keystore: Path,
    password_env: str,
    chain_id: int | None,
    verifying_contract: str | None,
    as_json: bool,
    *,
    network_id: str | None = None,
    names_network: bool = False,
) -> _T:
    """Run one signed account exchange (`boost`, `balance`) with the payer's wallet; with
    `names_network` the signed message names the coordinator's network (a boost claim)."""
    addr = resolve_coordinator(coordinator)
    domain = resolve_domain(addr, chain_id, verifying_contract)
    signing: dict[str, Any] = {"domain": domain}
    if names_network:
        signing["network_id"] = resolve_network_id(addr, network_id)
    peer_info(addr)  # a malformed address is a usage error before the wallet is unlocked
    wallet = _wallet(keystore, password_env)
    try:
        return call(addr, wallet.private_key, **signing)
    except AccountRefused as exc:
        raise _refused(exc, as_json) from None


@app.command("boost")
def boost_cmd(
    coordinator: CoordinatorOpt = None,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    network_id: NetworkIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Claim today's free Daily Boost Spark (once per UTC day, across the coordinator's
    network). Exit 1 if already claimed."""
    granted = _account_call(
        claim_daily_boost_sync,
        coordinator,
        keystore,
        password_env,
        chain_id,
        verifying_contract,
        as_json,
        network_id=network_id,
        names_network=True,
    )
    if as_json:
        out = {
            "payer": granted.payer,
            "day": granted.day,
            "amountMicro": granted.amount_micro,
            "balancesMicro": _micro(granted.balances),
            "nextClaimAt": _iso(granted.next_claim_at),
        }
        typer.echo(json.dumps(out))
        return
    b = granted.balances
    typer.echo(
        f"Daily Boost for {granted.day} (UTC): +{granted.amount_micro / MICRO:.6f} free Spark "
        f"to {granted.payer}; now {b.spark_free / MICRO:.6f} free + "
        f"{b.spark_paid / MICRO:.6f} paid Spark, {b.sogni / MICRO:.6f} SOGNI; "
        f"next claim at {_iso(granted.next_claim_at)}"
    )


@app.command("balance")
def balance_cmd(
    coordinator: CoordinatorOpt = None,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your Spark and SOGNI here, what running requests hold, and the next Daily Boost."""
    report = _account_call(
        balance_sync, coordinator, keystore, password_env, chain_id, verifying_contract, as_json
    )
    if as_json:
        out = {
            "payer": report.payer,
            "balancesMicro": _micro(report.balances),
            "reservedMicro": _micro(report.reserved),
            "boostAvailable": report.boost_available,
            "nextBoostAt": _iso(report.next_boost_at),
        }
        typer.echo(json.dumps(out))
        return
    b, r = report.balances, report.reserved
    boost = "available now" if report.boost_available else f"next at {_iso(report.next_boost_at)}"
    typer.echo(
        f"{report.payer}\n"
        f"  Spark (free)  {b.spark_free / MICRO:>16.6f}\n"
        f"  Spark (paid)  {b.spark_paid / MICRO:>16.6f}\n"
        f"  SOGNI         {b.sogni / MICRO:>16.6f}\n"
        f"  reserved      {(r.spark_free + r.spark_paid) / MICRO:>16.6f} Spark, "
        f"{r.sogni / MICRO:.6f} SOGNI\n"
        f"  Daily Boost   {boost}"
    )


REPORT_REASONS = ("minor", "sexual", "violence", "hate", "other")


@app.command("report")
def report_cmd(
    job: Annotated[str, typer.Argument(help="The request id `sogni render` printed (hex).")],
    reason: Annotated[str, typer.Option("--reason", help=f"One of: {', '.join(REPORT_REASONS)}.")],
    image: Annotated[
        int | None, typer.Option("--image", min=0, help="One image's index (default: all).")
    ] = None,
    note: Annotated[
        str, typer.Option("--note", help="For the operator only (at most 1000 characters).")
    ] = "",
    coordinator: CoordinatorOpt = None,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report a request you paid for to the coordinator's operator (docs/SAFETY.md)."""
    if reason not in REPORT_REASONS:
        raise BadUsage(f"--reason must be one of {', '.join(REPORT_REASONS)}", None)
    text = job[2:] if job[:2].lower() == "0x" else job
    try:
        request_id = bytes.fromhex(text)
    except ValueError:
        request_id = b""
    if len(request_id) != 32:
        raise BadUsage("JOB is a request id: 64 hex digits", "see request.json of the render")
    if len(note) > 1000:
        raise BadUsage("--note is at most 1000 characters", None)

    def call(addr: str, key: bytes, **signing: Any) -> Any:
        index = -1 if image is None else image
        why: Any = reason  # one of REPORT_REASONS, checked above
        return report_sync(addr, key, request_id, why, image_index=index, note=note, **signing)

    filed = _account_call(
        call, coordinator, keystore, password_env, chain_id, verifying_contract, as_json
    )
    if as_json:
        typer.echo(json.dumps({"reportId": filed.report_id}))
        return
    typer.echo(f"report {filed.report_id} filed: the coordinator's operator will review it")


referral_app = typer.Typer(no_args_is_help=True, help="Your referral code; use someone's.")
app.add_typer(referral_app, name="referral")


def _referral_out(got: ReferralReport, as_json: bool) -> None:
    if as_json:
        out = {"payer": got.payer, "code": got.code, "referredBy": got.referred_by}
        typer.echo(json.dumps(out))
        return
    by = f"; referred by {got.referred_by}" if got.referred_by else ""
    typer.echo(f"referral code of {got.payer}: {got.code}{by}")


@referral_app.command("code")
def referral_code_cmd(
    coordinator: CoordinatorOpt = None,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print your referral code (purchases of those who use it score for you)."""
    got = _account_call(
        referral_sync, coordinator, keystore, password_env, chain_id, verifying_contract, as_json
    )
    _referral_out(got, as_json)


@referral_app.command("use")
def referral_use_cmd(
    code: Annotated[str, typer.Argument(help="The referrer's code.")],
    coordinator: CoordinatorOpt = None,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    chain_id: ChainIdOpt = None,
    verifying_contract: ContractOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record who referred you (once; not yourself, no cycles)."""
    if not 1 <= len(code.strip()) <= 40:
        raise BadUsage("CODE is a referral code of 10 letters and digits", None)
    got = _account_call(
        functools.partial(referral_sync, code=code.strip()),
        coordinator,
        keystore,
        password_env,
        chain_id,
        verifying_contract,
        as_json,
    )
    _referral_out(got, as_json)


@keys_app.command("create")
def keys_create(
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_PASSWORD",
    force: Annotated[bool, typer.Option(help="Replace an existing key (kept as .bak).")] = False,
) -> None:
    """Create an encrypted payer wallet (password from the env var or a prompt)."""
    password = password_from_env_or_prompt(password_env, confirm=True)
    address = create_keystore(keystore, password, force=force, create_hint=_KEYS_HINT)
    typer.echo(f"payer {address} in {keystore}")


@keys_app.command("show")
def keys_show(keystore: KeystoreOpt = DEFAULT_KEYSTORE) -> None:
    """Print the payer address (what operators credit with `sogni-coordinator credit`)."""
    address = keystore_address(keystore, create_hint=_KEYS_HINT)
    typer.echo(json.dumps({"address": address, "keystore": str(keystore)}))


def _in_option_terms(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with its input errors naming the options typed, not the wire fields."""

    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except BadUsage as exc:
            raise BadUsage(in_option_terms(exc.what), exc.todo) from None

    return wrapper


app.command("quote")(_in_option_terms(__import__("sogni_app.quote").quote.quote_cmd))
app.add_typer(__import__("sogni_app.governance_cli").governance_cli.gov_app, name="gov")
app.add_typer(__import__("sogni_app.dispute_cli").dispute_cli.dispute_app, name="dispute")


def main() -> None:
    """The `sogni` entry point: the app through the CLI error layer."""
    run_cli(app, prog_name="sogni")


if __name__ == "__main__":
    main()
