"""One long-lived pull stream from this node to one trusted coordinator.

The node says who it is (capabilities bound to its wallet), then asks for work with `Ready`
credits. Every offer is checked (signer trusted, parameters match the signed hash, model
present, deadline ahead) before a slot renders it; every result goes back with a receipt
signed by the wallet and journaled first. Heartbeats flow both ways; a silent coordinator
ends the session and `pull_forever` reconnects with backoff.

One job can never take the node down. Each job is a task of its own (`_run_job`) in a nursery
that `pull_forever` owns; whatever it raises (render, journal, signing) is logged with the job
id prefix and the exception type only (never a message: it may quote the prompt), the job is
handed back, and the session and every other job carry on. A result that cannot be framed is
handed back by the writer without ending the stream.

Results are kept until acked. The image and its signed receipt are written to the journal
(`Journal.keep_result`, off the trio thread) before the result is queued, and deleted when
the coordinator's `ResultAck` arrives. A job outlives the session that offered it: if the
stream breaks mid-render the render finishes, and its result waits on disk.

Re-offers. An offer for a job this node already rendered (a restarted coordinator re-queues
every job without a receipt; a coordinator re-offers a job whose node reconnected) is answered
with the kept result, never a second render: the same image bytes and sha256, under the same
receipt and signature when the offer hash is the same. The hash usually differs (the offer's
deadline is new, and a restarted coordinator accepts only receipts naming offers it made since
it started), so the kept receipt is re-signed against the new offer: only `offerHash` and the
signature change, the image does not. An offer for a job still rendering here from an earlier
session waits for that render. Kept results are re-sent only when offered again, never unasked
on reconnect: after a coordinator restart the old offer hash is void, the refusal would drop
the result, and the re-offer would then render the job a second time. After a node restart the
same holds: the coordinator re-queued the job when the stream broke, and its re-offer gets the
kept result. Results never offered again (the job went to another node) are pruned after
`RESULT_KEEP_SECONDS` (`sogni_node.daemon`). After the coordinator rotated its offer key (a
`Welcome` whose `rotations` lead from a trusted key to its own; `sogni_node.trust`), a re-offer
from the new key for a result kept under an earlier key of that chain gets the same image
under a new receipt naming the new key: the old receipt is voided in the journal first.

Several coordinators of one network (`coordinators` lists them; `network_operators` and the
operator-signed set of their offer keys, `sogni_node.trust.NetworkSigners`): a coordinator is
trusted when its key is configured, reached by a rotation, or in the set. A re-offer from one
of them for a result kept under another's receipt gets the kept image re-signed for the new
offer, as after a rotation; a result kept for a coordinator that is gone is sent unasked to
another of the set (`forward`, driven by `sogni_node.daemon`), and a refusal there keeps it.

Crash points for the crash-matrix tests (`sogni_protocol.crashpoints`): `node_before_journal`
(rendered, receipt not journaled), `node_after_journal`, `node_before_send_result` and
`node_after_send_result` (around the frame's write to the stream).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, KeysView
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import msgspec
import trio

from sogni_net import Channel, Host, TransportError
from sogni_node.journal import Journal, StoredResult
from sogni_node.payout import signed_form
from sogni_node.render.backend import Backend, RenderCancelled, RenderJob
from sogni_node.render.trajectory import StepOpening
from sogni_node.trajectory_files import TrajectoryFiles
from sogni_node.trust import NetworkSigners, TrustedKeys, TrustFileError
from sogni_node.worker import NoFreeSlot, Running, Worker
from sogni_protocol import eip712
from sogni_protocol.crashpoints import crashpoint
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.framing import encode_frame
from sogni_protocol.ids import (
    CONTROL_FRAME_LIMIT,
    JOBS_PROTOCOL,
    RESULT_FRAME_LIMIT,
    unsupported_version,
)
from sogni_protocol.image_encoding import encoder_build
from sogni_protocol.logs import get_logger, where
from sogni_protocol.messages import (
    CHALLENGE_BUSY,
    NO_TRAJECTORY,
    Cancel,
    Capabilities,
    CapabilitiesUpdate,
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    DecodeVerified,
    Goodbye,
    HandBack,
    Heartbeat,
    HelloRefused,
    JobOffer,
    JobParams,
    Message,
    NodeHello,
    Offer,
    OfferDeclined,
    PixelsOpening,
    Progress,
    Ready,
    Receipt,
    RenderMeta,
    Result,
    ResultAck,
    ScalarEntry,
    StepOpeningWire,
    StepVerified,
    TensorDtype,
    TensorEntry,
    UnsupportedWireVersion,
    VerifyDecode,
    VerifyRefusalCode,
    VerifyRefused,
    VerifyRender,
    VerifyStep,
    Welcome,
    encode,
)
from sogni_protocol.rotation_chain import chain_fault, chain_keys, newly_trusted
from sogni_protocol.trajectory import TensorBytes

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

MIN_HEARTBEAT_INTERVAL = 0.2
"""Seconds: the shortest heartbeat interval a coordinator's `Welcome` can set on this node."""
MAX_CHECKS_WAITING = 16
"""Verifier checks (`VerifyStep`, `VerifyDecode`, `VerifyRender`) one session holds at once,
running or waiting their turn; more are refused at once, so a coordinator's burst of frames
(each up to `RESULT_FRAME_LIMIT`) never piles up in memory."""
MAX_CHALLENGES_WAITING = 64
"""Challenges one session holds at once, answering or waiting their turn: each loads a
trajectory file (megabytes for SDXL) and its answer may be megabytes, so a coordinator's
flood of small `Challenge` frames is refused at once past this, never thousands of tasks.
An honest coordinator challenges a sampled share of this node's jobs, far fewer."""
_READ_LIMIT = RESULT_FRAME_LIMIT
"""What the coordinator may send in one frame: a `VerifyStep` carries a committed latent
(64 KiB at 512 x 512, more with multistep state), above a control frame."""

_WRITE_BATCH = 64
"""At most this many queued messages leave in one stream write."""

PROGRESS_INTERVAL = 0.5
"""Seconds between progress frames of one job: its first step always (a listening client
sees it start), then at most one per interval, none for its last step."""

OVERTIME_FLOOR = 60.0
"""A render stops (handed back) once past its offer's deadline by as long as the offer gave
it, and at least this many seconds: a late result is still paid while the job waits, but by
then another node has had as long again for it (`Worker.render`'s `give_up_at`)."""

P = ParamSpec("P")
T = TypeVar("T")
_Reply = TypeVar("_Reply", StepVerified, DecodeVerified)


@dataclass(frozen=True)
class NodeIdentity:
    wallet_address: str
    wallet_key: bytes
    domain: Domain
    trusted: frozenset[str]
    """Lower-case coordinator signing addresses whose offers this node accepts."""
    payout: str | None = None
    """The account its receipts pay (`payout_address`), signed into each; None: the wallet."""
    network: NetworkSigners | None = None
    """The network's operator-signed signer set (`network_operators`); None: none configured."""


class SessionRefused(Exception):
    """The coordinator refused this node (it said why), is not one we trust, speaks another
    wire version, or settles on another chain."""


@dataclass
class _Job:
    """One offer this session answers: exactly one Result, HandBack or OfferDeclined."""

    msg: Offer
    offer_hash: bytes
    run: Running | None
    """The claimed slot; None until the job needs one (a kept result needs none)."""
    in_hand: bool = False
    """Accepted with every slot busy: it waits for the next free slot (pipelined credit)."""
    recorded: bool = False
    """Its signed offer is journaled (done while in hand, so the render starts at once)."""
    stage: str = "other"
    """What it was doing last, for `jobs_failed_total{stage}` (`worker.FAILURE_STAGES`)."""

    @property
    def id(self) -> bytes:
        return self.msg.offer.job_id

    @property
    def tag(self) -> str:
        return self.id.hex()[:16]


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
        trajectories: TrajectoryFiles | None = None,
        direct: bool = True,
    ) -> None:
        self.host = host
        self.direct = direct
        self.trajectories = trajectories
        self.addr = addr
        self.id = identity
        self.worker = worker
        self.journal = journal
        self.caps = capabilities
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.read_timeout = heartbeat_timeout
        """How long the reader waits for a frame: the node's own timeout, or longer for a
        coordinator whose `Welcome` says it beats less often (it is silent that long)."""
        self.coordinator = ""
        self.previous_keys: frozenset[str] = frozenset()
        """The coordinator's earlier offer keys (lower-case), from its verified rotations."""
        self.network_keys: frozenset[str] = frozenset()
        """Every signer of the network's set when this coordinator is one of them (lower-case):
        a re-offer or challenge from it may concern a job another of them offered."""
        self._forwarded: set[bytes] = set()
        """Kept results sent here unasked, offered by another coordinator of the network that
        is gone (`forward`): a refusal keeps them for a re-offer instead of voiding them."""
        self._out_send, self._out_recv = trio.open_memory_channel[Message](math.inf)
        self._live: dict[bytes, _Job] = {}
        """Jobs offered on this session and not yet answered, each with the render it
        claimed (if any): what a `Cancel` of this session may stop (`_on_cancel`)."""
        self._cancelled: set[bytes] = set()
        self.closed = trio.Event()
        self._on_connected = on_connected
        self._slot_freed: Callable[[], None] = self.offer_ready
        self._error: Exception | None = None
        self._challenge_limiter = trio.CapacityLimiter(1)
        """Challenges answered one at a time (each loads a trajectory file)."""
        self._verify_limiter = trio.CapacityLimiter(1)
        """Steps re-run for the coordinator one at a time (`VerifyStep`: a UNet call each)."""
        self._checks_waiting = 0
        """Verifier checks of this session running or waiting for `_verify_limiter`."""
        self._challenges_waiting = 0
        """Challenges of this session answering or waiting for `_challenge_limiter`."""
        self._result_sent: dict[bytes, float | None] = {}
        """The results this session wrote that are not acked yet, and when each was written
        (None while it is being written): only their acks are journaled (`_on_ack`), and the
        round trip sets the lookahead."""
        self._acks: list[tuple[bytes, bool, str]] = []
        """Acks received, not yet journaled (`_journal_acks` writes them in batches)."""
        self._acks_waiting = trio.Event()
        self._acks_pending: set[bytes] = set()
        """Jobs whose ack arrived and is not yet committed (queued or being written)."""
        self._acks_flushed = trio.Event()
        """Set (and replaced) whenever a batch of acks has been written."""

    def send(self, msg: Message) -> None:
        try:
            self._out_send.send_nowait(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the session is over; a kept result waits for the re-offer

    def offer_ready(self) -> None:
        self.send(Ready(slots=self.capacity(), warm_models=self.worker.warm_models()))

    def capacity(self) -> int:
        """Offers this session may hold, its own included: every slot plus the worker's
        `lookahead` in hand, less what other sessions' jobs hold; 0 while draining. A
        coordinator that does not pipeline caps it at `slots` (and counts its offers in flight
        against it); one that pipelines less deeply at its own most."""
        if self.worker.draining or self._journal_fault is not None:
            return 0  # a job it could not journal would be work it cannot prove
        others = sum(1 for j in self.worker.running if j not in self.jobs)
        others += sum(1 for j in self.worker.in_hand if j not in self.jobs)
        return max(0, self.worker.slots + self.worker.advertise() - others)

    @property
    def _journal_fault(self) -> str | None:
        """Why the journal cannot be written now (`Journal.write_fault`): no job is taken."""
        return getattr(self.journal, "write_fault", None)  # tests may run without a journal

    async def run(
        self, jobs: trio.Nursery | None = None, slot_freed: Callable[[], None] | None = None
    ) -> None:
        """Serve until the stream ends. Job tasks go to `jobs` (they outlive the session)
        or, without it, to a nursery of the session's own that it waits for. `slot_freed`
        is called whenever a job ends (default: this session's `Ready`)."""
        if slot_freed is not None:
            self._slot_freed = slot_freed
        try:
            if jobs is not None:
                await self._run(jobs)
            else:
                async with trio.open_nursery() as own:
                    await self._run(own)
        finally:
            self._out_send.close()
            self.closed.set()
            self.worker.wake()  # its offers in hand give up: the coordinator re-queued them

    async def _run(self, jobs: trio.Nursery) -> None:
        channel = await self.host.open_channel(
            self.addr, JOBS_PROTOCOL, timeout=10.0, direct=self.direct
        )
        try:
            await self._handshake(channel)
            async with trio.open_nursery() as io:
                io.start_soon(self._guard, functools.partial(self._reader, channel, jobs), io)
                io.start_soon(self._journal_acks)
                self.offer_ready()
                await self._guard(functools.partial(self._writer, channel), io)  # ends on Goodbye
                io.cancel_scope.cancel()
            if self._error is not None:
                raise self._error
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await channel.close()

    async def _guard(self, fn: Callable[[], Awaitable[None]], io: trio.Nursery) -> None:
        """Turn an expected stream failure into a clean end of the session (no exception group)."""
        try:
            await fn()
        except (TransportError, ProtocolError, SessionRefused) as exc:
            self._error = self._error or exc
            io.cancel_scope.cancel()

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
        if (welcome.chain_id, welcome.verifying_contract.lower()) != (
            self.id.domain.chain_id,
            self.id.domain.verifying_contract.lower(),
        ):
            raise SessionRefused(
                f"coordinator settles on chain {welcome.chain_id} / "
                f"{welcome.verifying_contract}, this node on {self.id.domain.chain_id} / "
                f"{self.id.domain.verifying_contract}"
            )
        await self._trust(welcome)
        self.coordinator = welcome.coordinator
        # the coordinator may ask for more frequent heartbeats, down to a floor: each is a
        # frame and a `Ready` both ways, and a tiny interval would send them every loop turn
        asked = max(MIN_HEARTBEAT_INTERVAL, welcome.heartbeat_interval)
        self.heartbeat_interval = min(self.heartbeat_interval, asked)
        # a coordinator beating every 20 s (its config allows any interval under its own
        # timeout) would otherwise time out every idle node after 15 s, re-queueing its jobs
        self.read_timeout = max(self.heartbeat_timeout, 3 * welcome.heartbeat_interval)
        if self._on_connected is not None:
            self._on_connected({"event": "connected", "coordinator": welcome.coordinator})

    async def _trust(self, welcome: Welcome) -> None:
        """Accept the welcoming key if it is trusted: configured, persisted after an earlier
        rotation (`sogni_node.trust`), or reached from either through `welcome.rotations`
        (then persisted, and `coordinator_key_rotated` logged). A chain that does not verify
        is refused even for a trusted key. Sets `self.id.trusted` for this session's offers
        and `previous_keys` (the coordinator's earlier keys) for re-offers of kept results."""
        chain, key = welcome.rotations, welcome.coordinator
        fault = chain_fault(self.id.domain, chain, key, time.time())
        if fault is not None:
            raise SessionRefused(
                f"coordinator {key} sent key rotations that do not verify: {fault}"
            )
        configured = self.id.trusted
        network: frozenset[str] = frozenset()
        if self.id.network is not None:  # re-read each connect: the operator adds coordinators
            if welcome.signer_set is not msgspec.UNSET:  # checked as any copy; kept if newer
                await _off_loop(self.id.network.take, welcome.signer_set, f"welcome from {key}")
            network = await _off_loop(self.id.network.current)
        trusted = configured | network
        if key.lower() not in trusted:  # the trust file is read only when it matters
            store = TrustedKeys.in_dir(self.journal.path.parent)  # data_dir: journal.db's
            try:
                trusted = trusted | (await _off_loop(store.load, configured)).keys()
            except TrustFileError as exc:
                log.error("trust_file_unreadable", error=str(exc))
        if key.lower() not in trusted:
            links = newly_trusted(chain, trusted)
            if links is None:
                via = " nor reachable from them by its key rotations" if chain else ""
                if self.id.network is not None:
                    via += " nor in the network's signer set"
                raise SessionRefused(f"coordinator {key} is not in trusted_coordinators{via}")
            try:
                await _off_loop(store.add, links, configured)
            except OSError as exc:  # trusted for this session all the same
                log.error("trust_not_saved", error=type(exc).__name__)
            for old, new in links:
                log.info("coordinator_key_rotated", old=old, new=new)
        self.previous_keys = frozenset(k.lower() for k in chain_keys(chain)[:-1])
        self.network_keys = network if key.lower() in network else frozenset()
        self.id = dataclasses.replace(self.id, trusted=trusted | {key.lower()})

    # --- the stream ----------------------------------------------------------------------
    async def _writer(self, channel: Channel) -> None:
        """Everything queued when it wakes leaves in one stream write (a result and the
        `Ready` behind it, a burst of hand-backs): one yamux frame and one Noise record."""
        seq = 0
        while True:
            msg: Message | None = None
            with trio.move_on_after(self.heartbeat_interval):
                msg = await self._out_recv.receive()
            if msg is None:  # quiet for a heartbeat interval
                seq += 1
                await channel.send(Heartbeat(seq=seq), timeout=self.heartbeat_timeout)
                # and the credit again: a Ready lost or counted at the wrong moment (several
                # coordinators) would otherwise leave an idle node idle for good
                self.offer_ready()
                continue
            batch = [msg]
            while len(batch) < _WRITE_BATCH and not isinstance(batch[-1], Goodbye):
                try:
                    batch.append(self._out_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._write(channel, batch)  # never under the heartbeat's timer: a frame
            if isinstance(batch[-1], Goodbye):  # cut short would break the stream
                return

    async def _write(self, channel: Channel, batch: list[Message]) -> None:
        frames: list[bytes] = []
        for msg in batch:
            frame = self._frame(msg)
            if frame is not None:
                frames.append(frame)
        results = [msg.job_id for msg in batch if isinstance(msg, Result)]
        if results:
            self._result_sent.update(dict.fromkeys(results))  # before: its ack may come first
            crashpoint("node_before_send_result")
        await channel.send_frames(frames, timeout=60.0)
        if results:
            crashpoint("node_after_send_result")
            now = time.monotonic()
            for job_id in results:
                if job_id in self._result_sent:  # not acked while it was written
                    self._result_sent[job_id] = now

    def _frame(self, msg: Message) -> bytes | None:
        """`msg` framed for the stream, or None if it is too large for one frame (then what
        answers it instead is queued: a hand-back or a refusal)."""
        is_result = isinstance(msg, Result)
        large = is_result or isinstance(msg, ChallengeAnswer | StepVerified | DecodeVerified)
        limit = RESULT_FRAME_LIMIT if large else CONTROL_FRAME_LIMIT
        payload = encode(msg)
        if len(payload) > limit:  # this message's problem, not the stream's
            log.error("message_too_large", type=type(msg).__name__, size=len(payload))
            if isinstance(msg, Result):
                self.worker.job_failed(msg.receipt.model_id, "upload")
                self.send(HandBack(job_id=msg.job_id, steps_done=0, reason="result too large"))
            elif isinstance(msg, ChallengeAnswer):
                reason = f"answer too large ({len(payload)} bytes): ask for fewer steps"
                self.send(ChallengeRefused(job_id=msg.job_id, reason=reason))
            elif isinstance(msg, StepVerified | DecodeVerified):
                self.send(
                    VerifyRefused(
                        check_id=msg.check_id, reason="answer too large", code="too_large"
                    )
                )
            return None
        return encode_frame(payload, limit)

    def update_capabilities(self, caps: Capabilities) -> None:
        """What this node renders changed while it runs (a model or LoRA added or removed):
        offers are checked against `caps` from now on, and the coordinator hears of it in a
        `CapabilitiesUpdate` signed like the hello. Queued, so before the welcome it goes out
        right after it."""
        self.caps = caps
        signature = eip712.sign_binding(self.id.wallet_key, self.id.domain, caps)
        self.send(CapabilitiesUpdate(capabilities=caps, binding_signature=signature))

    def finish(self) -> None:
        """Say goodbye after everything already queued (results, hand-backs) has gone out."""
        self.send(Goodbye(reason="node shutting down"))

    async def _reader(self, channel: Channel, jobs: trio.Nursery) -> None:
        while True:
            msg = await channel.receive(limit=_READ_LIMIT, timeout=self.read_timeout)
            if isinstance(msg, Offer):
                self._on_offer(msg, jobs)
            elif isinstance(msg, Cancel):
                self._on_cancel(msg)
            elif isinstance(msg, ResultAck):
                self._on_ack(msg)
            elif isinstance(msg, Challenge):
                jobs.start_soon(self._on_challenge, msg)
            elif isinstance(msg, VerifyStep):
                jobs.start_soon(self._on_verify, msg)
            elif isinstance(msg, VerifyDecode):
                jobs.start_soon(self._on_verify_decode, msg)
            elif isinstance(msg, VerifyRender):
                jobs.start_soon(self._on_verify_render, msg)
            elif isinstance(msg, Heartbeat):
                pass
            elif isinstance(msg, Goodbye):  # the coordinator ends the session: say why
                raise SessionRefused(f"coordinator ended the session: {msg.reason}")
            elif isinstance(msg, HelloRefused):  # a `CapabilitiesUpdate` it would not take
                log.error("capabilities_refused", coordinator=self.coordinator, error=msg.reason)
            else:
                log.warning("unexpected_message", type=type(msg).__name__)

    @property
    def jobs(self) -> KeysView[bytes]:
        """Jobs offered on this session and not yet answered."""
        return self._live.keys()

    def answered_here(self, job_id: bytes) -> bool:
        """This session holds `job_id`, sent its result or has its ack on the way to the
        journal: not a result an earlier session left to send again (`_forward_orphans`)."""
        return job_id in self._live or job_id in self._result_sent or job_id in self._acks_pending

    def _claim(self, job_id: bytes) -> Running:
        """A slot for `job_id`, owned by this session (`Running.owner`)."""
        run = self.worker.claim(job_id)
        run.owner = self
        return run

    def _on_cancel(self, msg: Cancel) -> None:
        """Stop this session's job: its render if it claimed one, else its wait (in hand, or
        behind another session's render of the same job id). That render is stopped only if
        its session has ended and was this coordinator's (a reconnect): another's render goes
        on, since its partial receipt would answer an offer that was not cancelled."""
        job = self._live.get(msg.job_id)
        if job is None:  # never another session's job
            return
        self._cancelled.add(msg.job_id)
        self.worker.wake()  # an offer in hand gives up its wait
        running = self.worker.running.get(msg.job_id)
        if running is None:
            return
        owner = running.owner  # the session that claimed it: ended, and this coordinator's
        closed = getattr(owner, "closed", None)  # (it reconnected), nobody else stops it
        mine = isinstance(getattr(owner, "coordinator", None), str) and eip712.same_address(
            owner.coordinator, self.coordinator
        )
        if running is job.run or (closed is not None and closed.is_set() and mine):
            self.worker.cancel(msg.job_id, "cancelled by coordinator", pay_partial=msg.pay_partial)

    def forward(self, result: Result) -> None:
        """Send a kept result whose coordinator is gone to this one (same receipt, same
        signature): a coordinator of the same network accepts it against the shared offer
        record. A refusal leaves it kept (`_on_ack`)."""
        self._forwarded.add(result.job_id)
        self.send(result)

    def _on_ack(self, msg: ResultAck) -> None:
        """Queue the answer for the journal (`_journal_acks`), which drops the kept image
        (accepted: delivered; refused: void), except a refused forwarded result: kept for
        its own coordinator or a re-offer."""
        job = msg.job_id.hex()[:16]
        if msg.job_id not in self._result_sent:  # a result not sent on this session: its
            log.warning("unexpected_ack", job=job, coordinator=self.coordinator)
            return  # ack would void (or drop) a result kept for another session or coordinator
        sent = self._result_sent.pop(msg.job_id)
        if sent is not None:
            self.worker.note_round_trip(time.monotonic() - sent)
        if msg.job_id in self._forwarded:
            self._forwarded.discard(msg.job_id)
            if not msg.accepted:
                log.warning("forwarded_result_refused", job=job, reason=msg.reason)
                return
            log.info("forwarded_result_accepted", job=job, coordinator=self.coordinator)
        self._acks.append((msg.job_id, msg.accepted, msg.reason))
        self._acks_pending.add(msg.job_id)
        self._acks_waiting.set()
        if not msg.accepted:
            log.warning("receipt_refused", job=job, reason=msg.reason)

    async def _journal_acks(self) -> None:
        """Journal acks off the event loop, all that arrived meanwhile in one commit: the
        reader never waits on the disk (the next offer rides in the ack's write), and a busy
        node makes one thread hop per batch, not per job. An ack lost with the process is
        harmless: its receipt reads un-acked and is resent, and the coordinator acks again."""
        try:
            while True:
                await self._acks_waiting.wait()
                await self._flush_acks()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_acks()

    async def _flush_acks(self) -> None:
        batch, self._acks = self._acks, []
        self._acks_waiting = trio.Event()
        if not batch:
            return
        try:
            await _off_loop(self.journal.mark_acked_many, batch)
        except Exception as exc:  # the images stay until pruned; the session carries on
            log.error("ack_not_journaled", jobs=len(batch), error=type(exc).__name__)
        finally:
            self._acks_pending.difference_update(job_id for job_id, _, _ in batch)
            flushed, self._acks_flushed = self._acks_flushed, trio.Event()
            flushed.set()

    async def _ack_journaled(self, job_id: bytes) -> None:
        """Wait until an ack of `job_id` that has arrived is in the journal. A refusal and
        the job's re-offer ride in one write: the re-offer must find the refusal journaled
        (and render again), not resend the refused result as if still unanswered."""
        while job_id in self._acks_pending:
            await self._acks_flushed.wait()

    # --- challenges ----------------------------------------------------------------------
    async def _on_challenge(self, msg: Challenge) -> None:
        """Open the asked leaves of the job's kept trajectory (off the event loop) and send
        them, or a `ChallengeRefused` saying why not. Never raises; logs no parameters."""
        job = msg.job_id.hex()[:16]
        reply: ChallengeAnswer | ChallengeRefused | None
        if self._challenges_waiting >= MAX_CHALLENGES_WAITING:
            waiting = self._challenges_waiting
            why = f"{CHALLENGE_BUSY} {waiting} challenges waiting"
            reply = ChallengeRefused(job_id=msg.job_id, reason=why)
        else:
            self._challenges_waiting += 1
            try:
                reply = await self._answer_in_turn(msg)
            finally:
                self._challenges_waiting -= 1
        if reply is None:  # the session ended or the deadline passed while it waited
            log.info("challenge_dropped", job=job)
            return
        if isinstance(reply, ChallengeRefused):
            log.warning("challenge_refused", job=job, reason=reply.reason)
        else:
            opened = reply.pixels is not msgspec.UNSET  # never the pixels themselves
            log.info("challenge_answered", job=job, steps=len(reply.openings), pixels=opened)
        self.send(reply)

    async def _answer_in_turn(self, msg: Challenge) -> ChallengeAnswer | ChallengeRefused | None:
        """`_answer` off the event loop, one at a time; None when no one would read it."""
        async with self._challenge_limiter:
            if self.closed.is_set() or msg.deadline <= time.time():
                return None
            try:
                return await trio.to_thread.run_sync(self._answer, msg)
            except Exception as exc:  # a broken file or a bug: refuse, keep the session
                log.error("challenge_failed", job=msg.job_id.hex()[:16], error=type(exc).__name__)
                return ChallengeRefused(
                    job_id=msg.job_id, reason="the node could not open its trajectory"
                )

    def _answer(self, msg: Challenge) -> ChallengeAnswer | ChallengeRefused:
        """Blocking: read the journal and the trajectory file."""

        def refuse(reason: str) -> ChallengeRefused:
            return ChallengeRefused(job_id=msg.job_id, reason=reason)

        offer = self.journal.offer(msg.job_id)
        ours = offer is not None and (  # an offer of this coordinator's earlier key counts
            eip712.same_address(offer.coordinator, self.coordinator)
            or offer.coordinator.lower() in self.previous_keys
            or offer.coordinator.lower() in self.network_keys  # or another of its network's
        )
        if offer is None or not ours:
            return refuse("this node rendered no such job for this coordinator")
        if self.trajectories is None:
            return refuse("this node keeps no trajectories")
        trajectory = self.trajectories.load(msg.job_id)
        if trajectory is None:
            return refuse("no trajectory kept for this job (expired or lost)")
        outside = [k for k in msg.steps if k >= trajectory.n_leaves]
        if outside:
            return refuse(f"steps {outside} outside the {trajectory.n_leaves} committed leaves")
        openings = [_opening_wire(trajectory.open(k)) for k in msg.steps]
        pixels: PixelsOpening | msgspec.UnsetType = msgspec.UNSET
        if msg.pixels is True:  # only asked of a node naming OPEN_PIXELS_FEATURE
            png = self.trajectories.load_pixels(msg.job_id)
            if png is not None:  # else the coordinator checks by the block rule
                pixels = PixelsOpening(png=png, encoder=encoder_build())
        return ChallengeAnswer(job_id=msg.job_id, openings=openings, pixels=pixels)

    # --- work for the coordinator's checks (docs/VERIFICATION.md, docs/IMAGE_CHECK.md) ------
    async def _verifier_work(
        self,
        msg: VerifyStep | VerifyDecode | VerifyRender,
        work: Callable[[Any], _Reply | VerifyRefused],
        failed: str,
        doing: str,
    ) -> _Reply | VerifyRefused:
        """`work(msg)` off the event loop, one check at a time (a UNet call or a VAE decode
        each), unless the deadline passed (before or while it waited its turn) or
        `MAX_CHECKS_WAITING` wait already (each holds its message, up to a result frame:
        refused at once, code `other`, which says nothing about the worker); a crash is a
        refusal, never the session's end. A ValueError blames the worker's leaf (wrong shape,
        not finite, state missing)."""

        def refused(reason: str, code: VerifyRefusalCode) -> VerifyRefused:
            return VerifyRefused(check_id=msg.check_id, reason=reason, code=code)

        if msg.deadline <= time.time():
            return refused("deadline already passed", "deadline")
        if self._checks_waiting >= MAX_CHECKS_WAITING:
            return refused(f"busy: {self._checks_waiting} checks already waiting", "other")
        self._checks_waiting += 1
        try:
            async with self._verify_limiter:
                if msg.deadline <= time.time() or self.closed.is_set():
                    return refused("deadline passed while the check waited its turn", "deadline")
                try:
                    return await trio.to_thread.run_sync(work, msg)
                except Exception as exc:  # a bug or a bad tensor: refuse, keep the session
                    log.error(failed, check=msg.check_id.hex()[:16], error=type(exc).__name__)
                    code: VerifyRefusalCode = "bad_leaf" if isinstance(exc, ValueError) else "other"
                    return refused(f"the node {doing} ({type(exc).__name__})", code)
        finally:
            self._checks_waiting -= 1

    def _serving_refusal(
        self, msg: VerifyStep | VerifyDecode | VerifyRender, what: str
    ) -> VerifyRefused | None:
        """Why this node cannot do `what` for `msg` at all (not the diffusers backend, the
        model not served, a size over its `max_pixels`, another numeric mode than the
        declared one), or None."""
        from sogni_node.render.diffusers_backend import DiffusersBackend

        def refuse(reason: str, code: VerifyRefusalCode) -> VerifyRefused:
            return VerifyRefused(check_id=msg.check_id, reason=reason, code=code)

        backend = self.worker.backend
        if not isinstance(backend, DiffusersBackend):
            return refuse(f"the {backend.name} backend cannot {what}", "backend")
        if msg.model_id not in self.caps.models:
            return refuse(f"model {msg.model_id} is not served here", "model")
        if isinstance(msg, VerifyDecode):
            width, height = msg.width, msg.height
        else:
            width, height = msg.params.width, msg.params.height
        limit = self.caps.max_pixels
        if limit and width * height > limit:  # what this node would not render: a step too
            return refuse(f"{width}x{height} is over this node's max_pixels", "too_large")
        if backend.dtype_name != msg.dtype:
            declared = {VerifyStep: "step", VerifyDecode: "image"}.get(type(msg), "check")
            return refuse(
                f"this node runs {backend.dtype_name}, the {declared} declared {msg.dtype}", "mode"
            )
        return None

    def _job_to_check(self, check_id: bytes, params: JobParams) -> RenderJob | VerifyRefused:
        """The backend job for a check's parameters, or a `loras` refusal when one of its
        LoRAs is not installed here (blocking: LoRA files are hashed)."""
        from sogni_node.worker import _render_job

        try:
            return _render_job(params, self.worker.loras)
        except Exception as exc:  # a LoRA not installed here
            reason = f"the job's LoRAs are not available here ({type(exc).__name__})"
            return VerifyRefused(check_id=check_id, reason=reason, code="loras")

    # --- re-running another node's step (docs/VERIFICATION.md, "Verifier nodes") ----------
    async def _on_verify(self, msg: VerifyStep) -> None:
        """Re-run step k of someone's render (off the event loop, one at a time) and send
        x'_{k+1}, or a `VerifyRefused` saying why not. Never raises; logs neither the prompt
        nor any other parameter (exceptions by type only)."""
        check = msg.check_id.hex()[:16]
        reply = await self._verifier_work(
            msg, self._verify, "verify_failed", "could not re-run the step"
        )
        if isinstance(reply, VerifyRefused):
            log.warning("verify_refused", check=check, reason=reply.reason)
        else:
            log.info("step_reverified", check=check, k=msg.k)
        self.send(reply)

    def _verify(self, msg: VerifyStep) -> StepVerified | VerifyRefused:
        """Blocking: load the model if needed and run one UNet step under its lock."""
        import torch

        from sogni_node.render.diffusers_backend import SCHEDULERS, DiffusersBackend
        from sogni_node.render.lora import applied_loras
        from sogni_node.verify import step_check as sc

        def refuse(reason: str, code: VerifyRefusalCode) -> VerifyRefused:
            return VerifyRefused(check_id=msg.check_id, reason=reason, code=code)

        refused = self._serving_refusal(msg, "re-run a step")
        if refused is not None:
            return refused
        backend = self.worker.backend
        assert isinstance(backend, DiffusersBackend)
        if msg.params.loras and not backend.supports_loras:
            return refuse("this node cannot apply LoRAs", "loras")
        name = msg.scheduler or backend.registry.get(msg.model_id).default_scheduler
        if name and name not in SCHEDULERS:
            return refuse(f"unknown scheduler {name!r}", "scheduler")
        job = self._job_to_check(msg.check_id, msg.params)
        if isinstance(job, VerifyRefused):
            return job
        with backend.holding(msg.model_id) as loaded:
            if name:
                cls, overrides = SCHEDULERS[name]
                scheduler = cls.from_config(loaded.scheduler_config, **overrides)
            else:
                scheduler = loaded.scheduler_cls.from_config(loaded.scheduler_config)
            if type(scheduler).__name__ not in sc.SUPPORTED_SCHEDULERS:
                return refuse(f"{type(scheduler).__name__} steps cannot be re-run", "scheduler")

            entries = {t.name: t for t in msg.opening.tensors}
            committed = entries["latents"]
            x_k = _tensor(committed)
            scale = 1.0
            if msg.k == 0:  # leaf 0 is the unscaled noise
                scale = float(sc.fresh_scheduler(scheduler, job.steps, "cpu").init_noise_sigma)
                x_k = x_k * scale
            outputs = sorted(
                (n for n in entries if n.startswith("model_outputs.")),
                key=lambda n: int(n.rsplit(".", 1)[1]) if n.rsplit(".", 1)[1].isdigit() else 0,
            )
            state = sc.StepState(tuple(_tensor(entries[n]) for n in outputs)) if outputs else None
            if msg.k >= 1 and state is None and type(scheduler).__name__.startswith("DPMSolver"):
                return refuse(f"leaf {msg.k} carries no multistep state", "bad_leaf")
            with loaded.lock:
                torch.set_num_threads(backend.threads)  # process-global: set under the lock
                with applied_loras(loaded.pipe, job.loras):
                    x_pred = sc.recompute_step(
                        loaded.pipe,
                        prompt=job.prompt,
                        negative_prompt=job.negative_prompt or None,
                        guidance=job.guidance,
                        steps=job.steps,
                        width=job.width,
                        height=job.height,
                        seed=job.seed,
                        scheduler=scheduler,
                        k=msg.k,
                        latents_k=x_k,
                        scheduler_state=state,
                    )
            out = x_pred.detach().to("cpu", torch.float32).reshape(committed.shape).contiguous()
            data = out.numpy().astype("<f4").tobytes()
            latents = TensorEntry(name="latents", dtype="float32", shape=list(out.shape), data=data)
            start: float | None = None
            if msg.k == 0:  # the seed check: leaf 0 must be this seed's noise, unscaled, as the
                # compute dtype rounds it (docs/VERIFICATION.md, "Seed check")
                start = sc.seed_distance(
                    loaded.pipe,
                    _tensor(committed),
                    seed=job.seed,
                    width=job.width,
                    height=job.height,
                    dtypes=(backend.dtype,),
                )
            return StepVerified(
                check_id=msg.check_id, latents=latents, x_k_scale=scale, start_distance=start
            )

    # --- decoding another node's final latent (docs/IMAGE_CHECK.md) ------------------------
    async def _on_verify_decode(self, msg: VerifyDecode) -> None:
        """Decode someone's committed final latent (off the event loop, one check at a time,
        as `_on_verify`) and send the image as a PNG, or a `VerifyRefused` saying why not.
        Never raises; logs no image (exceptions by type only)."""
        await self._answer_with_image(
            msg, self._decode, "could not decode the final latent", ("decode", "latent_decoded")
        )

    async def _answer_with_image(
        self,
        msg: VerifyDecode | VerifyRender,
        work: Callable[[Any], DecodeVerified | VerifyRefused],
        doing: str,
        events: tuple[str, str],
    ) -> None:
        """`work(msg)` as `_verifier_work` runs it, then send the image or the refusal;
        `events`: the log events' prefix (`<prefix>_failed`, `<prefix>_refused`) and the
        event of an answer (which logs the image's size only)."""
        check = msg.check_id.hex()[:16]
        prefix, done = events
        reply = await self._verifier_work(msg, work, f"{prefix}_failed", doing)
        if isinstance(reply, VerifyRefused):
            log.warning(f"{prefix}_refused", check=check, reason=reply.reason, code=reply.code)
        else:
            log.info(done, check=check, size=len(reply.image))
        self.send(reply)

    def _decode(self, msg: VerifyDecode) -> DecodeVerified | VerifyRefused:
        """Blocking: load the model if needed and decode leaf N under the model's lock."""
        import torch

        from sogni_node.render.diffusers_backend import DiffusersBackend
        from sogni_node.verify.decode_check import decode_png, final_latent_shape

        def refuse(reason: str, code: VerifyRefusalCode) -> VerifyRefused:
            return VerifyRefused(check_id=msg.check_id, reason=reason, code=code)

        refused = self._serving_refusal(msg, "decode a latent")
        if refused is not None:
            return refused
        backend = self.worker.backend
        assert isinstance(backend, DiffusersBackend)
        latents = [t for t in msg.opening.tensors if t.name == "latents"]
        if len(latents) != 1:  # bytes are float32 whatever `dtype` it was computed in
            raise ValueError("the opening carries no final latent")
        with backend.holding(msg.model_id) as loaded:
            if final_latent_shape(loaded.pipe, width=msg.width, height=msg.height) is None:
                return refuse("this model's latents cannot be decoded here", "backend")
            x = _tensor(latents[0])
            with loaded.lock:
                torch.set_num_threads(backend.threads)  # process-global: set under the lock
                image = decode_png(
                    loaded.pipe, x, width=msg.width, height=msg.height, dtype=backend.dtype
                )
            return DecodeVerified(check_id=msg.check_id, image=image)

    # --- rendering another node's job again (docs/VERIFICATION.md, "Whole re-render") -----
    async def _on_verify_render(self, msg: VerifyRender) -> None:
        """Render someone's job again (off the event loop, one check at a time, as
        `_on_verify`) and send the image as a PNG, or a `VerifyRefused` saying why not. Never
        raises; logs neither the prompt nor the image."""
        await self._answer_with_image(
            msg, self._rerender, "could not render the job again", ("rerender", "job_rerendered")
        )

    def _rerender(self, msg: VerifyRender) -> DecodeVerified | VerifyRefused:
        """Blocking: the job's whole render in this node's mode, as a lossless PNG."""
        from sogni_node.render.diffusers_backend import SCHEDULERS

        def refuse(reason: str, code: VerifyRefusalCode) -> VerifyRefused:
            return VerifyRefused(check_id=msg.check_id, reason=reason, code=code)

        refused = self._serving_refusal(msg, "render a job again")
        if refused is not None:
            return refused
        params = msg.params
        if params.scheduler and params.scheduler not in SCHEDULERS:
            return refuse(f"unknown scheduler {params.scheduler!r}", "scheduler")
        backend = self.worker.backend
        render = backend.render
        weights = msg.weights if isinstance(msg.weights, str) else ""
        if weights:  # the worker's 4-bit / fp8 weights, reproduced here
            from sogni_node.render.diffusers_backend import DiffusersBackend
            from sogni_node.render.quantize import parse_weights

            if not isinstance(backend, DiffusersBackend) or backend.quantize != "none":
                return refuse(f"this node cannot render with {weights} weights", "mode")
            try:
                parse_weights(weights)
            except ValueError as exc:
                return refuse(str(exc), "mode")
            render = functools.partial(backend.render, weights=weights)
        job = self._job_to_check(msg.check_id, params)
        if isinstance(job, VerifyRefused):
            return job

        def stop() -> bool:  # from the render thread: the session ended, or no answer counts
            return self.closed.is_set() or time.time() > msg.deadline

        try:
            out = render(dataclasses.replace(job, output_format="png"), lambda _: None, stop)
        except ValueError as exc:  # never `bad_leaf`: a re-render opens nothing of the worker's
            return refuse(f"the node could not render the job ({type(exc).__name__})", "other")
        if isinstance(msg.start_latents, TensorEntry):  # the seed check of a re-render
            start = _seed_distance(backend, params, msg.start_latents)
            return DecodeVerified(check_id=msg.check_id, image=out.image, start_distance=start)
        return DecodeVerified(check_id=msg.check_id, image=out.image)

    # --- offers --------------------------------------------------------------------------
    def _check_offer(self, msg: Offer, offer_hash: bytes) -> str | None:
        """Why this node refuses `msg` (`offer_hash`: its EIP-712 digest, computed once for
        the check and the receipt), or None."""
        offer = msg.offer
        try:
            eip712.check_version(self.id.domain)
            signer = eip712.recover_digest(offer_hash, msg.signature)
        except ProtocolError as exc:
            return str(exc)
        if signer.lower() not in self.id.trusted:
            return f"offer signed by untrusted key {signer}"
        if not eip712.same_address(signer, self.coordinator):
            return "offer signed by a key other than this session's coordinator"
        if not eip712.same_address(offer.coordinator, self.coordinator):
            return "offer names another coordinator"
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
        limit = self.caps.max_pixels
        if limit and offer.width * offer.height > limit:  # the memory it would need
            return f"{offer.width}x{offer.height} is over this node's max_pixels ({limit})"
        missing = [lora.id for lora in p.loras if lora.id not in self.caps.loras]
        if missing:
            return f"LoRA {', '.join(missing)} not installed here"
        if len({lora.id for lora in p.loras}) < len(p.loras):  # each copy merged again
            return "a LoRA is listed twice"
        if offer.deadline <= time.time():
            return "offer deadline already passed"
        return None

    def _on_offer(self, msg: Offer, jobs: trio.Nursery) -> None:
        job_id = msg.offer.job_id
        log.debug(
            "offer_received",
            job=job_id.hex()[:16],
            model=msg.offer.model_id,
            steps=msg.offer.steps,
        )  # never the parameters: they hold the prompt
        run = None
        in_hand = False
        try:
            offer_hash = eip712.offer_hash(self.id.domain, msg.offer)
            fault = self._check_offer(msg, offer_hash)
            if fault is None and self._journal_fault is not None:
                fault = f"this node's journal cannot be written now ({self._journal_fault})"
            elif fault is None and job_id in self.jobs:
                fault = "job is already running here"
            elif fault is None and job_id not in self.worker.running:
                if self.worker.free_slots > 0 or not self.worker.can_hold():
                    run = self._claim(job_id)  # now, so two offers never race for a slot
                else:  # every slot busy: hold it for the next one (pipelined credit)
                    in_hand = True
            # else: an earlier session's render of this job is still running; _serve waits
        except NoFreeSlot as exc:
            fault = str(exc)
        except Exception as exc:  # one bad offer must not end the reader
            fault = f"offer not handled ({type(exc).__name__})"
        if fault is not None:
            self._decline(job_id, fault)
            return
        if in_hand:
            self.worker.in_hand.add(job_id)
        job = self._live[job_id] = _Job(msg, offer_hash, run, in_hand=in_hand)
        jobs.start_soon(self._run_job, job)

    def _decline(self, job_id: bytes, reason: str) -> None:
        log.warning("offer_declined", job=job_id.hex()[:16], reason=reason)
        self.send(OfferDeclined(job_id=job_id, reason=reason))
        self.offer_ready()  # the coordinator spent a credit on this offer

    # --- one job -------------------------------------------------------------------------
    async def _run_job(self, job: _Job) -> None:
        """Everything one job does; nothing it raises leaves this task."""
        try:
            await self._serve(job)
        except Exception as exc:  # the type only: a message may quote the job's parameters
            log.error(
                "job_failed",
                job=job.tag,
                stage=job.stage,
                error=type(exc).__name__,
                where=where(exc),
            )
            self.worker.job_failed(job.msg.offer.model_id, job.stage)
            steps = job.run.steps_done if job.run is not None else 0
            await self._hand_back(job, steps, "node error", sent_steps=0)
        finally:
            self.worker.in_hand.discard(job.id)
            if job.run is not None:
                self.worker.release(job.run)
            if self._live.get(job.id) is job:
                del self._live[job.id]
            self._cancelled.discard(job.id)
            try:
                self._slot_freed()
            except Exception as exc:  # e.g. a backend that cannot list its warm models
                log.error("ready_not_sent", job=job.tag, error=type(exc).__name__)

    async def _serve(self, job: _Job) -> None:
        if job.run is None:  # an earlier session's render of this job: let it end first
            earlier = self.worker.running.get(job.id)
            while earlier is not None and not earlier.ended.is_set():
                if job.id in self._cancelled and not earlier.cancel.is_set():
                    # a cancel that did not stop that render (`_on_cancel`) ends only the wait
                    await self._hand_back(job, 0, "cancelled by coordinator")
                    return
                # else the stopped render ends at its next step, its partial receipt kept:
                # this offer answers the cancel with it (the client pays for those steps)
                await self.worker.changed()  # a slot freed (that render's) or a cancel
        finishing = self.worker.finishing.get(job.id)
        if finishing is not None:  # rendered, its result still being kept: wait for it
            await finishing.wait()
        await self._ack_journaled(job.id)
        # one thread hop: the kept result that answers this offer, else the offer journaled
        job.stage = "journal"
        kept = await _off_loop(
            self.journal.take_offer, job.msg.offer, job.offer_hash, job.msg.signature
        )
        job.recorded = kept is None
        if kept is not None:
            if job.run is not None:
                self.worker.release(job.run)
            cancelled = job.id in self._cancelled
            if cancelled and kept.image != b"":  # never a full result for a cancelled offer
                await self._hand_back(job, 0, "cancelled by coordinator")
                return
            await self._resend(job, kept, cancelled=cancelled)
            return
        if job.id in self._cancelled:  # cancelled while it waited for the earlier render
            await self._hand_back(job, 0, "cancelled by coordinator")
            return
        if job.in_hand:
            if not await self._take_from_hand(job):
                return
            assert job.run is not None
        elif job.run is None:
            try:
                job.run = self._claim(job.id)
            except NoFreeSlot as exc:
                self._decline(job.id, str(exc))
                return
        await self._render(job, job.run)

    async def _take_from_hand(self, job: _Job) -> bool:
        """Wait for a slot for an offer in hand: journal the offer first (so the render
        starts the moment a slot frees), then claim the slot. The offer goes back (HandBack)
        if its deadline passes first, the coordinator cancels it, or the node drains."""
        offer = job.msg.offer
        if not job.recorded:
            job.stage = "journal"
            await _off_loop(
                self.journal.record_signed_offer, offer, job.offer_hash, job.msg.signature
            )
            job.recorded = True
        reason = "offer expired before a slot was free"
        with trio.move_on_at(trio.current_time() + max(0.0, offer.deadline - time.time())):
            while job.id not in self._cancelled and not self.closed.is_set():
                if self.worker.draining:
                    reason = "node is shutting down"
                    break
                if self.worker.free_slots > 0:
                    job.run = self._claim(job.id)
                    break
                await self.worker.changed()
        self.worker.in_hand.discard(job.id)
        if job.run is not None and job.id not in self._cancelled and not self.closed.is_set():
            return True
        if job.id in self._cancelled:
            reason = "cancelled by coordinator"
        elif self.closed.is_set():  # the coordinator re-queued it when the stream broke
            reason = "session ended before a slot was free"
        if job.run is not None:
            self.worker.release(job.run)
            job.run = None
        await self._hand_back(job, 0, reason)
        log.info("job_handed_back", job=job.tag, steps=0, reason=reason)
        return False

    async def _render(self, job: _Job, run: Running) -> None:
        finishing = self.worker.finishing[job.id] = trio.Event()
        try:
            await self._render_and_keep(job, run)
        finally:
            if self.worker.finishing.get(job.id) is finishing:
                del self.worker.finishing[job.id]
            finishing.set()

    async def _render_and_keep(self, job: _Job, run: Running) -> None:
        offer = job.msg.offer
        if not job.recorded:
            job.stage = "journal"
            await _off_loop(
                self.journal.record_signed_offer, offer, job.offer_hash, job.msg.signature
            )

        def on_step(step: int) -> None:
            # The worker reports the first step, then at most one per PROGRESS_INTERVAL; none
            # goes out for the last step (the result follows): a client's progress bar needs
            # no more, and a frame per step was most of the frames a fast job cost the
            # coordinator.
            if step < offer.steps:
                self.send(Progress(job_id=offer.job_id, step=step))

        # past the deadline by as long again the coordinator has given the job to another
        # node, which has likely finished it: the slot is worth more to the next offer
        give_up_at = offer.deadline + max(OVERTIME_FLOOR, offer.deadline - time.time())
        job.stage = "render"  # a render's own failure is counted by the worker (below)
        try:
            out = await self.worker.render(
                run, job.msg.params, on_step, report_every=PROGRESS_INTERVAL, give_up_at=give_up_at
            )
        except RenderCancelled as exc:
            if run.pay_partial and exc.steps_done > 0:
                await self._finish(job, b"", exc.steps_done, None)
                log.info("job_cancelled_paid", job=job.tag, steps=exc.steps_done)
                return
            await self._hand_back(job, exc.steps_done, run.reason or "cancelled")
            log.info("job_handed_back", job=job.tag, steps=exc.steps_done)
            return
        except Exception as exc:  # a failed render must not take the session down
            refusal = getattr(exc, "refusal", None)  # LoraRefused: layer names, never a prompt
            log.error(
                "render_failed",
                job=job.tag,
                error=type(exc).__name__,
                reason=refusal,
                where=where(exc),
            )
            reason = refusal if isinstance(refusal, str) else "render failed"
            await self._hand_back(job, run.steps_done, reason[:512], sent_steps=0)
            return
        meta = RenderMeta(
            backend=out.backend, device=out.device, dtype=out.dtype, threads=out.threads
        )
        root = NO_TRAJECTORY
        if out.trajectory is not None and self.trajectories is not None:
            # kept before the receipt commits to it: a challenge can always be answered
            job.stage = "trajectory"
            await _off_loop(self.trajectories.keep, job.id, out.trajectory)
            if out.pixels is not None:  # a lossy image's pixels: opened for the image check
                await _off_loop(self.trajectories.keep_pixels, job.id, out.pixels)
            root = out.trajectory.root
        await self._finish(job, out.image, out.steps_done, meta, root)
        sent = not self.closed.is_set()  # else it waits on disk for the re-offer
        log.info("receipt_sent" if sent else "result_kept", job=job.tag, steps=out.steps_done)

    async def _hand_back(
        self, job: _Job, steps_done: int, reason: str, *, sent_steps: int | None = None
    ) -> None:
        """Give the job back to the coordinator, then journal it (best effort: the
        coordinator's re-queue does not depend on the node's journal)."""
        sent = steps_done if sent_steps is None else sent_steps
        self.send(HandBack(job_id=job.id, steps_done=sent, reason=reason))
        try:
            await _off_loop(self.journal.mark_handed_back, job.id, steps_done, reason)
        except Exception as exc:
            log.error("hand_back_not_journaled", job=job.tag, error=type(exc).__name__)

    async def _finish(
        self,
        job: _Job,
        image: bytes,
        steps_done: int,
        meta: RenderMeta | None,
        trajectory_root: bytes = NO_TRAJECTORY,
    ) -> None:
        """Sign, keep (image + receipt, durably), then send. A partial receipt (cancelled
        job) has no image and is worth the steps done, pro rata."""
        offer = job.msg.offer
        receipt = Receipt(
            job_id=offer.job_id,
            offer_hash=job.offer_hash,
            worker=self.id.wallet_address,
            coordinator=self.coordinator,
            model_id=offer.model_id,
            result_hash=hashlib.sha256(image).digest(),
            steps_done=steps_done,
            work_units=offer.work_units * min(steps_done, offer.steps) // offer.steps,
            completed_at=int(time.time()),
            price_factor_bps=offer.price_factor_bps,
            trajectory_root=trajectory_root,
            payout=self.id.payout,
        )
        job.stage = "sign"
        signature = eip712.sign_receipt(self.id.wallet_key, self.id.domain, receipt)
        meta = meta or RenderMeta(backend=self.worker.backend.name, device="", dtype="", threads=0)
        crashpoint("node_before_journal")
        job.stage = "journal"
        await _off_loop(
            functools.partial(
                self.journal.keep_result,
                receipt,
                signature,
                image,
                meta=meta,
                chain_id=self.id.domain.chain_id,
                verifying_contract=self.id.domain.verifying_contract,
            )
        )
        crashpoint("node_after_journal")
        job.stage = "upload"
        self.send(
            Result(
                job_id=offer.job_id, image=image, receipt=receipt, signature=signature, meta=meta
            )
        )

    async def _resend(self, job: _Job, kept: StoredResult, *, cancelled: bool = False) -> None:
        """Answer a re-offer with the kept result: the same image and hash; the receipt is
        re-signed only if this offer's hash differs from the one it names. A `cancelled`
        re-offer is answered only by a partial receipt (an earlier session's render its
        cancel stopped), else handed back."""
        entry, offer = kept.entry, job.msg.offer
        if job.id in self._result_sent and entry.receipt.offer_hash != job.offer_hash:
            # its ack would be matched by job id to the receipt re-signed now: an acceptance
            # of the first written onto the second (the paid receipt lost from the journal)
            self._decline(job.id, "this node's result for the job awaits the coordinator's ack")
            return
        rendered = await _off_loop(self.journal.offer, job.id)
        fault = _reoffer_fault(
            entry.receipt,
            entry.accepted,
            kept.image,
            offer,
            self.previous_keys | self.network_keys,
            rendered=rendered,
            cancelled=cancelled,
        )
        if fault is not None and cancelled:
            log.warning("partial_receipt_not_resent", job=job.tag, reason=fault)
            await self._hand_back(job, 0, "cancelled by coordinator")
            return
        if fault is not None:
            self._decline(job.id, fault)
            return
        if not eip712.same_address(entry.receipt.worker, self.id.wallet_address):
            # kept under the wallet this node had before (its key replaced): re-signed with
            # today's key it still names the old worker, a "bad result" strike, the good
            # signature overwritten in the journal. Declined: rendered elsewhere, no strike
            self._decline(job.id, "this node's kept result was signed by its previous wallet")
            return
        signature = entry.signature
        receipt = signed_form(entry.receipt, entry.domain_version, self.id.payout)
        if not eip712.same_address(receipt.coordinator, offer.coordinator):
            await self._resign_rotated(job, kept, receipt)
            return
        if receipt.offer_hash != job.offer_hash:
            receipt = msgspec.structs.replace(
                receipt, offer_hash=job.offer_hash, payout=self.id.payout
            )
            job.stage = "sign"
            signature = eip712.sign_receipt(self.id.wallet_key, self.id.domain, receipt)
            job.stage = "journal"
            await _off_loop(
                self.journal.record_signed_offer, offer, job.offer_hash, job.msg.signature
            )
            resigned = await _off_loop(
                functools.partial(
                    self.journal.resign,
                    job.id,
                    job.offer_hash,
                    signature,
                    payout=receipt.payout,
                    domain_version=self.id.domain.version,
                )
            )
            if not resigned:
                self._decline(job.id, "the kept result was acknowledged meanwhile")
                return
        meta = entry.meta or RenderMeta(
            backend=self.worker.backend.name, device="", dtype="", threads=0
        )
        assert kept.image is not None  # _reoffer_fault checked it
        self.send(
            Result(job_id=job.id, image=kept.image, receipt=receipt, signature=signature, meta=meta)
        )
        log.info("result_resent", job=job.tag, resigned=signature != entry.signature)

    async def _resign_rotated(self, job: _Job, kept: StoredResult, receipt: Receipt) -> None:
        """A re-offer from this coordinator's new key (it rotated; `previous_keys`), or from
        another coordinator of its network's signer set, for a result kept under the old key:
        the same image, its receipt now naming the new key and offer. The old receipt is
        journaled as void (no ack will come for it) before the new one is kept: the journal
        holds one live receipt per job. A crash in between loses the kept image (the job
        renders again)."""
        offer, entry = job.msg.offer, kept.entry
        assert kept.image is not None  # _reoffer_fault checked it
        receipt = msgspec.structs.replace(
            receipt, offer_hash=job.offer_hash, coordinator=offer.coordinator, payout=self.id.payout
        )
        job.stage = "sign"
        signature = eip712.sign_receipt(self.id.wallet_key, self.id.domain, receipt)
        meta = entry.meta or RenderMeta(
            backend=self.worker.backend.name, device="", dtype="", threads=0
        )
        job.stage = "journal"
        await _off_loop(self.journal.record_signed_offer, offer, job.offer_hash, job.msg.signature)
        why = f"void: re-signed for the coordinator's new key {offer.coordinator}"
        if not await _off_loop(self.journal.void, job.id, why):  # acked meanwhile: it stands
            self._decline(job.id, "the kept result was acknowledged meanwhile")
            return
        await _off_loop(
            functools.partial(
                self.journal.keep_result,
                receipt,
                signature,
                kept.image,
                meta=meta,
                chain_id=self.id.domain.chain_id,
                verifying_contract=self.id.domain.verifying_contract,
            )
        )
        self.send(
            Result(job_id=job.id, image=kept.image, receipt=receipt, signature=signature, meta=meta)
        )
        log.info("result_resent", job=job.tag, resigned=True, rotated=True)


def _tensor(entry: TensorEntry) -> torch.Tensor:
    """An opened tensor's bytes (float32 on the wire, whatever it was computed in)."""
    import torch

    return torch.frombuffer(bytearray(entry.data), dtype=torch.float32).reshape(entry.shape)


def _seed_distance(backend: Backend, params: JobParams, leaf: TensorEntry) -> float:
    """Blocking: the seed check of the worker's leaf 0 (`step_check.seed_distance`, any
    rounding); `inf` when the leaf is not float32 latents of a shape its bytes fill (it was
    the worker's to open) or this backend has no diffusers pipeline to shape the noise."""
    from sogni_node.render.diffusers_backend import DiffusersBackend
    from sogni_node.verify import step_check as sc

    if not isinstance(backend, DiffusersBackend) or leaf.dtype != "float32":
        return math.inf
    try:
        latents = _tensor(leaf)
    except (RuntimeError, ValueError):
        return math.inf
    with backend.holding(params.model_id) as loaded:
        return sc.seed_distance(
            loaded.pipe, latents, seed=params.seed, width=params.width, height=params.height
        )


def _opening_wire(opening: StepOpening) -> StepOpeningWire:
    """A revealed leaf as it travels: every committed entry, the proof, the tree's size."""
    entries = opening.record.entries()
    tensors, scalars = [], []
    for name in sorted(entries):
        value = entries[name]
        if isinstance(value, TensorBytes):
            tensors.append(
                TensorEntry(
                    name=name,
                    dtype=cast(TensorDtype, value.dtype),
                    shape=list(value.shape),
                    data=value.data,
                )
            )
        else:
            scalars.append(ScalarEntry(name=name, value=value))
    return StepOpeningWire(
        step=opening.step,
        tensors=tensors,
        scalars=scalars,
        proof=list(opening.proof),
        n_leaves=opening.n_leaves,
    )


def _reoffer_fault(
    receipt: Receipt,
    accepted: bool | None,
    image: bytes | None,
    offer: JobOffer,
    previous_keys: frozenset[str] = frozenset(),
    *,
    rendered: JobOffer | None = None,
    cancelled: bool = False,
) -> str | None:
    """Why a kept result cannot answer `offer` (then the offer is declined), or None.
    `rendered`, the journalled offer the image was rendered for: a re-offer naming other
    parameters (prompt, seed, size) would have this node sign a receipt binding the image
    to parameters it never rendered, evidence against itself in every check. A `cancelled`
    offer takes only a partial receipt (no image, fewer steps than the offer's)."""
    if accepted:
        return "this node's result for the job was already accepted"
    if image is None:
        return "this node's kept result for the job is lost; it will not sign another image"
    partial = not image and 0 < receipt.steps_done < offer.steps
    if cancelled and not partial:
        return "a cancelled offer takes only a partial receipt"
    if not cancelled and (receipt.steps_done != offer.steps or not image):
        return "this node holds a partial receipt for the job"
    same = (
        (
            eip712.same_address(receipt.coordinator, offer.coordinator)
            or receipt.coordinator.lower() in previous_keys  # rotated, or one of its network
        )
        and receipt.model_id == offer.model_id
        and receipt.work_units == offer.work_units * receipt.steps_done // offer.steps
        and receipt.price_factor_bps == offer.price_factor_bps
    )
    if same and rendered is not None:
        same = _render_fields(rendered) == _render_fields(offer)
    return None if same else "the re-offer differs from the offer this node rendered"


def _render_fields(offer: JobOffer) -> tuple[object, ...]:
    return (offer.params_hash, offer.seed, offer.width, offer.height, offer.steps)


async def _off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking journal call (SQLite fsync, image files) in a worker thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def pull_forever(
    new_session: Callable[[], PullSession],
    addr: str,
    sessions: set[PullSession],
    stop: trio.Event,
    on_slot_freed: Callable[[], None] | None = None,
) -> None:
    """Keep a session to `addr` open, reconnecting with capped exponential backoff.

    Jobs run in this function's nursery, not the session's: a broken stream neither waits
    for nor kills the renders it offered, and their kept results answer the re-offers.
    `on_slot_freed` (default: this address's current session sends `Ready`) is called when
    one of its jobs ends: a node of several coordinators tells every one of them, since a
    slot freed by one coordinator's job is credit for all (and the one that offered the job
    may be gone).
    """
    current: list[PullSession] = []

    def slot_freed() -> None:
        if on_slot_freed is not None:
            on_slot_freed()
        elif current:
            current[0].offer_ready()

    async with trio.open_nursery() as jobs:
        delay = 0.5
        while not stop.is_set():
            started = time.monotonic()
            session: PullSession | None = None
            try:
                session = new_session()
                current[:] = [session]
                sessions.add(session)
                await session.run(jobs, slot_freed)
            except SessionRefused as exc:
                log.error("coordinator_refused", addr=addr, error=str(exc))
            except (TransportError, ProtocolError, OSError) as exc:
                log.warning("pull_session_ended", addr=addr, error=f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug in one session must not end the node
                log.error("pull_session_failed", addr=addr, error=type(exc).__name__)
            finally:
                if session is not None:
                    sessions.discard(session)
            if time.monotonic() - started > 30 or (session is not None and session.coordinator):
                delay = 0.5  # it was welcomed: a restarted coordinator is back within seconds
            with trio.move_on_after(delay):
                await stop.wait()
            delay = min(delay * 2, 30.0)
