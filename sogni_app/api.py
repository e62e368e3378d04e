"""The Python API apps use to render on the Supernet and to manage their Spark.

    request = render_request("a red fox", model_id=..., loras=["detail:0.8"], output_format="webp")
    result = await render(addr, request, payer_key=key)
    save(result, Path("out"))
    granted = await claim_daily_boost(addr, key)      # free Spark, once per UTC day
    report = await balance(addr, key)

Every image comes with the receipt the coordinator verified and stored; `RenderedImage.
typed_data()` is the EIP-712 document exactly as the node signed it. Payer messages are
signed for the coordinator's EIP-712 domain (`domain`; default: the local embedded chain)
and, for render authorizations and Daily Boost claims, its network (`network_id`: the ledger
its coordinators share; default `DEFAULT_NETWORK_ID`, a local network's). A signature is good
on that one network only, and spent once across all its coordinators; a coordinator of
another network refuses it (`unauthorized`, naming both networks).

A render survives the coordinator: when the stream breaks (the coordinator restarted, the
network dropped) `render` reconnects with backoff and resumes the same request with its
resume token (`RequestAccepted.resume_token`, handed to `on_accepted` as a `ResumeTicket`);
the coordinator sends what this client has not acknowledged, and nothing is charged twice.
Each image is acknowledged after `on_image` returns, so an app that saves it there has it
exactly once. `collect` fetches a request later, from another process, with its ticket.

A render survives its coordinator dying too, when given several coordinators of one network
(`render([a, b, c], ...)`, `sogni render --coordinator A --coordinator B`): the request goes
to the first that answers, and a resume after a break tries the same coordinator, then the
next, round the list; any coordinator of the network adopts the request from the shared
database with the same token and sends what this client has not acknowledged. Nothing is
paid twice: the payer's authorization is spent once across the network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import trio
from eth_account import Account

from sogni_net import Channel, Host, TransportError, open_host
from sogni_protocol import eip712
from sogni_protocol.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from sogni_protocol.crashpoints import crashpoint
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.image_types import extension_of
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    DEFAULT_NETWORK_ID,
    BalanceReport,
    BoostGranted,
    ImageAck,
    JobFailed,
    JobImage,
    JobProgress,
    LoraRef,
    Message,
    NetworkId,
    Receipt,
    ReferralReport,
    RenderMeta,
    RenderRequest,
    ReportFiled,
    ReportReason,
    RequestAccepted,
    RequestDone,
    RequestRefused,
    RequestResumed,
    ResumeRequest,
)
from sogni_protocol.referral_signing import sign_referral_query
from sogni_protocol.report_signing import sign_report
from sogni_protocol.settings import DEFAULT_CHAIN_ID
from sogni_protocol.settings import UNDEPLOYED_CONTRACT as UNDEPLOYED

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_NETWORK_ID",
    "AccountRefused",
    "CoordinatorLost",
    "Refused",
    "RenderRefused",
    "RenderResult",
    "RenderedImage",
    "ResumeTicket",
    "authorize",
    "balance",
    "balance_sync",
    "claim_daily_boost",
    "claim_daily_boost_sync",
    "collect",
    "collect_sync",
    "parse_lora",
    "referral",
    "referral_sync",
    "render",
    "render_request",
    "render_sync",
    "save",
    "save_image",
    "valid_network_id",
]

log = get_logger(__name__)

DEFAULT_DOMAIN = Domain(DEFAULT_CHAIN_ID, UNDEPLOYED)
"""The domain of a local coordinator with default settings (embedded chain, no distributor)."""


class Refused(Exception):
    """The coordinator refused; `code` is machine-readable, the text says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class RenderRefused(Refused):
    """A render request was refused (unknown model, insufficient funds, bad signature...)."""


class CoordinatorLost(TransportError):
    """The stream broke and the coordinator could not be reached again in time; the request
    runs on there and `ticket` collects it later."""

    def __init__(self, ticket: ResumeTicket, seconds: float, last: BaseException) -> None:
        super().__init__(
            f"lost the coordinator and could not reconnect within {seconds:.0f} s "
            f"({type(last).__name__}); request {ticket.request_id.hex()} runs on there"
        )
        self.ticket = ticket


MAX_COORDINATORS = 16
"""Coordinators one render or ticket names (the network's, tried in turn)."""


@dataclass(frozen=True)
class ResumeTicket:
    """What re-attaches to a request: where, which, and the requester's secret token.
    Keep it private (`sogni render` writes it to `<out>/request.json`, mode 0600).
    `alternates`: other coordinators of the same network, tried in turn when `coordinator`
    cannot be reached."""

    coordinator: str
    request_id: bytes
    token: bytes
    alternates: tuple[str, ...] = ()

    @property
    def coordinators(self) -> list[str]:
        """Where to resume, in order: `coordinator`, then each alternate once."""
        out = [self.coordinator]
        out += [a for a in self.alternates if a not in out]
        return out[:MAX_COORDINATORS]

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "coordinator": self.coordinator,
            "requestId": self.request_id.hex(),
            "token": self.token.hex(),
        }
        if self.alternates:
            data["alternates"] = list(self.alternates)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ResumeTicket:
        """Raises `ValueError` for anything but a ticket `to_json` wrote."""
        try:
            data = json.loads(text)
            alternates = data.get("alternates", [])
            if not isinstance(alternates, list) or len(alternates) > MAX_COORDINATORS:
                raise ValueError(f"alternates: a list of at most {MAX_COORDINATORS}")
            ticket = cls(
                str(data["coordinator"]),
                bytes.fromhex(data["requestId"]),
                bytes.fromhex(data["token"]),
                tuple(str(a) for a in alternates),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a request ticket: {exc}") from None
        if len(ticket.request_id) != 32 or len(ticket.token) != 32:
            raise ValueError("not a request ticket: ids are 32 bytes")
        return ticket


class AccountRefused(Refused):
    """A Daily Boost claim or balance query was refused (`already_claimed`, `wrong_day`,
    `unauthorized`, `billing_off`)."""


def valid_network_id(network_id: str) -> str:
    """`network_id` if it is a well-formed network id (1-64 of `a-z 0-9 . _ -`, starting with
    a letter or digit), else `ValueError` saying so."""
    try:
        return msgspec.convert(network_id, NetworkId)
    except msgspec.ValidationError:
        raise ValueError(
            f"network id {network_id!r} is not 1-64 characters of a-z, 0-9, '.', '_' and '-' "
            "starting with a letter or digit"
        ) from None


def parse_lora(text: str) -> LoraRef:
    """`ID` or `ID:STRENGTH` (strength defaults to 1.0). Text after the last `:` must be the
    strength, so an id that itself contains `:` needs an explicit strength (`a:b:1`)."""
    lora_id, sep, tail = text.rpartition(":")
    if not sep:
        lora_id, strength = text, "1.0"
    else:
        strength = tail
    if not lora_id:
        raise ValueError(f"LoRA {text!r}: missing id (expected ID or ID:STRENGTH)")
    try:
        value = float(strength)
    except ValueError:
        raise ValueError(
            f"LoRA {text!r}: strength {strength!r} is not a number (expected ID or ID:STRENGTH)"
        ) from None
    try:
        return msgspec.convert({"id": lora_id, "strength": value}, LoraRef)
    except msgspec.ValidationError as exc:
        raise ValueError(f"LoRA {text!r}: {exc}") from None


def render_request(
    prompt: str,
    *,
    model_id: str,
    negative_prompt: str = "",
    style_prompt: str = "",
    steps: int = 20,
    guidance: float = 7.5,
    scheduler: str = "",
    width: int = 512,
    height: int = 512,
    seed: int = 0,
    number_of_images: int = 1,
    loras: Iterable[LoraRef | str] = (),
    output_format: Literal["png", "jpeg", "webp"] = "png",
    network: Literal["fast", "relaxed"] = "fast",
    token_type: Literal["spark", "sogni"] = "spark",
    disable_safety: bool = False,
) -> RenderRequest:
    """A validated `RenderRequest`; `ValueError` names the field that is wrong.

    `loras` are applied in order (at most 8), each a `LoraRef` or `"ID[:STRENGTH]"`.
    `disable_safety` asks for adult content, which a coordinator delivers unblurred only when
    its operator allows it (docs/SAFETY.md).
    """
    refs = [lora if isinstance(lora, LoraRef) else parse_lora(lora) for lora in loras]
    try:
        return msgspec.convert(
            {
                "type": "renderRequest",
                "modelId": model_id,
                "positivePrompt": prompt,
                "negativePrompt": negative_prompt,
                "stylePrompt": style_prompt,
                "steps": steps,
                "guidance": guidance,
                "scheduler": scheduler,
                "width": width,
                "height": height,
                "seed": seed,
                "numberOfImages": number_of_images,
                "loras": [msgspec.to_builtins(r) for r in refs],
                "outputFormat": output_format,
                "network": network,
                "tokenType": token_type,
                "disableSafety": disable_safety,
            },
            RenderRequest,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class RenderedImage:
    index: int
    job_id: bytes
    seed: int
    image: bytes
    receipt: Receipt
    signature: bytes
    meta: RenderMeta
    domain: Domain

    def typed_data(self) -> dict[str, Any]:
        return eip712.receipt_document(self.domain, self.receipt)


@dataclass
class RenderResult:
    request_id: bytes
    cost_micro: int = 0
    images: list[RenderedImage] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)


ProgressFn = Callable[[int, int, int], None]
"""(image index, step, steps) for progress, called on the trio thread."""


async def render(
    coordinator: str | Sequence[str],
    request: RenderRequest,
    *,
    on_progress: ProgressFn | None = None,
    on_image: Callable[[RenderedImage], None] | None = None,
    on_accepted: Callable[[ResumeTicket], None] | None = None,
    idle_timeout: float = 300.0,
    payer_key: bytes | None = None,
    domain: Domain | None = None,
    network_id: str | None = None,
    reconnect_for: float = 120.0,
    on_resumed: Callable[[str], None] | None = None,
) -> RenderResult:
    """Send one request and collect its images; `idle_timeout` bounds each wait for news.

    `coordinator`: one multiaddr, or several of one network (the request goes to the first
    that can be reached; a resume tries them in turn from the one that accepted it).

    With `payer_key`, the request names that wallet as payer and carries its EIP-712
    authorization for `domain` (the coordinator's chain and distributor) on `network_id`
    (the coordinator's network; None: the request's own, `DEFAULT_NETWORK_ID` unless set),
    and the coordinator knows the request by the hash it signed. `on_accepted` gets
    the request's `ResumeTicket` as soon as it is accepted. If the stream breaks after that,
    the request is resumed (backoff, up to `reconnect_for` seconds per outage) and each image
    is still handed over once; `CoordinatorLost` (with the ticket) when that fails.
    `on_resumed` gets the coordinator's address each time the request is resumed.
    """
    coordinators = _coordinator_list(coordinator)
    if payer_key is not None:
        request = authorize(request, payer_key, domain or DEFAULT_DOMAIN, network_id=network_id)
    outcome: RenderResult | Exception
    async with open_host(key_path=None, listen=()) as host:
        # errors leave the host's nursery as plain exceptions, not exception groups
        try:
            outcome = await _render(
                host, coordinators, request, on_progress, on_image, on_accepted, idle_timeout,
                reconnect_for, on_resumed,
            )  # fmt: skip
        except (RenderRefused, TransportError, ProtocolError) as exc:
            outcome = exc
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def collect(
    ticket: ResumeTicket,
    *,
    on_progress: ProgressFn | None = None,
    on_image: Callable[[RenderedImage], None] | None = None,
    idle_timeout: float = 300.0,
    reconnect_for: float = 10.0,
) -> RenderResult:
    """Fetch a request's images not yet acknowledged (and wait for the rest if it is still
    running), e.g. after the process that sent it went away. `RenderRefused`
    (`unauthorized`) for a wrong token or an unknown request."""
    run = _Run(RenderResult(ticket.request_id), None, on_progress, on_image)
    outcome: RenderResult | Exception
    async with open_host(key_path=None, listen=()) as host:
        try:
            outcome = await _until_done(host, ticket, run, idle_timeout, reconnect_for)
        except (RenderRefused, TransportError, ProtocolError) as exc:
            outcome = exc
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@dataclass
class _Run:
    """One request as this client sees it, across the streams it takes."""

    result: RenderResult
    domain: Domain | None
    on_progress: ProgressFn | None
    on_image: Callable[[RenderedImage], None] | None
    seen: set[bytes] = field(default_factory=set)
    failed: set[bytes] = field(default_factory=set)
    attached: bool = False
    """A stream got as far as the coordinator's answer since the last failure."""
    on_resumed: Callable[[str], None] | None = None


def _coordinator_list(coordinator: str | Sequence[str]) -> list[str]:
    """One multiaddr or several (`ValueError` for none or more than `MAX_COORDINATORS`)."""
    out = [coordinator] if isinstance(coordinator, str) else list(dict.fromkeys(coordinator))
    if not out or len(out) > MAX_COORDINATORS:
        raise ValueError(f"name 1 to {MAX_COORDINATORS} coordinators, not {len(out)}")
    return out


async def _open_first(host: Host, coordinators: list[str]) -> tuple[Channel, str]:
    """A client stream to the first coordinator that can be reached (dial failures only:
    nothing was sent to the ones skipped)."""
    last: TransportError | None = None
    for addr in coordinators:
        try:
            return await host.open_channel(addr, CLIENT_PROTOCOL, timeout=15.0, direct=True), addr
        except TransportError as exc:
            last = exc
    assert last is not None
    raise last


async def _render(
    host: Host,
    coordinators: list[str],
    request: RenderRequest,
    on_progress: ProgressFn | None,
    on_image: Callable[[RenderedImage], None] | None,
    on_accepted: Callable[[ResumeTicket], None] | None,
    idle_timeout: float,
    reconnect_for: float,
    on_resumed: Callable[[str], None] | None = None,
) -> RenderResult:
    """Send the request (once: it is never sent again), follow its stream, and resume it
    with its ticket if the stream breaks (at the same coordinator or another of the list)."""
    channel, coordinator = await _open_first(host, coordinators)
    try:
        await channel.send(request)
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=30.0)
        if isinstance(first, RequestRefused):
            raise RenderRefused(first.code, first.reason)
        if not isinstance(first, RequestAccepted):
            raise RenderRefused("protocol", f"unexpected {type(first).__name__}")
        alternates = tuple(c for c in coordinators if c != coordinator)
        ticket = ResumeTicket(coordinator, first.request_id, first.resume_token, alternates)
        domain = Domain(first.chain_id, first.verifying_contract)
        result = RenderResult(first.request_id, cost_micro=first.cost_micro)
        run = _Run(result, domain, on_progress, on_image, attached=True, on_resumed=on_resumed)
        if on_accepted is not None:
            on_accepted(ticket)
        try:
            return await _follow(channel, ticket, run, idle_timeout)
        except TransportError:
            pass  # resumed below, once this stream is closed
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()
    return await _until_done(host, ticket, run, idle_timeout, reconnect_for)


async def _until_done(
    host: Host, ticket: ResumeTicket, run: _Run, idle_timeout: float, reconnect_for: float
) -> RenderResult:
    """Attach with the ticket until `RequestDone`, reconnecting with backoff (0.1 s doubling
    to 5 s) for up to `reconnect_for` seconds after each break. With alternates, each try
    goes to the next coordinator of the ticket's list, starting from the one last attached."""
    deadline = trio.current_time() + reconnect_for
    delay = 0.1
    where = ticket.coordinators
    turn = 0
    while True:
        addr = where[turn % len(where)]
        try:
            return await _attach(host, ticket, run, idle_timeout, addr)
        except TransportError as exc:
            if run.attached:  # it had worked: a new outage, a new budget
                run.attached = False
                deadline, delay = trio.current_time() + reconnect_for, 0.1
                where = [addr, *(a for a in where if a != addr)]  # the same one first
                turn = 0
            if trio.current_time() + delay > deadline:
                raise CoordinatorLost(ticket, reconnect_for, exc) from None
            turn += 1
            if len(where) > 1 and turn % len(where):
                continue  # the next coordinator at once; the backoff is per round
        await trio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _attach(
    host: Host, ticket: ResumeTicket, run: _Run, idle_timeout: float, addr: str
) -> RenderResult:
    channel = await host.open_channel(addr, CLIENT_PROTOCOL, timeout=15.0, direct=True)
    try:
        await channel.send(ResumeRequest(request_id=ticket.request_id, token=ticket.token))
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=30.0)
        if isinstance(first, RequestRefused):
            raise RenderRefused(first.code, first.reason)
        if not isinstance(first, RequestResumed) or first.request_id != ticket.request_id:
            raise RenderRefused("protocol", f"unexpected {type(first).__name__}")
        run.attached = True
        if addr != ticket.coordinator:
            log.info("request_resumed_elsewhere", request=ticket.request_id.hex()[:16], at=addr)
        if run.on_resumed is not None:
            run.on_resumed(addr)
        if run.domain is None:
            run.domain = Domain(first.chain_id, first.verifying_contract)
        return await _follow(channel, ticket, run, idle_timeout)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


async def _follow(
    channel: Channel, ticket: ResumeTicket, run: _Run, idle_timeout: float
) -> RenderResult:
    """Read one stream of the request until `RequestDone`, acknowledging each image."""
    while True:
        msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=idle_timeout)
        if isinstance(msg, JobProgress):
            if run.on_progress is not None and msg.job_id not in run.seen:
                run.on_progress(msg.index, msg.step, msg.steps)
        elif isinstance(msg, JobImage):
            await _take_image(channel, ticket, run, msg)
        elif isinstance(msg, JobFailed):
            if msg.job_id not in run.failed:
                run.failed.add(msg.job_id)
                run.result.failed.append((msg.index, msg.reason))
        elif isinstance(msg, RequestDone):
            run.result.images.sort(key=lambda im: im.index)
            run.result.failed.sort()
            return run.result


async def _take_image(channel: Channel, ticket: ResumeTicket, run: _Run, msg: JobImage) -> None:
    """Hand a new image to the app, then acknowledge it (a copy already handed over, sent
    again because its ack was lost, is only acknowledged again)."""
    if msg.job_id not in run.seen:
        assert run.domain is not None
        image = RenderedImage(
            msg.index, msg.job_id, msg.seed, msg.image, msg.receipt, msg.signature, msg.meta,
            run.domain,
        )  # fmt: skip
        if run.on_image is not None:
            run.on_image(image)
        run.seen.add(msg.job_id)
        run.result.images.append(image)
        crashpoint("client_mid_stream")
    await channel.send(ImageAck(request_id=ticket.request_id, job_ids=[msg.job_id]))


def authorize(
    request: RenderRequest,
    payer_key: bytes,
    domain: Domain,
    ttl: float = 600.0,
    *,
    network_id: str | None = None,
) -> RenderRequest:
    """Name the payer and sign this exact request for `domain` on `network_id` (None: the
    request's own, `DEFAULT_NETWORK_ID` unless set). A fresh nonce makes every authorization
    new; each is spent once across its network and refused on any other. `ValueError` for a
    malformed network id."""
    network = valid_network_id(request.network_id if network_id is None else network_id)
    payer = Account.from_key(payer_key).address
    unsigned = msgspec.structs.replace(
        request,
        payer=payer,
        network_id=network,
        nonce=os.urandom(16),
        expiry=int(time.time() + ttl),
    )
    return eip712.sign_request(payer_key, domain, unsigned)


def quiet_unconfigured_logging() -> None:
    """Keep a script's output to warnings and errors unless it configured logging itself.

    Why: structlog unconfigured prints every level to stdout, so each call of the `*_sync`
    helpers from a plain script printed the transport's `host_started` event. Logging set up
    by the application (structlog configured) is left alone.
    """
    import logging

    import structlog

    if not structlog.is_configured():
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def render_sync(
    coordinator: str | Sequence[str], request: RenderRequest, **kwargs: Any
) -> RenderResult:
    """`render` for scripts (starts its own trio loop)."""
    quiet_unconfigured_logging()
    return trio.run(lambda: render(coordinator, request, **kwargs))


def collect_sync(ticket: ResumeTicket, **kwargs: Any) -> RenderResult:
    """`collect` for scripts (starts its own trio loop)."""
    quiet_unconfigured_logging()
    return trio.run(lambda: collect(ticket, **kwargs))


_Reply = TypeVar("_Reply", BoostGranted, BalanceReport, ReportFiled, ReferralReport)


async def _ask(
    coordinator: str,
    build: Callable[[Host], Message],
    expect: type[_Reply],
    timeout: float,
) -> _Reply:
    """One signed question on a fresh client stream and its one answer."""
    outcome: _Reply | Exception
    async with open_host(key_path=None, listen=()) as host:
        # errors leave the host's nursery as plain exceptions, not exception groups
        try:
            channel = await host.open_channel(
                coordinator, CLIENT_PROTOCOL, timeout=15.0, direct=True
            )
            try:
                await channel.send(build(host))
                reply = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=timeout)
            finally:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await channel.close()
            if isinstance(reply, RequestRefused):
                outcome = AccountRefused(reply.code, reply.reason)
            elif isinstance(reply, expect):
                outcome = reply
            else:
                outcome = AccountRefused("protocol", f"unexpected {type(reply).__name__}")
        except (TransportError, ProtocolError) as exc:
            outcome = exc
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def utc_today(now: float | None = None) -> str:
    """Today's UTC day as the coordinator names it (`YYYY-MM-DD`)."""
    ts = time.time() if now is None else now
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


async def claim_daily_boost(
    coordinator: str,
    payer_key: bytes,
    *,
    domain: Domain | None = None,
    network_id: str = DEFAULT_NETWORK_ID,
    day: str | None = None,
    timeout: float = 30.0,
) -> BoostGranted:
    """Claim today's free Daily Boost Spark for the key's wallet (once per UTC day), signed
    for `domain` on `network_id` (the coordinator's network: one claim a day across all its
    coordinators).

    Raises `AccountRefused`: `already_claimed` (the reason says when the next claim opens),
    `wrong_day`, `unauthorized` (e.g. signed for another network, chain or distributor) or
    `billing_off`; `ValueError` for a malformed network id.
    """
    claim = eip712.sign_boost_claim(
        payer_key, domain or DEFAULT_DOMAIN, day or utc_today(), valid_network_id(network_id)
    )
    return await _ask(coordinator, lambda _host: claim, BoostGranted, timeout)


async def balance(
    coordinator: str,
    payer_key: bytes,
    *,
    domain: Domain | None = None,
    ttl: float = 60.0,
    timeout: float = 30.0,
) -> BalanceReport:
    """The key's wallet's balances on this coordinator (spendable, reserved, Daily Boost).

    The query is signed for this connection's peer id and valid for `ttl` seconds, so a
    copy of it is useless to anyone else.
    """
    expiry = int(time.time() + ttl)

    def build(host: Host) -> Message:
        return eip712.sign_balance_query(payer_key, domain or DEFAULT_DOMAIN, host.peer_id, expiry)

    return await _ask(coordinator, build, BalanceReport, timeout)


async def report(
    coordinator: str,
    payer_key: bytes,
    request_id: bytes,
    reason: ReportReason,
    *,
    image_index: int = -1,
    note: str = "",
    domain: Domain | None = None,
    ttl: float = 60.0,
    timeout: float = 30.0,
) -> ReportFiled:
    """Report a request this key's wallet paid for (one image, or all with -1) to the
    coordinator's operator (docs/SAFETY.md, "Reports"); the note goes to the operator only.

    Raises `AccountRefused`: `unknown_job` (not a request of this payer), `duplicate_report`,
    `not_delivered`, `rate_limited`, `unauthorized`, `reports_off`.
    """
    expiry = int(time.time() + ttl)

    def build(host: Host) -> Message:
        return sign_report(
            payer_key,
            domain or DEFAULT_DOMAIN,
            peer_id=host.peer_id,
            request_id=request_id,
            reason=reason,
            image_index=image_index,
            note=note,
            expiry=expiry,
        )

    return await _ask(coordinator, build, ReportFiled, timeout)


def report_sync(
    coordinator: str, payer_key: bytes, request_id: bytes, reason: ReportReason, **kwargs: Any
) -> ReportFiled:
    """`report` for scripts: returns `ReportFiled`, raises `AccountRefused`."""
    quiet_unconfigured_logging()
    return trio.run(lambda: report(coordinator, payer_key, request_id, reason, **kwargs))


async def referral(
    coordinator: str,
    payer_key: bytes,
    code: str = "",
    *,
    domain: Domain | None = None,
    ttl: float = 60.0,
    timeout: float = 30.0,
) -> ReferralReport:
    """The key's wallet's referral code on this coordinator's network (`ReferralReport.code`,
    to hand out) and who referred it; with `code`, first record that the code's owner
    referred this wallet (docs/ECONOMICS.md, "Referral codes").

    Raises `AccountRefused`: `referral_refused` (unknown code, one's own, already referred,
    a cycle), `unauthorized`, `billing_off`.
    """
    expiry = int(time.time() + ttl)

    def build(host: Host) -> Message:
        return sign_referral_query(
            payer_key, domain or DEFAULT_DOMAIN, peer_id=host.peer_id, code=code, expiry=expiry
        )

    return await _ask(coordinator, build, ReferralReport, timeout)


def referral_sync(
    coordinator: str, payer_key: bytes, code: str = "", **kwargs: Any
) -> ReferralReport:
    """`referral` for scripts: returns `ReferralReport`, raises `AccountRefused`."""
    quiet_unconfigured_logging()
    return trio.run(lambda: referral(coordinator, payer_key, code, **kwargs))


def claim_daily_boost_sync(coordinator: str, payer_key: bytes, **kwargs: Any) -> BoostGranted:
    """`claim_daily_boost` for scripts: returns `BoostGranted`, raises `AccountRefused`."""
    quiet_unconfigured_logging()
    return trio.run(lambda: claim_daily_boost(coordinator, payer_key, **kwargs))


def balance_sync(coordinator: str, payer_key: bytes, **kwargs: Any) -> BalanceReport:
    """`balance` for scripts: returns `BalanceReport`, raises `AccountRefused`."""
    quiet_unconfigured_logging()
    return trio.run(lambda: balance(coordinator, payer_key, **kwargs))


def receipt_line(image: RenderedImage, file_name: str) -> dict[str, Any]:
    """One `receipts.jsonl` line: the typed data as signed, the signature, the image file."""
    doc = image.typed_data()
    doc["signature"] = "0x" + image.signature.hex()
    doc["image"] = file_name
    return doc


def image_name(request_id: bytes, image: RenderedImage) -> str:
    """`<request prefix>-<index>.<png|jpg|webp>`: the file `save_image` writes."""
    return f"{request_id.hex()[:12]}-{image.index:03d}.{extension_of(image.image)}"


def save_image(request_id: bytes, image: RenderedImage, out_dir: Path) -> Path:
    """Write one image and append its receipt to `receipts.jsonl`, durably; an image whose
    receipt line is already there is not written again (a resumed or repeated collect)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = image_name(request_id, image)
    receipts = out_dir / "receipts.jsonl"
    if receipts.exists():
        for line in receipts.read_text().splitlines():
            if line.strip() and json.loads(line).get("image") == name:
                return out_dir / name
    atomic_write_bytes(out_dir / name, image.image)
    with receipts.open("a") as f:
        f.write(json.dumps(receipt_line(image, name)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(out_dir)
    return out_dir / name


def save_ticket(ticket: ResumeTicket, out_dir: Path) -> Path:
    """`<out_dir>/request.json` (0600): what `sogni collect` needs to fetch the request."""
    path = out_dir / "request.json"
    atomic_write_text(path, ticket.to_json() + "\n", mode=0o600)
    return path


def save(result: RenderResult, out_dir: Path) -> list[Path]:
    """Write each image as `<request>-<index>.<png|jpg|webp>` and append its receipt to
    receipts.jsonl (once per image)."""
    return [save_image(result.request_id, image, out_dir) for image in result.images]
