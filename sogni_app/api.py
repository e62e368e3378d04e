"""The Python API apps use to render on the Supernet and to manage their Spark.

    request = render_request("a red fox", model_id=..., loras=["detail:0.8"], output_format="webp")
    result = await render(addr, request, payer_key=key)
    save(result, Path("out"))
    granted = await claim_daily_boost(addr, key)      # free Spark, once per UTC day
    report = await balance(addr, key)

Every image comes with the receipt the coordinator verified and stored; `RenderedImage.
typed_data()` is the EIP-712 document exactly as the node signed it. Payer messages are
signed for the coordinator's EIP-712 domain (`domain`; default: the local embedded chain).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import trio
from eth_account import Account

from sogni_net import Host, TransportError, open_host
from sogni_protocol import eip712
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.image_types import extension_of
from sogni_protocol.messages import (
    BalanceReport,
    BoostGranted,
    JobFailed,
    JobImage,
    JobProgress,
    LoraRef,
    Message,
    Receipt,
    RenderMeta,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    RequestRefused,
)
from sogni_protocol.settings import DEFAULT_CHAIN_ID
from sogni_protocol.settings import UNDEPLOYED_CONTRACT as UNDEPLOYED

__all__ = [
    "DEFAULT_DOMAIN",
    "AccountRefused",
    "Refused",
    "RenderRefused",
    "RenderResult",
    "RenderedImage",
    "balance",
    "balance_sync",
    "claim_daily_boost",
    "claim_daily_boost_sync",
    "parse_lora",
    "render",
    "render_request",
    "render_sync",
    "save",
]

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


class AccountRefused(Refused):
    """A Daily Boost claim or balance query was refused (`already_claimed`, `wrong_day`,
    `unauthorized`, `billing_off`)."""


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
) -> RenderRequest:
    """A validated `RenderRequest`; `ValueError` names the field that is wrong.

    `loras` are applied in order (at most 8), each a `LoraRef` or `"ID[:STRENGTH]"`.
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
    coordinator: str,
    request: RenderRequest,
    *,
    on_progress: ProgressFn | None = None,
    on_image: Callable[[RenderedImage], None] | None = None,
    idle_timeout: float = 300.0,
    payer_key: bytes | None = None,
    domain: Domain | None = None,
) -> RenderResult:
    """Send one request and collect its images; `idle_timeout` bounds each wait for news.

    With `payer_key`, the request names that wallet as payer and carries its EIP-712
    authorization for `domain` (the coordinator's chain and distributor).
    """
    if payer_key is not None:
        request = authorize(request, payer_key, domain or DEFAULT_DOMAIN)
    outcome: RenderResult | Exception
    async with open_host(key_path=None, listen=()) as host:
        # errors leave the host's nursery as plain exceptions, not exception groups
        try:
            outcome = await _exchange(
                host, coordinator, request, on_progress, on_image, idle_timeout
            )
        except (RenderRefused, TransportError, ProtocolError) as exc:
            outcome = exc
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def _exchange(
    host: Host,
    coordinator: str,
    request: RenderRequest,
    on_progress: ProgressFn | None,
    on_image: Callable[[RenderedImage], None] | None,
    idle_timeout: float,
) -> RenderResult:
    channel = await host.open_channel(coordinator, CLIENT_PROTOCOL, timeout=15.0)
    try:
        await channel.send(request)
        first = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=30.0)
        if isinstance(first, RequestRefused):
            raise RenderRefused(first.code, first.reason)
        if not isinstance(first, RequestAccepted):
            raise RenderRefused("protocol", f"unexpected {type(first).__name__}")
        domain = Domain(first.chain_id, first.verifying_contract)
        result = RenderResult(first.request_id, cost_micro=first.cost_micro)
        while True:
            msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=idle_timeout)
            if isinstance(msg, JobProgress):
                if on_progress is not None:
                    on_progress(msg.index, msg.step, msg.steps)
            elif isinstance(msg, JobImage):
                image = RenderedImage(
                    msg.index,
                    msg.job_id,
                    msg.seed,
                    msg.image,
                    msg.receipt,
                    msg.signature,
                    msg.meta,
                    domain,
                )
                result.images.append(image)
                if on_image is not None:
                    on_image(image)
            elif isinstance(msg, JobFailed):
                result.failed.append((msg.index, msg.reason))
            elif isinstance(msg, RequestDone):
                result.images.sort(key=lambda im: im.index)
                return result
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()


def authorize(
    request: RenderRequest, payer_key: bytes, domain: Domain, ttl: float = 600.0
) -> RenderRequest:
    """Name the payer and sign this exact request (fresh nonce, so it cannot be replayed)."""
    payer = Account.from_key(payer_key).address
    unsigned = msgspec.structs.replace(
        request, payer=payer, nonce=os.urandom(16), expiry=int(time.time() + ttl)
    )
    return eip712.sign_request(payer_key, domain, unsigned)


def render_sync(coordinator: str, request: RenderRequest, **kwargs: Any) -> RenderResult:
    return trio.run(lambda: render(coordinator, request, **kwargs))


_Reply = TypeVar("_Reply", BoostGranted, BalanceReport)


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
            channel = await host.open_channel(coordinator, CLIENT_PROTOCOL, timeout=15.0)
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
    day: str | None = None,
    timeout: float = 30.0,
) -> BoostGranted:
    """Claim today's free Daily Boost Spark for the key's wallet (once per UTC day).

    Raises `AccountRefused`: `already_claimed` (the reason says when the next claim opens),
    `wrong_day`, `unauthorized` (e.g. signed for another chain or distributor) or
    `billing_off`.
    """
    claim = eip712.sign_boost_claim(payer_key, domain or DEFAULT_DOMAIN, day or utc_today())
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


def claim_daily_boost_sync(coordinator: str, payer_key: bytes, **kwargs: Any) -> BoostGranted:
    return trio.run(lambda: claim_daily_boost(coordinator, payer_key, **kwargs))


def balance_sync(coordinator: str, payer_key: bytes, **kwargs: Any) -> BalanceReport:
    return trio.run(lambda: balance(coordinator, payer_key, **kwargs))


def receipt_line(image: RenderedImage, file_name: str) -> dict[str, Any]:
    """One `receipts.jsonl` line: the typed data as signed, the signature, the image file."""
    doc = image.typed_data()
    doc["signature"] = "0x" + image.signature.hex()
    doc["image"] = file_name
    return doc


def save(result: RenderResult, out_dir: Path) -> list[Path]:
    """Write each image as `<request>-<index>.<png|jpg|webp>` and append its receipt to
    receipts.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with (out_dir / "receipts.jsonl").open("a") as receipts:
        for image in result.images:
            name = f"{result.request_id.hex()[:12]}-{image.index:03d}.{extension_of(image.image)}"
            atomic_write_bytes(out_dir / name, image.image)
            receipts.write(json.dumps(receipt_line(image, name)) + "\n")
            paths.append(out_dir / name)
    return paths
