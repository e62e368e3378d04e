"""The Python API apps use to render on the Supernet.

    result = await render(addr, RenderRequest(model_id=..., positive_prompt=...))
    save(result, Path("out"))

Every image comes with the receipt the coordinator verified and stored; `RenderedImage.
typed_data()` is the EIP-712 document exactly as the node signed it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
from eth_account import Account

from sogni_net import Host, TransportError, open_host
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT, RESULT_FRAME_LIMIT
from sogni_protocol.image_types import extension_of
from sogni_protocol.messages import (
    JobFailed,
    JobImage,
    JobProgress,
    Receipt,
    RenderMeta,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    RequestRefused,
)
from sogni_protocol.settings import DEFAULT_CHAIN_ID
from sogni_protocol.settings import UNDEPLOYED_CONTRACT as UNDEPLOYED

__all__ = ["RenderRefused", "RenderResult", "RenderedImage", "render", "render_sync", "save"]


class RenderRefused(Exception):
    """The coordinator refused the request; `code` is machine-readable, the text says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


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
        request = authorize(request, payer_key, domain or Domain(DEFAULT_CHAIN_ID, UNDEPLOYED))
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
            (out_dir / name).write_bytes(image.image)
            receipts.write(json.dumps(receipt_line(image, name)) + "\n")
            paths.append(out_dir / name)
    return paths
