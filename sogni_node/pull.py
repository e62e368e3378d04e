"""One long-lived pull stream from this node to one trusted coordinator.

The node says who it is (capabilities bound to its wallet), then asks for work with `Ready`
credits. Every offer is checked (signer trusted, parameters match the signed hash, model
present, deadline ahead) before a slot renders it; every result goes back with a receipt
signed by the wallet and journaled first. Heartbeats flow both ways; a silent coordinator
ends the session and `pull_forever` reconnects with backoff.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from sogni_net import Channel, Host, TransportError
from sogni_node.journal import Journal
from sogni_node.render.backend import RenderCancelled
from sogni_node.worker import NoFreeSlot, Running, Worker
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import (
    CONTROL_FRAME_LIMIT,
    JOBS_PROTOCOL,
    RESULT_FRAME_LIMIT,
    unsupported_version,
)
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    Cancel,
    Capabilities,
    Goodbye,
    HandBack,
    Heartbeat,
    HelloRefused,
    JobOffer,
    Message,
    NodeHello,
    Offer,
    OfferDeclined,
    Progress,
    Ready,
    Receipt,
    RenderMeta,
    Result,
    ResultAck,
    UnsupportedWireVersion,
    Welcome,
)

log = get_logger(__name__)


@dataclass(frozen=True)
class NodeIdentity:
    wallet_address: str
    wallet_key: bytes
    domain: Domain
    trusted: frozenset[str]
    """Lower-case coordinator signing addresses whose offers this node accepts."""


class SessionRefused(Exception):
    """The coordinator refused this node (it said why), is not one we trust, speaks another
    wire version, or settles on another chain."""


class PullSession:
    def __init__(
        self,
        host: Host,
        addr: str,
        identity: NodeIdentity,
        worker: Worker,
        journal: Journal,
        capabilities: Capabilities,
        *,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        on_connected: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.host = host
        self.addr = addr
        self.id = identity
        self.worker = worker
        self.journal = journal
        self.caps = capabilities
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.coordinator = ""
        self._out_send, self._out_recv = trio.open_memory_channel[Message](math.inf)
        self.jobs: set[bytes] = set()
        self.closed = trio.Event()
        self._on_connected = on_connected
        self._error: Exception | None = None

    def send(self, msg: Message) -> None:
        try:
            self._out_send.send_nowait(msg)
        except trio.ClosedResourceError:
            pass

    def offer_ready(self) -> None:
        self.send(Ready(slots=self.worker.free_slots, warm_models=self.worker.warm_models()))

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.closed.set()

    async def _run(self) -> None:
        channel = await self.host.open_channel(self.addr, JOBS_PROTOCOL, timeout=10.0)
        try:
            await self._handshake(channel)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._reader, channel, nursery)
                self.offer_ready()
                await self._guard(self._writer, channel, nursery)  # ends after Goodbye
                nursery.cancel_scope.cancel()
            if self._error is not None:
                raise self._error
        finally:
            for job_id in self.jobs:  # nobody will take these results now
                self.worker.cancel(job_id, "coordinator connection lost")
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await channel.close()

    async def _guard(
        self, fn: Callable[..., object], channel: Channel, nursery: trio.Nursery
    ) -> None:
        """Turn an expected stream failure into a clean end of the session (no exception group)."""
        try:
            await fn(channel, nursery)  # type: ignore[misc]
        except (TransportError, ProtocolError) as exc:
            self._error = self._error or exc
            nursery.cancel_scope.cancel()

    async def _handshake(self, channel: Channel) -> None:
        signature = eip712.sign_binding(self.id.wallet_key, self.id.domain, self.caps)
        await channel.send(NodeHello(capabilities=self.caps, binding_signature=signature))
        try:
            welcome = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10.0)
        except UnsupportedWireVersion as exc:
            raise SessionRefused(unsupported_version(exc.version, "node")) from None
        if isinstance(welcome, HelloRefused):
            raise SessionRefused(f"coordinator refused this node: {welcome.reason}")
        if not isinstance(welcome, Welcome):
            raise SessionRefused(f"coordinator answered {type(welcome).__name__}, not welcome")
        if welcome.coordinator.lower() not in self.id.trusted:
            raise SessionRefused(
                f"coordinator {welcome.coordinator} is not in trusted_coordinators"
            )
        if (welcome.chain_id, welcome.verifying_contract.lower()) != (
            self.id.domain.chain_id,
            self.id.domain.verifying_contract.lower(),
        ):
            raise SessionRefused(
                f"coordinator settles on chain {welcome.chain_id} / "
                f"{welcome.verifying_contract}, this node on {self.id.domain.chain_id} / "
                f"{self.id.domain.verifying_contract}"
            )
        self.coordinator = welcome.coordinator
        self.heartbeat_interval = min(self.heartbeat_interval, welcome.heartbeat_interval)
        if self._on_connected is not None:
            self._on_connected({"event": "connected", "coordinator": welcome.coordinator})

    async def _writer(self, channel: Channel, nursery: trio.Nursery) -> None:
        seq = 0
        while True:
            with trio.move_on_after(self.heartbeat_interval):
                msg = await self._out_recv.receive()
                limit = RESULT_FRAME_LIMIT if isinstance(msg, Result) else CONTROL_FRAME_LIMIT
                await channel.send(msg, limit=limit, timeout=60.0)
                if isinstance(msg, Goodbye):
                    return
                continue
            seq += 1
            await channel.send(Heartbeat(seq=seq), timeout=self.heartbeat_timeout)

    def finish(self) -> None:
        """Say goodbye after everything already queued (results, hand-backs) has gone out."""
        self.send(Goodbye(reason="node shutting down"))

    async def _reader(self, channel: Channel, nursery: trio.Nursery) -> None:
        while True:
            msg = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=self.heartbeat_timeout)
            if isinstance(msg, Offer):
                self._on_offer(msg, nursery)
            elif isinstance(msg, Cancel):
                self.worker.cancel(
                    msg.job_id, "cancelled by coordinator", pay_partial=msg.pay_partial
                )
            elif isinstance(msg, ResultAck):
                self.journal.mark_acked(msg.job_id, msg.accepted, msg.reason)
                if not msg.accepted:
                    log.warning("receipt_refused", job=msg.job_id.hex()[:16], reason=msg.reason)
            elif isinstance(msg, Heartbeat):
                pass
            else:
                log.warning("unexpected_message", type=type(msg).__name__)

    def _check_offer(self, msg: Offer) -> str | None:
        offer = msg.offer
        try:
            signer = eip712.recover_offer_signer(self.id.domain, offer, msg.signature)
        except ProtocolError as exc:
            return str(exc)
        if signer.lower() not in self.id.trusted:
            return f"offer signed by untrusted key {signer}"
        if not eip712.same_address(signer, self.coordinator):
            return "offer signed by a key other than this session's coordinator"
        if eip712.params_hash(msg.params) != offer.params_hash:
            return "offer paramsHash does not match its parameters"
        p = msg.params
        if (p.model_id, p.steps, p.width, p.height, p.seed) != (
            offer.model_id,
            offer.steps,
            offer.width,
            offer.height,
            offer.seed,
        ):
            return "offer fields do not match its parameters"
        if offer.model_id not in self.caps.models:
            return f"model {offer.model_id} is not installed here"
        missing = [lora.id for lora in p.loras if lora.id not in self.caps.loras]
        if missing:
            return f"LoRA {', '.join(missing)} not installed here"
        if offer.deadline <= time.time():
            return "offer deadline already passed"
        return None

    def _on_offer(self, msg: Offer, nursery: trio.Nursery) -> None:
        job_id = msg.offer.job_id
        log.debug(
            "offer_received",
            job=job_id.hex()[:16],
            model=msg.offer.model_id,
            steps=msg.offer.steps,
            params=msg.params,
        )  # params are redacted by the logger
        fault = self._check_offer(msg)
        if fault is None:
            try:
                run = self.worker.claim(job_id)
            except NoFreeSlot as exc:
                fault = str(exc)
        if fault is not None:
            log.warning("offer_declined", job=job_id.hex()[:16], reason=fault)
            self.send(OfferDeclined(job_id=job_id, reason=fault))
            self.offer_ready()  # the coordinator spent a credit on this offer
            return
        self.jobs.add(job_id)
        nursery.start_soon(self._run_job, msg, run)

    async def _run_job(self, msg: Offer, run: Running) -> None:
        try:
            await self._render_and_receipt(msg, run)
        finally:
            self.jobs.discard(msg.offer.job_id)
            self.offer_ready()

    async def _render_and_receipt(self, msg: Offer, run: Running) -> None:
        offer = msg.offer
        offer_hash = eip712.offer_hash(self.id.domain, offer)
        self.journal.record_offer(
            job_id=offer.job_id,
            coordinator=self.coordinator,
            model_id=offer.model_id,
            offer_hash=offer_hash,
            work_units=offer.work_units,
            deadline=offer.deadline,
        )

        def on_step(step: int) -> None:
            self.send(Progress(job_id=offer.job_id, step=step))

        try:
            out = await self.worker.render(run, msg.params, on_step)
        except RenderCancelled as exc:
            if run.pay_partial and exc.steps_done > 0:
                self._send_receipt(offer, offer_hash, b"", exc.steps_done, None)
                log.info("job_cancelled_paid", job=offer.job_id.hex()[:16], steps=exc.steps_done)
                return
            reason = run.reason or "cancelled"
            self.journal.mark_handed_back(offer.job_id, exc.steps_done, reason)
            self.send(HandBack(job_id=offer.job_id, steps_done=exc.steps_done, reason=reason))
            log.info("job_handed_back", job=offer.job_id.hex()[:16], steps=exc.steps_done)
            return
        except Exception as exc:  # a failed render must not take the session down
            log.error("render_failed", job=offer.job_id.hex()[:16], error=type(exc).__name__)
            self.journal.mark_handed_back(offer.job_id, run.steps_done, "render failed")
            self.send(HandBack(job_id=offer.job_id, steps_done=0, reason="render failed"))
            return
        meta = RenderMeta(
            backend=out.backend, device=out.device, dtype=out.dtype, threads=out.threads
        )
        self._send_receipt(offer, offer_hash, out.image, out.steps_done, meta)
        log.info("receipt_sent", job=offer.job_id.hex()[:16], steps=out.steps_done)

    def _send_receipt(
        self,
        offer: JobOffer,
        offer_hash: bytes,
        image: bytes,
        steps_done: int,
        meta: RenderMeta | None,
    ) -> None:
        """Sign, journal, then send. A partial receipt (cancelled job) has no image and is
        worth the steps done, pro rata."""
        receipt = Receipt(
            job_id=offer.job_id,
            offer_hash=offer_hash,
            worker=self.id.wallet_address,
            coordinator=self.coordinator,
            model_id=offer.model_id,
            result_hash=hashlib.sha256(image).digest(),
            steps_done=steps_done,
            work_units=offer.work_units * min(steps_done, offer.steps) // offer.steps,
            completed_at=int(time.time()),
        )
        signature = eip712.sign_receipt(self.id.wallet_key, self.id.domain, receipt)
        self.journal.record_receipt(receipt, signature)
        meta = meta or RenderMeta(backend=self.worker.backend.name, device="", dtype="", threads=0)
        self.send(
            Result(
                job_id=offer.job_id, image=image, receipt=receipt, signature=signature, meta=meta
            )
        )


async def pull_forever(
    new_session: Callable[[], PullSession], addr: str, sessions: set[PullSession], stop: trio.Event
) -> None:
    """Keep a session to `addr` open, reconnecting with capped exponential backoff."""
    delay = 0.5
    while not stop.is_set():
        session = new_session()
        sessions.add(session)
        started = time.monotonic()
        try:
            await session.run()
        except SessionRefused as exc:
            log.error("coordinator_refused", addr=addr, error=str(exc))
        except (TransportError, ProtocolError, OSError) as exc:
            log.warning("pull_session_ended", addr=addr, error=f"{type(exc).__name__}: {exc}")
        finally:
            sessions.discard(session)
        if time.monotonic() - started > 30:
            delay = 0.5
        with trio.move_on_after(delay):
            await stop.wait()
        delay = min(delay * 2, 30.0)
