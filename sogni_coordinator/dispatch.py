"""The job queue and the life of each job, behind one API that the stream handlers call.

One `Dispatcher` per coordinator holds the live view: queued jobs, connected nodes with their
free slots, and the requests waiting for images. Sessions call its public methods (submit,
node joined/left, ready, declined, handed back, progress, result, cancel, account queries);
nothing else touches billing, the store or reputation. Its `run` task matches queued jobs
to nodes (through the `Router`) whenever either side changes, and `sweep` (each fraction of
a second) re-queues expired jobs, copies stragglers near the end of a request, and fails
jobs no connected node can serve. All of it runs on one trio thread, so no locks.

Every change of a job's state goes through `_to`, which asks `job_state.transition` (the
one table of the lifecycle) and queues the change for the store; `_save` writes the queued
changes in one transaction at the end of each entry point. Receipts are the exception:
the group commit writes a receipt and its job's new state in one transaction before the
node hears "accepted".

Delivery (`delivery.py`): each request has a `Mailbox` of what its client is owed. An image is
written to the result store before its receipt is committed (the receipt's queued write
stores it first: `db.Database.call_staged`), and stays there until the
client acknowledges it (`ack_images`); `submit` and `resume` (with the requester's resume
token) hand the client stream a `Cursor` over the mailbox, so a lost stream or a restart
loses nothing and sends nothing twice that was acknowledged. Prompts are sealed in the store
with a key per request, which a background task shreds `prompt_retention` seconds after the
request ended.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from sogni_coordinator.api_keys import GATEWAY_PEER
from sogni_coordinator.billing import Billing, Refusal
from sogni_coordinator.challenges import ChallengeResult, PendingChallenges
from sogni_coordinator.checks import RESTART_REASON, Checks, Held, Outcome
from sogni_coordinator.content_policy import ContentPolicy, screen_request
from sogni_coordinator.db import DATABASE_ERRORS, until_written
from sogni_coordinator.delivery import Cursor, Mailbox, short
from sogni_coordinator.disputes import Reporter
from sogni_coordinator.gateway.limits import KeyBuckets
from sogni_coordinator.group_commit import GroupCommit
from sogni_coordinator.image_check import check_image
from sogni_coordinator.job_state import (
    LIVE,
    TERMINAL,
    Forbidden,
    JobEvent,
    JobState,
    stored,
    transition,
)
from sogni_coordinator.jobs import Job, NodeLink, RequestState
from sogni_coordinator.model_stake import ModelStakeBoard
from sogni_coordinator.prompt_crypto import new_key
from sogni_coordinator.reports import NODE_BLOCKED, PAYER_BLOCKED, Reports
from sogni_coordinator.reputation import STRIKE_WINDOW, Reputation
from sogni_coordinator.results import FolderResults, ResultKey, ResultStore
from sogni_coordinator.routing import FreePool, Router
from sogni_coordinator.safety.screen import MESSAGES as IMAGE_REFUSALS
from sogni_coordinator.safety.screen import ImageSafety
from sogni_coordinator.seasons.hardware import HardwareLog
from sogni_coordinator.staking_benefits import TieredQueue, pick_with_upgrade, upgrade_rule
from sogni_coordinator.store import DeliveryRecord, PendingCheck, Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifiers import PendingVerifications
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.image_types import format_of
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    MAX_LOOKAHEAD,
    BalanceQuery,
    Cancel,
    Capabilities,
    Challenge,
    DailyBoostClaim,
    JobFailed,
    JobImage,
    JobOffer,
    JobParams,
    JobProgress,
    Message,
    Offer,
    Receipt,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    RequestResumed,
    Result,
    split_request,
)
from sogni_protocol.pricing import price_factor_bps, work_units
from sogni_protocol.schedulers import scheduler_fault

if TYPE_CHECKING:
    from sogni_coordinator.cluster import Cluster

log = get_logger(__name__)
_debug_log = logging.getLogger(__name__)  # the stdlib logger behind `log`: its level

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_LOOKAHEAD",
    "NO_NODE_GRACE",
    "Dispatcher",
    "Refusal",
    "ResultRefused",
    "Resumed",
    "Submission",
]

MAX_ATTEMPTS = 5
"""A job that fails this many times (node lost, deadline, hand-back) is given up on."""
NO_NODE_GRACE = 10.0
"""Seconds a queued job may wait with no connected node able to serve it before it fails."""
CANCEL_GRACE = 30.0
"""Seconds a job is kept from a node told to stop it, unless the node answers first (its
hand-back or result): offered again while it is still stopping, it could only decline."""
PARTIAL_WAIT = 60.0
"""Seconds a cancelled job whose node's stream was lost (or whose coordinator restarted)
waits, still cancelling, for the partial receipt the node kept: it sends it when it
reconnects (within seconds: `sogni_node.pull` retries from 0.5 s). Then it ends unpaid."""
STRAGGLER_FACTOR = 2.0
"""A job running this many times longer than its request's median is copied to another node."""
NEWCOMER_WORK_RATE = 2_000.0
"""Work units per second a node is allowed for partial pay before it has shown its own rate
with a full receipt: twice the baseline GPU (1,000 per second). At 20x, a node that never
finished a job claimed 19 of 20 SDXL steps 2 s after the offer, forever; a fast newcomer is
paid short only on cancels before its first full render."""
MAX_PARTIAL_WORK_RATE = 20_000.0
"""The most any node is allowed for partial pay, whatever rate it showed: 20x the baseline."""
PARTIAL_RATE_MARGIN = 2.0
"""A measured node may claim partial steps at up to twice its measured rate."""
EMPTY_SHA256 = hashlib.sha256(b"").digest()
_NO_NODES: frozenset[NodeLink] = frozenset()
"""`in_use` for a job whose request is not live here (another coordinator's, cluster.py)."""


def render_budget(params: JobParams, floor: float, base: float = 30.0) -> float:
    """AI Horde's deadline rule: generous for small jobs, grows with steps x pixels."""
    return max(floor, base + 2.0 * params.steps * params.width * params.height / 512**2)


class ResultRefused(Exception):
    """A result the coordinator will not receipt; the message goes back to the node."""


class StorageFault(ResultRefused):
    """The coordinator could not store a good result (disk full): not the node's fault."""


LATE = -1.0
"""A held receipt's `elapsed` when its node no longer held the job (deadline missed, handed
back): its render time is unknown, and it is a slow reputation sample, never an instant one."""


@dataclass
class HelloLimits:
    """Node hellos allowed: per peer id (a connection opening stream after stream, each with
    a fresh self-signed wallet: a record, hardware rows and a chain lookup each) and in all
    (many peer ids), each with bursts for a whole network reconnecting after a restart."""

    per_peer: KeyBuckets = field(default_factory=lambda: KeyBuckets(per_minute=12, burst=4))
    total: KeyBuckets = field(default_factory=lambda: KeyBuckets(per_minute=12_000, burst=1000))

    def allow(self, peer_id: str) -> str | None:
        """Before any work: None, or why this peer's hello is refused (it backs off)."""
        if not self.per_peer.take(peer_id):
            return "too many sessions from this peer: wait before connecting again"
        return None

    def allow_bound(self) -> str | None:
        """Once the hello's binding is checked (fresh peer ids cost an attacker nothing, a
        valid binding a signature: spent before it, the total kept honest nodes out)."""
        if not self.total.take("*"):
            return "too many nodes are connecting now: try again in a few seconds"
        return None


UNTIMED = -2.0
"""A receipt's `elapsed` when its node finished the render before this offer was made (more
than `RESENT_SLACK` s before, by its own clock): a kept result answering a re-offer after a
restart or reconnect. Its time measures the network: no speed nor rate sample (it counted
as a render of a round trip, and raised the node's partial-pay allowance)."""
RESENT_SLACK = 30.0
"""Seconds a node's clock may lag the coordinator's before its fresh renders read as kept."""


def _elapsed(job: Job, link: NodeLink, now: float, receipt: Receipt) -> float:
    started = job.holders.get(link)
    if started is None:  # a partial receipt resent after a reconnect or restart: no sample
        return UNTIMED if job.partial_wait is not None else LATE
    if receipt.completed_at < started - RESENT_SLACK:
        return UNTIMED
    return now - started


class NotTaken(ResultRefused):
    """A result this coordinator will not pay, which need not be a lie: a partial receipt
    claiming more steps than a node with no measured rate is allowed (a fast newcomer may
    really have done them). Released without a strike, nothing owed."""


class JobGone(ResultRefused):
    """The job was receipted or ended before this result: another holder's result came
    first (a straggler's twin; with several coordinators, another lessee's after this one's
    lease lapsed), or the request ended. Not the node's fault."""


@dataclass(frozen=True)
class Submission:
    """An accepted request: the answer for the client, and what to stream to it."""

    accepted: RequestAccepted
    state: RequestState
    mailbox: Mailbox
    events: Cursor
    """Progress, images, failures, then `RequestDone`; each once for this attachment."""


@dataclass(frozen=True)
class Resumed:
    """A request re-attached with its resume token: the answer, and what is still owed."""

    reply: RequestResumed
    mailbox: Mailbox
    events: Cursor


class Dispatcher:
    def __init__(
        self,
        store: Store,
        *,
        signer_key: bytes,
        signer_address: str,
        domain: Domain,
        router: Router | None = None,
        deadline_floor: float = 150.0,
        deadline_base: float = 30.0,
        clock: Callable[[], float] = time.time,
        billing: Billing | None = None,
        results_dir: Path | None = None,
        results: ResultStore | None = None,
        prompt_retention: float = 3600.0,
        verification: VerificationConfig | None = None,
        verification_log: Path | None = None,
        content_policy: ContentPolicy | None = None,
        image_safety: ImageSafety | None = None,
    ) -> None:
        self.store = store
        self.content_policy = content_policy
        """Prompts checked before anything is reserved (None: the shipped policy, adult off)."""
        self.image_safety = image_safety
        """Images checked before they are stored for delivery (docs/SAFETY.md); None: off."""
        self.blocked_payers: frozenset[str] = frozenset()
        """Lowercase payers the operator blocked after a content report (`reports.py`)."""
        self.reports: Reports | None = None
        """Where content reports are filed (`report_intake`); None: reports are off."""
        self._key = signer_key
        self.address = signer_address
        """The offer-signing address: nodes list it as trusted, receipts name it."""
        self.domain = domain
        self.router = router or Router(Reputation(":memory:"))
        self.reputation = self.router.reputation
        self.hellos = HelloLimits()
        """How often node sessions may start (`node_session`): each costs a signature
        recovery, a chain lookup and state for its wallet."""
        self.deadline_floor = deadline_floor
        self.deadline_base = deadline_base
        self._clock = clock
        self.billing = billing
        self.no_node_grace = NO_NODE_GRACE
        self.cancel_grace = CANCEL_GRACE
        self.partial_wait = PARTIAL_WAIT
        self.receipts = GroupCommit(store)
        self.queue = TieredQueue()
        """Queued jobs, higher payer stake tiers first (staking_benefits.py)."""
        self.jobs: dict[bytes, Job] = {}
        """Live jobs (queued, running, cancelling); a job leaves when it ends."""
        self._queued_by_request: dict[bytes, dict[Job, None]] = {}
        """The queue's entries by request, in queue order (`sweep` asks per request, not
        per job); may hold entries no longer waiting (`_waiting`), dropped as met."""
        self._deadlines: list[tuple[float, int, Job, NodeLink]] = []
        """A heap of (deadline, tie-break, job, holder) per offer: `sweep` pops the expired
        ones instead of walking every job; an entry whose holder is gone is skipped."""
        self._tiebreak = itertools.count()
        self._screening = trio.CapacityLimiter(1)
        """Prompt screens run one at a time in a worker thread (`submit`)."""
        self._partial_waits: list[tuple[float, int, Job]] = []
        """A heap of (until, tie-break, job): cancelling jobs with no holder left, waiting
        for a partial receipt (`PARTIAL_WAIT`); `sweep` ends the expired ones."""
        self._unservable: set[bytes] = set()
        """Requests whose queued jobs' no-node grace clocks run (`Job.unservable_since`)."""
        self.nodes: dict[str, NodeLink] = {}
        self.free = FreePool()
        """Connected nodes with credit, in the order they got it (`NodeLink.credit` keeps it)."""
        self._stopping: dict[bytes, dict[NodeLink, float]] = {}
        """Job -> nodes told to stop it that have not answered, each until when it is kept
        from them (`_cancel_on`)."""
        self.requests: dict[bytes, RequestState] = {}
        self._unsaved: dict[bytes, Job] = {}
        self._committing: dict[bytes, int] = {}
        """Job id -> receipts of it being committed now: its last holder leaving meanwhile
        (`_release`) waits for the outcome (`_let_go_later`) instead of giving the job up."""
        self._let_go_later: dict[bytes, tuple[str, bool, bool]] = {}
        """Job id -> the (reason, spent) of a release put off while its receipt committed."""
        self._storing: dict[ResultKey, trio.Event] = {}
        """Result keys whose receipt is being committed now (set when that ends): a
        duplicate result (the same request, index and offer) waits for its twin before its
        image is written, and is refused if the twin settled the job, so it never
        overwrites, nor then discards, the image its twin committed."""
        self._changed = trio.Event()
        if results is None:  # a folder: `results_dir`, or beside the database (a temporary
            # folder for `:memory:` or a server; the service names one: `open_results`)
            if results_dir is None:
                beside = not store.postgres and str(store.path) != ":memory:"
                results_dir = store.path.parent / "results" if beside else Path(tempfile.mkdtemp())
            results = FolderResults(results_dir)
        self.results: ResultStore = results
        self.mailboxes: dict[bytes, Mailbox] = {}
        """Requests still live, or attached to a client, or with images unacknowledged."""
        self.prompt_retention = prompt_retention
        """Seconds a request's prompt key outlives the request (then it is shredded)."""
        self._shred_wake = trio.Event()
        self.challenges = PendingChallenges()
        """Challenges sent to nodes and not yet answered (`challenge`)."""
        self.verifications = PendingVerifications()
        """Steps sent to verifier nodes and not yet answered (`verifiers.verify_step`)."""
        self.checks = Checks(self, verification, verification_log)
        """Sampled receipts held until verified (`checks.py`); off by default."""
        self.model_stake: ModelStakeBoard | None = None
        self.hardware: HardwareLog | None = None
        """Records each node's advertised device for the Workers boards (seasons/hardware.py)."""
        """Stake on models (model_stake.py), read by model lists; None without a chain."""
        self.excluded: dict[bytes, set[str]] = {}
        """Job id -> wallets whose receipt for it failed a check, or that handed it back:
        offered elsewhere first."""
        self.refusals: Reporter | None = None
        """Signs each refusal so the worker can dispute it on chain (disputes.py); None
        without a Disputes contract."""
        self.cluster: Cluster | None = None
        """Several coordinators on one PostgreSQL (`cluster.py`, set by `Cluster.attach`):
        jobs go through the shared queue, leased for this coordinator's nodes. None: one
        coordinator, jobs queued in memory."""

    # --- the lifecycle: the only place a job's state changes --------------------------------
    def _to(self, job: Job, event: JobEvent, *, durable: bool = False) -> JobState:
        """Apply `event` (raises `Forbidden`); `durable` when the caller already stored it."""
        old, job.state = job.state, transition(job.state, event)
        if not durable and stored(job.state) is not stored(old):
            self._unsaved[job.job_id] = job
        return job.state

    def _save(self) -> None:
        """Write the state changes of this entry point in one transaction."""
        if self._unsaved:
            batch, self._unsaved = self._unsaved, {}
            # Queued for the writer thread (in order, so a job's end is stored before its
            # request's refund); at once when no writer runs (restore, tests).
            self.store.submit(
                "job states",
                self.store.save_job_states,
                [(j.job_id, stored(j.state), j.attempts) for j in batch.values()],
            )

    def job_counts(self) -> dict[str, int]:
        """Live jobs per state (`queued`, `running`, `cancelling`), for health and metrics;
        `len(queue)` also counts stale entries."""
        counts = dict.fromkeys((s.value for s in LIVE), 0)
        for job in self.jobs.values():
            counts[job.state.value] += 1
        return counts

    # --- requests from clients ------------------------------------------------------------
    def known_models(self) -> set[str]:
        return {m for link in self.nodes.values() for m in link.models}

    def can_serve(self, network: str, want: JobParams | RenderRequest) -> bool:
        """Some connected node could take such a job (now or once it has a free slot)."""
        return any(self.router.capable(link, network, want) for link in self.nodes.values())

    def model_fault(self, req: RenderRequest, allowed: set[str]) -> str | None:
        """A configured model list is a promise (jobs wait for nodes); without one, only
        models some connected node can serve now are accepted."""
        if allowed:
            if req.model_id not in allowed:
                return f"unknown model {req.model_id!r}: this coordinator serves {sorted(allowed)}"
        elif req.model_id not in self.known_models():
            if self.cluster is None or req.model_id not in self.cluster.network_models:
                return f"unknown model {req.model_id!r}: no connected node has it"
        elif not self.can_serve(req.network, req):
            loras = f" with LoRAs {[lora.id for lora in req.loras]}" if req.loras else ""
            return (
                f"no connected node can serve {req.network} {req.model_id} at "
                f"{req.width}x{req.height}{loras} now"
            )
        return None

    async def submit(
        self,
        req: RenderRequest,
        *,
        client_peer: str,
        allowed_models: set[str],
        token: bytes | None = None,
    ) -> Submission:
        """Validate, reserve the price, split into jobs, commit them, queue them.

        `token`: the resume token to give the request (a fresh one when None); the gateway
        records it before submitting, so a crash before its record is updated can resume.

        Raises `Refusal(code, reason)`. When this returns the request and every job are
        durable, so the client may be told "accepted". The reservation and the request are
        written by the writer thread (no fsync on the loop). The answer carries a fresh resume
        token (only its hash is stored). Every image waits in the results folder until the
        client acknowledges it.
        """
        if req.payer is not None and req.payer.lower() in self.blocked_payers:
            raise Refusal("payer_blocked", PAYER_BLOCKED)  # before anything is reserved
        fault = self.model_fault(req, allowed_models)
        if fault is not None:
            raise Refusal("unknown_model", fault)
        ids = [lora.id for lora in req.loras]
        if len(set(ids)) < len(ids):  # every node declines such a job (each copy merged again)
            raise Refusal("invalid_request", f"a LoRA is listed twice: {sorted(ids)}")
        if (why := scheduler_fault(req.scheduler)) is not None:  # every node would fail it
            raise Refusal("invalid_request", why)
        # Before anything is reserved: a refused prompt costs nothing (docs/CONTENT_POLICY.md).
        # In a worker thread, one at a time: anyone may send prompts, each up to ~30 ms of
        # Unicode work (`content_normalise`), and the loop serves everyone else meanwhile.
        await trio.to_thread.run_sync(
            screen_request, req, self.content_policy, limiter=self._screening
        )
        paid = self.billing is not None and self.billing.charges(req)
        # A paid request is known by the hash its payer signed, and its jobs by ids derived
        # from it: a published receipt then proves which authorization paid for it.
        request_id = eip712.request_hash(req) if paid else os.urandom(32)
        if self.image_safety is not None:
            self.image_safety.note_request(request_id, req)
        jobs = [
            Job(
                eip712.job_id_of(request_id, i) if paid else os.urandom(32),
                request_id,
                i,
                params,
                work_units(params),
                network=req.network,
            )
            for i, params in enumerate(split_request(req))
        ]
        token = token or os.urandom(32)
        # Shielded: a client that goes away mid-submit must not leave a stored request
        # without its reservation, or a reservation without its request.
        with trio.CancelScope(shield=True):
            cost = (
                await self.billing.admit_off_loop(
                    req, request_id, via_gateway=client_peer.startswith(GATEWAY_PEER)
                )
                if self.billing is not None
                else 0
            )
            try:
                await self.store.call(
                    self.store.add_request,
                    request_id,
                    model_id=req.model_id,
                    network=req.network,
                    token_type=req.token_type,
                    client_peer=client_peer,
                    jobs=[(j.job_id, j.params, j.work_units) for j in jobs],
                    token_hash=hashlib.sha256(token).digest(),
                    key=new_key(),
                )
            except BaseException:
                if self.billing is not None:  # not accepted: nothing may stay reserved
                    self.billing.finish(request_id)
                raise
            tier = 0
            if paid and self.billing is not None and self.billing.benefits is not None:
                tier = self.queue.tiers[request_id] = self.billing.benefits.tier(req.payer)
            if self.cluster is not None:  # owned here, rendered by any coordinator's nodes
                try:
                    await self.cluster.submitted(request_id, jobs, tier)  # the tier orders it
                except Refusal:  # stored but in no queue: ended unaccepted, nothing charged
                    await self._unsubmit(request_id, jobs)
                    raise
        box = Mailbox(request_id, [j.job_id for j in jobs])
        state = RequestState(request_id, len(jobs), box)
        self.add_request(state, jobs)
        accepted = RequestAccepted(
            request_id=request_id,
            job_ids=[j.job_id for j in jobs],
            chain_id=self.domain.chain_id,
            verifying_contract=self.domain.verifying_contract,
            cost_micro=cost,
            resume_token=token,
        )
        return Submission(accepted, state, box, box.attach(self.results))

    def add_request(self, state: RequestState, jobs: list[Job]) -> None:
        """Queue the (already stored) jobs of a request."""
        self.requests[state.request_id] = state
        self.mailboxes[state.request_id] = state.mailbox
        if self.cluster is not None:  # in the shared queue: leased by whoever has nodes free
            return
        for job in jobs:
            self._enqueue(job)

    # --- delivery: resume, acknowledgements ---------------------------------------------------
    def resume(self, request_id: bytes, token: bytes) -> Resumed:
        """Re-attach a client to its request: raises `Refusal("unauthorized")` unless `token`
        is the request's resume token (an unknown request gets the same answer). The returned
        cursor yields every image not yet acknowledged, then the rest as it comes; a stream
        still attached is superseded. Nothing is charged: receipts were paid when stored."""
        if not self.store.token_matches(request_id, token):
            raise Refusal("unauthorized", "unknown request, or not its resume token")
        record = None if request_id in self.mailboxes else self.store.delivery(request_id)
        return self._attach(request_id, record)

    def _attach(self, request_id: bytes, record: DeliveryRecord | None) -> Resumed:
        """`resume`'s end, once the token matched: the request's mailbox (`record`, read
        from the store, builds it when none is in memory) attached to a new cursor."""
        box = self.mailboxes.get(request_id)
        if box is None:
            if record is None:  # token matched, so the request exists: a race with nothing
                raise Refusal("unauthorized", "unknown request, or not its resume token")
            box = self.mailboxes[request_id] = Mailbox.from_record(record, self.results)
        reply = RequestResumed(
            request_id=request_id,
            job_ids=list(box.job_ids),
            chain_id=self.domain.chain_id,
            verifying_contract=self.domain.verifying_contract,
            acked=sorted(box.acked | box.acking, key=box.job_ids.index),
        )
        return Resumed(reply, box, box.attach(self.results))

    async def resume_anywhere(self, request_id: bytes, token: bytes) -> Resumed:
        """`resume`, and with several coordinators a request another one accepted: this
        one adopts it from the shared database (its client's coordinator died, or moved)."""
        # Off the event loop: anyone may send a resume with a random id and token, and each
        # read waited on the database's lock (a commit, or another process's, up to 30 s).
        if not await trio.to_thread.run_sync(self.store.token_matches, request_id, token):
            raise Refusal("unauthorized", "unknown request, or not its resume token")
        if self.cluster is not None and request_id not in self.requests:
            await self.cluster.adopt(request_id)
        record = None
        if request_id not in self.mailboxes:
            record = await trio.to_thread.run_sync(self.store.delivery, request_id)
        return self._attach(request_id, record)

    def detach(self, cursor: Cursor) -> None:
        """A client stream ended: its images stay on disk until a client acknowledges them."""
        box = cursor.box
        box.detach(cursor)
        if box.idle and self.mailboxes.get(box.request_id) is box:
            del self.mailboxes[box.request_id]

    async def ack_images(self, request_id: bytes, job_ids: Iterable[bytes]) -> list[bytes]:
        """The client has these images: record them as delivered (durably), then delete their
        files. Jobs of other requests, unknown, or not yet receipted are ignored."""
        box = self.mailboxes.get(request_id)
        wanted = list(dict.fromkeys(job_ids))

        def write() -> list[bytes]:
            acked = self.store.mark_delivered(request_id, wanted)
            if box is not None:
                self.results.remove(box.pending[j] for j in acked if j in box.pending)
            return acked

        acking = set() if box is None else {j for j in wanted if j in box.pending} - box.acking
        if box is not None:  # until the thread is back, a resume must not resend (or miss) them
            box.acking |= acking
        try:
            acked = await trio.to_thread.run_sync(write)
        finally:
            if box is not None:
                box.acking -= acking
                box.notify()
        if box is not None:  # no checkpoint since the thread returned: this is atomic
            for job_id in acked:
                box.acknowledge(job_id)
        return acked

    async def durable(self) -> None:
        """Wait until every state change written so far is committed: a reply that says a
        cancel took effect comes after this (the gateway's `didCancel`)."""
        await self.store.durable()

    def cancel_request(self, request_id: bytes) -> None:
        """The client cancelled: queued jobs end now, running ones stop at their next step
        and are paid for the steps done (their nodes send partial receipts)."""
        state = self.requests.get(request_id)
        if state is not None:  # its own job ids: never a walk over every live job
            found = (self.jobs.get(job_id) for job_id in state.mailbox.job_ids)
            mine = [j for j in found if j is not None and j.request_id == request_id]
        elif self.cluster is not None:  # another's request, some of its jobs leased here
            mine = [j for j in self.jobs.values() if j.request_id == request_id]
        else:  # ended, or never here: nothing to stop (a repeated cancel costs nothing)
            mine = []
        cancel_offers: list[tuple[bytes, bytes, str, JobOffer, bytes]] = []
        for job in mine:
            try:
                new = self._to(job, JobEvent.CANCEL)
            except Forbidden:
                continue  # already cancelling
            if new is JobState.CANCELLED:
                self._ended(job)
            elif job.holders:  # a restart waits for the partial receipts (`restore`)
                held = {link.peer_id for link in job.holders}
                cancel_offers.extend(
                    (h, job.job_id, peer, *job.signed_offers[h])
                    for h, peer in job.offers.items()
                    if peer in held and h in job.signed_offers
                )
            for link in job.holders:
                self._send_to_node(link, Cancel(job_id=job.job_id, pay_partial=True))
        if self.cluster is not None and request_id in self.requests:
            self.cluster.cancelled(request_id)  # its jobs still in the shared queue
        if cancel_offers and self.cluster is None:  # before the states: a restart finds both
            self.store.submit("cancel offers", self.store.save_cancel_offers, cancel_offers)
        self._save()

    async def _unsubmit(self, request_id: bytes, jobs: list[Job]) -> None:
        """A stored request the shared queue did not take: its jobs end (failed, so no
        coordinator adopts it) and its reservation is refunded whole."""
        self.queue.tiers.pop(request_id, None)
        try:
            ended = [(j.job_id, JobState.FAILED, 0) for j in jobs]
            await self.store.call(self.store.save_job_states, ended)
        except Exception as exc:  # the database is away too: the operator is told
            log.error("request_not_undone", request=short(request_id), error=type(exc).__name__)
        if self.billing is not None:
            self.billing.finish(request_id)

    def account(self, req: DailyBoostClaim | BalanceQuery, peer_id: str) -> Message:
        """A payer's Daily Boost claim or balance query; raises `Refusal`."""
        if self.billing is None:
            raise Refusal("billing_off", "billing is off on this coordinator: renders are free")
        if isinstance(req, DailyBoostClaim):
            return self.billing.claim_boost(req)
        return self.billing.report(req, peer_id)

    def restore(self) -> int:
        """After a restart: re-queue the jobs that had not ended (their clients resume with
        their tokens), end those a client had cancelled (one cancelled while a node rendered
        it waits `PARTIAL_WAIT` for that node's partial receipt), take back the open reservations so
        what the jobs deliver is settled and the rest refunded, and drop image files that no
        client is owed. Receipts held by a pending check stay held, their check re-run when
        their node reconnects. Returns how many jobs were re-queued. With several
        coordinators the shared queue keeps the jobs: `Cluster.restore` instead."""
        if self.cluster is not None:
            return 0
        # checks.py: a check pending at the stop is run again once its node reconnects
        # (`resume_check`); one stored before v7 names no node: it fails closed (the
        # receipt becomes evidence, its job is queued again, nobody is struck).
        held = self.store.pending_checks()
        for c in [c for c in held if not c.peer_id]:
            self.fail_unnamed_check(c)
        held = [c for c in held if c.peer_id]
        by_request: dict[bytes, list[Job]] = {}
        cancel_offers = self.store.cancel_offers()
        waiting: dict[bytes, list[Job]] = {}  # cancelled while rendering: partials to come
        for s in self.store.live_jobs():
            job = Job.restored(s, s.state)
            offers = cancel_offers.get(s.job_id) if s.state is JobState.CANCELLING else None
            if offers:
                for offer_hash, peer_id, offer, signature in offers:
                    job.offers[offer_hash] = peer_id
                    job.signed_offers[offer_hash] = (offer, signature)
                self.jobs[job.job_id] = job
                self._await_partial(job)
                waiting.setdefault(s.request_id, []).append(job)
            elif self._to(job, JobEvent.RESTORE) is JobState.QUEUED:
                by_request.setdefault(s.request_id, []).append(job)
        self._save()  # before billing counts each request's queued jobs
        if self.billing is not None:
            kept = self.billing.restore(self.store)
            if kept:
                log.info("reservations_restored", requests=kept)
        held_by: dict[bytes, list[PendingCheck]] = {}
        for c in held:
            held_by.setdefault(c.job.request_id, []).append(c)
        for request_id in by_request | held_by | waiting:
            record = self.store.delivery(request_id)
            assert record is not None  # it has live jobs
            box = Mailbox.from_record(record, self.results)
            group, checks = by_request.get(request_id, []), held_by.get(request_id, [])
            live = len(group) + len(checks) + len(waiting.get(request_id, []))
            self.add_request(RequestState(request_id, live, box), group)
        keep = {self.results.key(*pending) for pending in self.store.pending_deliveries()}
        keep |= {self.resume_check(c) for c in held}
        pruned = self.results.prune(keep)
        if pruned:
            log.info("result_files_pruned", files=pruned)
        return sum(len(group) for group in by_request.values())

    def fail_unnamed_check(self, c: PendingCheck) -> None:
        """Blocking. A held receipt stored before v7 names no node to re-run its check: it
        fails closed (the receipt becomes evidence, its job is queued again, nobody is
        struck)."""
        if self.store.fail_held_receipt(c.job.job_id, RESTART_REASON):
            self.checks.write_log(
                c.job.job_id, c.worker, Outcome("fail", RESTART_REASON, strike=False)
            )

    def resume_check(self, c: PendingCheck) -> ResultKey:
        """A receipt held when the coordinator stopped (or, with several, when the one
        checking it stopped: `Cluster._take` leased its job again): its job is live here
        (RUNNING, no holder: the client sees it rendering), and its check runs once the node
        that rendered it connects (`Checks`, `restart_recheck_timeout`). Returns its image."""
        s = c.job
        job = Job.restored(s, JobState.CANCELLING if c.cancelled else JobState.RUNNING)
        self.jobs[job.job_id] = job
        path = self.results.key(s.request_id, s.index, c.receipt.offer_hash)
        budget = render_budget(s.params, self.deadline_floor, self.deadline_base)
        wait = self.checks.policy.restart_recheck_timeout
        self.checks.hold(
            Held(
                job, c.peer_id, c.receipt.worker, c.receipt, c.dtype, path, c.elapsed, budget, wait
            )
        )
        log.info("check_resumed", job=s.job_id.hex()[:16], worker=c.receipt.worker)
        return path

    # --- nodes ----------------------------------------------------------------------------
    def node_joined(
        self, peer_id: str, caps: Capabilities, outbox: trio.MemorySendChannel[Message]
    ) -> NodeLink:
        """A node passed the handshake; raises `Refusal` if its wallet is blacklisted. A
        second stream from the same peer replaces the first."""
        if self.reputation.blacklisted(caps.wallet):
            raise Refusal("blacklisted", f"wallet {caps.wallet} is blacklisted")
        if caps.wallet.lower() in self.router.blocked_nodes:
            raise Refusal("blocked", f"wallet {caps.wallet}: {NODE_BLOCKED}")
        link = NodeLink(
            peer_id=peer_id,
            wallet=caps.wallet,
            models=frozenset(caps.models),
            slots=max(caps.slots, 1),
            outbox=outbox,
            device=caps.device,
            max_pixels=caps.max_pixels,
            loras=frozenset(caps.loras),
            warm=frozenset(caps.warm_models),
            connected_at=self._clock(),
            payout=caps.payout,
            mode=caps.mode,
            features=frozenset(caps.version.split()),
        )
        old = self.nodes.get(peer_id)
        if old is not None:
            self.node_left(old, "replaced by a new stream from the same peer")
        self.nodes[peer_id] = link
        link.pool = self.free
        if self.hardware is not None:
            self.hardware.seen(caps)
        self.checks.node_joined()  # a check waiting for this node since a restart may run
        self._wake()
        return link

    def capabilities_changed(self, link: NodeLink, caps: Capabilities) -> None:
        """A connected node's models or LoRAs changed (`CapabilitiesUpdate`, checked by the
        session like a hello): routing uses them from the next offer on. Slots stay as
        agreed at the handshake (credit accounting is per session)."""
        link.models = frozenset(caps.models)
        link.loras = frozenset(caps.loras)
        link.warm = frozenset(caps.warm_models)
        link.max_pixels = caps.max_pixels
        link.device = caps.device
        link.payout = caps.payout  # where verifier work done from now on is paid
        link.mode = caps.mode
        self.free.touch(link)  # models and warm models: the pool's index files it anew
        if self.hardware is not None:
            self.hardware.seen(caps)
        log.info(
            "node_capabilities_changed",
            peer=link.peer_id,
            models=sorted(link.models),
            loras=len(link.loras),
        )
        self._wake()

    def usable(self, link: NodeLink) -> bool:
        """Would the router give this connected node work? Not while its wallet is
        blacklisted (strikes) or blocked (content reports): it stays connected meanwhile."""
        return not self.reputation.blacklisted(link.wallet) and (
            link.wallet.lower() not in self.router.blocked_nodes
        )

    def node_left(self, link: NodeLink, reason: str, *, goodbye: bool = False) -> None:
        """The stream ended: the node's jobs go back to the front of the queue. A cancelled
        one waits for its partial receipt unless the node said `goodbye` (a node leaving in
        order sends what it has first)."""
        if self.nodes.get(link.peer_id) is link:
            del self.nodes[link.peer_id]
            self.reputation.disconnected(link.wallet, self._clock() - link.connected_at)
        self.free.pop(link, None)
        link.pool = None
        for job in list(link.inflight.values()):
            self._release(
                job, link, f"node left: {reason}", penalize=True, partial_may_follow=not goodbye
            )
        for job_id in [j for j, links in self._stopping.items() if link in links]:
            self._stopped(link, job_id)
        link.outbox.close()
        if self.nodes.get(link.peer_id) is None:  # no newer stream: its challenges fail now
            self.challenges.node_left(link.peer_id, reason)
            self.verifications.node_left(link.peer_id, reason)
        self._save()

    async def challenge(
        self, peer_id: str, job_id: bytes, steps: list[int], timeout: float, pixels: bool = False
    ) -> ChallengeResult:
        """Ask node `peer_id` to open leaves `steps` of job `job_id`'s trajectory (and, with
        `pixels`, its lossy image's pixels: only ask a node naming `OPEN_PIXELS_FEATURE`);
        waits at most `timeout` s. The answer is not checked here: `ChallengeResult.fault`."""
        deadline = math.ceil(self._clock() + timeout)
        challenge = Challenge(
            job_id=job_id, steps=list(steps), deadline=deadline, pixels=pixels or msgspec.UNSET
        )
        link = self.nodes.get(peer_id)
        if link is None:
            return ChallengeResult(challenge, refused="node not connected")
        return await self.challenges.ask(peer_id, link.outbox, challenge, timeout)

    def ready(self, link: NodeLink, slots: int, warm_models: list[str] | None = None) -> None:
        """The node's credit: it can hold `slots` offers, those in flight included.

        A pipelining node (`sogni_node.pull`) says `slots + lookahead`: it keeps one offer in
        hand while its slots render (more, up to `MAX_LOOKAHEAD`, when its renders are shorter
        than the round trip), so its next job is there when a render ends; an older node says
        how many slots are free, at most `slots`. The answer is kept (`capacity`) and the
        credit recomputed from it whenever a result is acked."""
        if warm_models is not None:
            link.warm = frozenset(warm_models)
        link.capacity = max(0, min(slots, link.slots + MAX_LOOKAHEAD))
        link.credit = max(0, link.capacity - len(link.inflight))
        self._wake()

    def result_acked(self, link: NodeLink) -> None:
        """A result from a pipelining node was answered: its credit comes back without a
        `Ready` (its last `Ready`, above `slots`, said how many offers it holds in all). An
        older node's `Ready` counts free slots, so its credit waits for its next `Ready`."""
        if link.capacity <= link.slots:
            return
        credit = max(0, link.capacity - len(link.inflight))
        if credit > link.credit:
            link.credit = credit
            self._wake()

    def offer_declined(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        self.reputation.declined(link.wallet)
        self.handed_back(link, job_id, f"declined: {reason}")

    def handed_back(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        self._stopped(link, job_id)
        job = link.inflight.get(job_id)
        if job is not None:
            # offered to another wallet first while one can serve it: a node that fails
            # every job at once (its disk full) was offered the same jobs again and again
            # and spent each one's attempts in milliseconds
            self.excluded.setdefault(job_id, set()).add(link.wallet.lower())
            # with several coordinators a node declines what it has no slot for (offers from
            # all of them): not the job's fault, so no attempt of the job is spent
            self._release(
                job, link, f"handed back: {reason}", penalize=False, spent=self.cluster is None
            )
            self._save()

    def progress(self, link: NodeLink, job_id: bytes, step: int) -> None:
        job = link.inflight.get(job_id)
        if job is None:
            return
        state = self.requests.get(job.request_id)
        if state is None and self.cluster is not None:  # another coordinator's client
            self.cluster.progressed(job, step)
        if state is not None and state.mailbox.attached:
            # the latest step per job replaces the last: a slow client misses some, never more
            state.mailbox.progress[job_id] = JobProgress(
                job_id=job_id, index=job.index, step=step, steps=job.params.steps
            )
            state.mailbox.notify()

    async def accept_result(self, link: NodeLink, result: Result) -> None:
        """Verify a result and commit its receipt, or raise `ResultRefused` naming the fault.

        The receipt is durable when this returns; only then may the node hear "accepted".
        A bad result from the node holding the job is a strike, and the job is re-queued;
        a good one that came too late (`JobGone`) is neither.
        """
        self._stopped(link, result.job_id)  # a cancelled render's late result ends it too
        try:
            await self._accept(link, result)
        except (ResultRefused, ProtocolError) as exc:
            job = link.inflight.get(result.job_id)
            if job is not None and isinstance(exc, JobGone):  # no strike, nothing to re-render
                self._forget_holder(job, link)
                if self.cluster is not None:  # ended by another coordinator: not live here
                    self.cluster.lost(job.job_id)
                self._save()
            elif job is not None and isinstance(exc, StorageFault | NotTaken):
                self._release(job, link, str(exc), penalize=False)
                self._save()
            elif job is not None:  # the holder itself sent something bad
                if self.reputation.strike(link.wallet):
                    log.warning("worker_blacklisted", wallet=link.wallet, reason=str(exc))
                self._release(job, link, f"bad result: {exc}", penalize=False)
                self._save()
            if isinstance(exc, ResultRefused):
                raise
            raise ResultRefused(str(exc)) from None

    async def _accept(self, link: NodeLink, result: Result) -> None:
        taken = None
        held = self.jobs.get(result.job_id)
        if self.cluster is not None and (
            held is None or result.receipt.offer_hash not in held.offers
        ):
            taken = await self.cluster.take_result(link, result)  # another coordinator's offer
        try:
            await self._accept_checked(link, result)
        except BaseException:
            if taken is not None and self.jobs.get(taken.job_id) is taken:
                self.jobs.pop(taken.job_id, None)  # not held here: the shared queue has it
            raise

    async def _accept_checked(self, link: NodeLink, result: Result) -> None:
        if result.receipt.job_id == result.job_id and result.job_id not in self.jobs:
            raise JobGone(await self._gone_reason(result.job_id))
        job = self._check_result(link, result)
        receipt = result.receipt
        partial = receipt.steps_done < job.params.steps
        if not partial:
            p = job.params
            fault = await check_image(result.image, p.output_format, p.width, p.height)
            if fault is not None:
                raise ResultRefused(fault)
        delivered = result.image
        if self.image_safety is not None and not partial:  # docs/SAFETY.md
            screened = await self.image_safety.screen(
                job.request_id, job.params, result.image, digest=receipt.result_hash
            )  # `_check_result` checked result_hash == sha256(image)
            if screened.outcome in ("timeout", "error"):  # not the node's fault: retried
                raise StorageFault(IMAGE_REFUSALS["timeout"])
            if screened.outcome == "refuse":  # the holder is struck, the job goes elsewhere
                raise ResultRefused(IMAGE_REFUSALS["minors"])
            delivered = screened.image
        event = JobEvent.PARTIAL_RECEIPT if partial else JobEvent.RECEIPT
        try:
            outcome = transition(job.state, event)
        except Forbidden:
            raise ResultRefused("partial receipt for a job that was not cancelled") from None
        if partial and receipt.steps_done > (allowed := self._partial_steps_allowed(link, job)):
            measured = self.reputation.get(link.wallet).work_rate > 0
            raise (ResultRefused if measured else NotTaken)(  # a newcomer: no strike
                f"partial receipt claims {receipt.steps_done} of {job.params.steps} steps; the "
                f"time since the offer allows at most {allowed} at this node's "
                + ("measured speed" if measured else "newcomer's rate, before a full render")
            )
        # checks.py: a sampled receipt is held (stored pending, not billed nor delivered).
        # A late one for a job back in the queue (deadline missed, handed back, the node
        # reconnected) cannot be held while the queue may offer the job again: when its
        # draw says check, it is not taken (no strike, nothing owed); it was paid
        # unchecked, which let a node hand a job back, then answer it with noise. One the
        # client cancelled is held with its cancel (`checks.cancelled`: a restart resumes
        # the check with the job CANCELLING), paid only if the check passes.
        hold = self.checks.sampled(job, receipt, result.meta)
        if hold and job.state is JobState.QUEUED:
            raise JobGone(
                "this result came after the job was taken back from this node, and it "
                "was drawn for a check: not taken (nothing owed, no strike)"
            )
        path = None
        staged = None
        if not partial:  # durable before its receipt commits: a restart finds it there
            path = self.results.key(job.request_id, job.index, receipt.offer_hash)
            image = JobImage(
                job_id=job.job_id,
                index=job.index,
                seed=job.params.seed,
                image=delivered,
                receipt=receipt,
                signature=result.signature,
                meta=result.meta,
            )
            staged = self.results.staged(path, image)  # written by the receipt's group
            frame = len(staged[1].data)
            if frame > RESULT_FRAME_LIMIT:  # no client could ever read it: refused unpaid
                raise ResultRefused(
                    f"the image's frame to the client would be {frame} bytes, over the "
                    f"{RESULT_FRAME_LIMIT}-byte limit"
                )
        offer = job.signed_offers.get(receipt.offer_hash)
        if path is not None:
            while (twin := self._storing.get(path)) is not None:
                await twin.wait()  # the same result, being stored: its image is left alone
                if link.inflight.get(job.job_id) is not job:  # the twin settled the job
                    raise JobGone(await self._gone_reason(job.job_id))
            storing = self._storing[path] = trio.Event()
        # From here the receipt's write is queued, and cancelling the wait would not cancel
        # the write, only what follows it: a node session ended meanwhile (a reset, the node
        # replaced) would leave the job live while its receipt commits, re-queue it, and every
        # honest re-render would be refused as already receipted (a strike each, then the
        # client's JobFailed while the first node is paid). So it runs to its end, shielded:
        # the write is bounded (`db.WRITE_DEADLINE`), and what follows waits on the database only.
        with trio.CancelScope(shield=True):
            self._committing[job.job_id] = self._committing.get(job.job_id, 0) + 1
            committed = False
            try:
                try:
                    if hold:
                        now = self._clock()
                        committed = await self.store.call_staged(
                            staged,
                            self.store.store_held_receipt,
                            receipt,
                            result.signature,
                            job.request_id,
                            offer,
                            peer_id=link.peer_id,
                            dtype=result.meta.dtype if result.meta else "",
                            elapsed=_elapsed(job, link, now, receipt),
                            cancelled=job.state is JobState.CANCELLING,
                        )
                    else:
                        committed = await self.receipts.commit(
                            receipt, result.signature, job.request_id, outcome, offer, image=staged
                        )
                except OSError as exc:  # the image (a receipt's write raises no OSError)
                    log.error("result_file_write_failed", job=job.job_id.hex()[:16], error=str(exc))
                    raise StorageFault("the coordinator could not store the image; retry") from None
                if not committed:
                    # a store that joins the database wrote no row for a refused receipt
                    if path is not None and not self.results.joins(self.store.location):
                        await self.results.discard([path])
                    raise JobGone(await self._gone_reason(job.job_id))
            finally:  # a waiting twin runs once this result is settled (no await from here on)
                if path is not None:
                    del self._storing[path]
                    storing.set()
                self._committed(job, committed)
            if hold and path is not None:
                self._hold(job, link, receipt, result.meta.dtype if result.meta else "", path)
                return
            # durable from here on: the node is paid whatever happened meanwhile
            # with several coordinators the request's owner bills it (`Cluster.refresh`)
            if self.billing is not None and (
                self.cluster is None or job.request_id in self.requests
            ):
                self.billing.settle(
                    job.request_id, job.job_id, receipt.payee, receipt.steps_done, job.params.steps
                )  # the payee: where the receipt says its rewards go, as the epoch pays them
            now = self._clock()
            elapsed = _elapsed(job, link, now, receipt)  # LATE: its holding was released
            budget = render_budget(job.params, self.deadline_floor, self.deadline_base)
            self.reputation.succeeded(
                link.wallet,
                max(0.0, elapsed),
                budget,
                receipt.work_units,
                full=not partial,
                late=elapsed == LATE,
                timed=elapsed != UNTIMED,
            )
            try:
                self._to(job, event, durable=True)
            except Forbidden:  # it ended (failed) while the receipt was being committed
                log.warning("receipt_for_ended_job", job=job.job_id.hex()[:16], state=job.state)
                return
            state = self.requests.get(job.request_id)
            if state is not None and path is not None:
                if elapsed >= 0:  # a straggler's measure: render times only
                    state.durations.append(elapsed)
                state.mailbox.add_image(job.job_id, path)
                state.mailbox.progress.pop(job.job_id, None)
                state.mailbox.notify()
            self._ended(job, keep=link)
            self._save()

    # --- held receipts (checks.py): the dispatcher's side --------------------------------
    def _hold(
        self, job: Job, link: NodeLink, receipt: Receipt, dtype: str, path: ResultKey
    ) -> None:
        """A sampled receipt is stored pending: the job stays live (RUNNING, no holder: the
        client sees it rendering) until `check_passed` or `check_failed`."""
        now = self._clock()
        elapsed = _elapsed(job, link, now, receipt)
        budget = render_budget(job.params, self.deadline_floor, self.deadline_base)
        for other in list(job.holders):
            if other is not link:  # a straggler's copy: its receipt could not be stored now
                self._cancel_on(other, job)
            self._forget_holder(job, other)
        self.checks.hold(
            Held(job, link.peer_id, link.wallet, receipt, dtype, path, elapsed, budget)
        )
        self._save()

    async def check_passed(self, held: Held, verdict: str) -> None:
        """Release a held receipt as `_accept` does any other: settle, credit, deliver."""
        job, receipt = held.job, held.receipt
        mark = "passed" if verdict == "pass" else "skipped"
        if not await until_written(
            lambda: self.store.call(self.store.mark_check, job.job_id, mark), "check verdict"
        ):
            self._decided_elsewhere(job)
            return
        if self.billing is not None:
            self.billing.settle(
                job.request_id, job.job_id, receipt.payee, receipt.steps_done, job.params.steps
            )  # the payee: where the receipt says its rewards go, as the epoch pays them
        late = held.elapsed == LATE
        self.reputation.succeeded(
            held.worker,
            max(0.0, held.elapsed),
            held.budget,
            receipt.work_units,
            late=late,
            timed=held.elapsed != UNTIMED,
        )
        self.excluded.pop(job.job_id, None)
        self._to(job, JobEvent.RECEIPT, durable=True)
        if self.cluster is not None:  # its shared queue row: done now (cluster.py)
            self.cluster.held_passed(job)
        state = self.requests.get(job.request_id)
        if state is not None:
            if held.elapsed >= 0:
                state.durations.append(held.elapsed)
            state.mailbox.add_image(job.job_id, held.path)
            state.mailbox.progress.pop(job.job_id, None)
            state.mailbox.notify()
        self._ended(job)
        self._save()

    def _decided_elsewhere(self, job: Job) -> None:
        """Another coordinator's check of the same held receipt decided first (this one's
        lease lapsed meanwhile and the job was leased again): its verdict stands; nothing is
        settled, struck, discarded or counted here, and the job leaves this coordinator."""
        log.info("check_decided_elsewhere", job=job.job_id.hex()[:16])
        self.jobs.pop(job.job_id, None)
        if self.cluster is not None:
            self.cluster.lost(job.job_id)

    async def check_failed(
        self, held: Held, reason: str, *, strike: bool, evidence: bytes | None = None
    ) -> None:
        """The receipt becomes evidence (`failed_receipts`, with the check's `evidence`),
        nothing is charged, the worker is struck, and the job goes back to the queue, away
        from that wallet if it can. A wallet blacklisted by the strike gets a slash proposal
        (`Store.propose_slash`), for the operator to sign offline with the settlement key."""
        job = held.job
        if not await until_written(
            lambda: self.store.call(self.store.fail_held_receipt, job.job_id, reason, evidence),
            "check verdict",
        ):
            self._decided_elsewhere(job)
            return
        # the verdict is stored: what follows must not stop the job going back to the queue
        if self.refusals is not None and strike:  # disputable: signed, kept for a re-check
            charge = 0  # billing off: no payer, nothing an epoch would have paid
            try:
                if self.billing is not None:  # what a won dispute restores the worker's share
                    charge = await trio.to_thread.run_sync(
                        self.billing.ledger.paid_value_of,
                        job.request_id,
                        held.receipt.steps_done,
                        job.params.steps,
                    )
                self.refusals.refused(
                    held.receipt, job.params, held.dtype, reason, evidence, charge=charge
                )
            except (*DATABASE_ERRORS, OSError) as exc:
                log.error("refusal_not_signed", job=job.job_id.hex()[:16], error=str(exc)[:200])
        try:
            await self.results.discard([held.path])
        except OSError as exc:  # an orphan file, pruned with its request's folder
            log.error("held_image_not_discarded", job=job.job_id.hex()[:16], error=str(exc))
        log.warning("receipt_check_failed", job=job.job_id.hex()[:16], worker=held.worker)
        if strike and self.reputation.strike(held.worker, job=job.job_id):
            log.warning("worker_blacklisted", wallet=held.worker, reason=reason)
            since = time.time() - STRIKE_WINDOW
            try:
                failed = await self.store.call(self.store.failed_job_ids, held.worker, since)
                if self.refusals is not None:  # a job whose dispute it won is no evidence
                    cleared = self.refusals.book.pardoned(held.worker, failed)
                    failed = [j for j in failed if j not in cleared]
                why = (
                    f"{len(failed)} failed result checks within {STRIKE_WINDOW:g} s; last: {reason}"
                )
                await self.store.call(self.store.propose_slash, held.worker, why[:500], failed)
            except DATABASE_ERRORS as exc:  # the blacklist stands; the operator is told
                log.error("slash_not_proposed", wallet=held.worker, error=str(exc)[:200])
        self.excluded.setdefault(job.job_id, set()).add(held.worker.lower())
        if self._to(job, JobEvent.RELEASE) is JobState.CANCELLED:
            self._ended(job)
            self._save()
            return
        job.attempts += 1
        self._unsaved[job.job_id] = job
        if job.attempts >= MAX_ATTEMPTS:
            self._give_up(job, f"gave up after {job.attempts} attempts; last: {reason}")
        else:
            self._requeue(job)
        self._save()

    def _candidates(self, job: Job) -> FreePool | list[NodeLink]:
        """Nodes `job` may be offered to: not a wallet whose receipt for it failed a check,
        unless no other connected node can serve it."""
        bad = self.excluded.get(job.job_id)
        stopping = self._stopping.get(job.job_id)
        if not bad and not stopping:  # only nodes with credit can be picked: the pool itself
            return self.free
        nodes = list(self.nodes.values()) if bad else list(self.free)
        if stopping:  # never the node still stopping this job (`_cancel_on`)
            nodes = [n for n in nodes if n not in stopping]
        if not bad:
            return nodes
        others = [n for n in nodes if n.wallet.lower() not in bad]
        if any(self.router.capable(n, job.network, job.params) for n in others):
            return others
        return nodes

    def _check_result(self, link: NodeLink, result: Result) -> Job:
        """Everything about a result that can be checked before committing it."""
        receipt = result.receipt
        if receipt.job_id != result.job_id:
            raise ResultRefused("receipt is for another job")
        job = self.jobs.get(result.job_id)
        if job is None:  # `_accept_checked` said why before calling
            raise ResultRefused("unknown job")
        offered_to = job.offers.get(receipt.offer_hash)
        if offered_to is None:
            raise ResultRefused("receipt names an offer this coordinator did not make")
        if offered_to != link.peer_id:
            raise ResultRefused("offer was made to another node")
        signed = job.signed_offers.get(receipt.offer_hash)  # another coordinator's: cluster.py
        offered_by = signed[0].coordinator if signed is not None else self.address
        if not eip712.same_address(receipt.coordinator, offered_by):
            raise ResultRefused("receipt names another coordinator")
        if not eip712.same_address(receipt.worker, link.wallet):
            raise ResultRefused("receipt worker is not the wallet bound to this peer")
        if receipt.model_id != job.params.model_id:
            raise ResultRefused("receipt names another model")
        if receipt.price_factor_bps != price_factor_bps(job.network):
            raise ResultRefused("receipt's price factor differs from the offer's tier")
        steps = job.params.steps
        if receipt.steps_done < steps:
            if result.image or receipt.result_hash != EMPTY_SHA256:
                raise ResultRefused("a partial receipt carries no image")
            if receipt.work_units != job.work_units * receipt.steps_done // steps:
                raise ResultRefused("partial receipt's work units are not pro rata")
        elif receipt.steps_done != steps or receipt.work_units != job.work_units:
            raise ResultRefused("receipt steps or work units differ from the offer")
        if hashlib.sha256(result.image).digest() != receipt.result_hash:
            raise ResultRefused("resultHash is not the sha256 of the image bytes")
        if result.image and format_of(result.image) != job.params.output_format:
            raise ResultRefused(f"image is not the {job.params.output_format} the job asked for")
        signer = eip712.recover_receipt_signer(self.domain, receipt, result.signature)
        if not eip712.same_address(signer, link.wallet):
            raise ResultRefused("receipt signature is not from the node's wallet")
        return job

    def _partial_steps_allowed(self, link: NodeLink, job: Job) -> int:
        """The most steps `link` can have done on `job` since it was offered: elapsed time at
        the rate this coordinator measured for the node (full receipts, with a margin, up to
        `MAX_PARTIAL_WORK_RATE`), or at `NEWCOMER_WORK_RATE` before it has any; never the
        node's own claim."""
        offered = job.holders.get(link, math.inf)  # none: its stream was lost, or a restart
        # from the job's first offer to this node: after a reconnect it answers the re-offer
        # with the partial receipt of the render its earlier session started (the steps
        # were done before this offer; measured from it, the honest claim was a strike)
        budget = render_budget(job.params, self.deadline_floor, self.deadline_base)
        for offer_hash, peer in job.offers.items():
            signed = job.signed_offers.get(offer_hash)
            if peer == link.peer_id and signed is not None:
                offered = min(offered, signed[0].deadline - budget)
        if offered == math.inf:
            return 0
        measured = self.reputation.get(link.wallet).work_rate
        rate = NEWCOMER_WORK_RATE if measured <= 0 else PARTIAL_RATE_MARGIN * measured
        elapsed = max(0.0, self._clock() - offered)
        per_step = job.work_units / job.params.steps  # work units of one step of this job
        return 1 + int(elapsed * min(rate, MAX_PARTIAL_WORK_RATE) / max(per_step, 1e-9))

    async def _gone_reason(self, job_id: bytes) -> str:
        """Why a result for a job no longer live here is refused (store reads in a worker
        thread: on PostgreSQL each is a round trip)."""

        def read() -> str:
            if self.store.receipt(job_id) is not None:
                return "job already receipted"
            state = self.store.job_state(job_id)
            return "unknown job" if state is None else f"job already ended ({state.value})"

        return await trio.to_thread.run_sync(read)

    # --- matching ------------------------------------------------------------------------
    async def run(self) -> None:
        """Match queued jobs to nodes whenever something changes; sweep on a short period."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_forever)
            nursery.start_soon(self._shred_forever)
            nursery.start_soon(self.receipts.run)
            nursery.start_soon(self.checks.run)
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                self.match()

    def _wake(self) -> None:
        self._changed.set()
        if self.cluster is not None:
            self.cluster.poke()

    def _enqueue(self, job: Job, *, front: bool = False) -> None:
        self.jobs[job.job_id] = job
        (self.queue.appendleft if front else self.queue.append)(job)
        self._queued_by_request.setdefault(job.request_id, {})[job] = None
        self._wake()

    def _dequeued(self, job: Job) -> None:
        """`job`'s queue entry was taken (offered, or dropped as no longer waiting)."""
        waiting = self._queued_by_request.get(job.request_id)
        if waiting is not None:
            waiting.pop(job, None)
            if not waiting:
                del self._queued_by_request[job.request_id]
                self._unservable.discard(job.request_id)

    def _waiting(self, job: Job) -> bool:
        """Is this queue entry live? A job leaves QUEUED without leaving the queue (late
        receipt, cancel, give-up, handed back to the shared queue: `Cluster.give_back`);
        such stale entries are skipped and dropped here."""
        return job.state is JobState.QUEUED and self.jobs.get(job.job_id) is job

    def match(self) -> None:
        """One pass: offer queued jobs to nodes with credit, in queue order."""
        if not self.queue or not self.free:
            return
        benefits = self.billing.benefits if self.billing is not None else None
        upgrades = upgrade_rule(benefits, self.router, self.nodes, self.queue.tiers)
        blocked: set[bytes] = set()  # requests no free node can serve in this pass
        # Jobs looked at and left go back to the front, in order; the rest of the queue is
        # not touched (a pass costs the jobs it looks at, not the queue's length). A blocked
        # request's jobs queued behind the one looked at are set aside as one run: a pass
        # does not pop each job of a request capped at its 16 busy nodes.
        unmatched: list[Job | deque[Job]] = []
        with self.router.one_pass():
            while self.queue and self.free:
                job = self.queue.popleft()
                if not self._waiting(job):
                    self._dequeued(job)
                    continue
                if job.request_id in blocked:  # its jobs differ only by seed: same answer
                    unmatched.append(job)
                    unmatched.append(self.queue.take_run(job.request_id))
                    continue
                state = self.requests.get(job.request_id)
                # the request's nodes as a view: no set built per job
                in_use = state.nodes.keys() if state is not None else _NO_NODES
                link = pick_with_upgrade(
                    self.router, job, self._candidates(job), in_use, upgrade=upgrades(job)
                )
                if link is None:
                    unmatched.append(job)
                    # its siblings may go where it may not
                    if job.job_id not in self.excluded and job.job_id not in self._stopping:
                        blocked.add(job.request_id)
                        unmatched.append(self.queue.take_run(job.request_id))
                elif not self._offer(job, link):
                    link.credit = 0  # its stream is gone; node_left follows
                    unmatched.append(job)
                else:
                    self._dequeued(job)
        for entry in reversed(unmatched):
            if isinstance(entry, deque):
                self.queue.put_back_run(entry)
            else:
                self.queue.appendleft(entry)

    def _offer(self, job: Job, link: NodeLink) -> bool:
        """Sign and send an offer; False if the node's outbox refused it."""
        now = self._clock()
        budget = render_budget(job.params, self.deadline_floor, self.deadline_base)
        offer = JobOffer(
            job_id=job.job_id,
            coordinator=self.address,
            model_id=job.params.model_id,
            params_hash=eip712.params_hash(job.params),
            steps=job.params.steps,
            width=job.params.width,
            height=job.params.height,
            seed=job.params.seed,
            work_units=job.work_units,
            deadline=int(now + budget),
            price_factor_bps=price_factor_bps(job.network),
        )
        offer_hash = eip712.offer_hash(self.domain, offer)
        signature = eip712.sign_digest(self._key, offer_hash)
        try:
            link.outbox.send_nowait(Offer(offer=offer, params=job.params, signature=signature))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._to(job, JobEvent.OFFER)  # RUNNING is stored as QUEUED: nothing to write
        job.unservable_since = None  # a node serves it: a later grace starts afresh
        if _debug_log.isEnabledFor(logging.DEBUG):  # per offer: skip the filtered call's cost
            log.debug("offer_sent", job=job.job_id.hex()[:16], peer=link.peer_id, budget_s=budget)
        job.offers[offer_hash] = link.peer_id
        job.signed_offers[offer_hash] = (offer, signature)
        if self.cluster is not None:  # a node may deliver it to another coordinator
            self.cluster.offered(job, link, offer, offer_hash, signature)
        job.holders[link] = now
        job.deadlines[link] = now + budget
        heapq.heappush(self._deadlines, (now + budget, next(self._tiebreak), job, link))
        link.credit -= 1
        link.inflight[job.job_id] = job
        state = self.requests.get(job.request_id)
        if state is not None:
            state.nodes[link] = state.nodes.get(link, 0) + 1
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(min(0.5, self.deadline_floor / 4))
            self.sweep()

    async def _shred_forever(self) -> None:
        """Shred the prompt keys of requests ended `prompt_retention` seconds ago: when a
        request ends (retention 0) and on a period otherwise."""
        while True:
            with trio.move_on_after(min(max(self.prompt_retention / 2, 1.0), 60.0)):
                await self._shred_wake.wait()
            self._shred_wake = trio.Event()
            try:
                shredded = await trio.to_thread.run_sync(
                    self.store.shred_keys, self.prompt_retention
                )
            except DATABASE_ERRORS as exc:  # shredded at the next round; the daemon runs on
                log.error("prompt_keys_not_shredded", error=str(exc)[:200])
                continue
            if shredded:
                log.info("prompt_keys_shredded", requests=shredded)

    def sweep(self) -> None:
        """Deadlines, jobs nobody can serve, and stragglers near the end of a request.

        Its cost is the work it finds, not the queue's length: expired deadlines come off a
        heap, servability is asked once per request with queued jobs (their jobs are walked
        only while the request cannot be served), and stragglers are looked for among the
        running jobs of requests with nothing queued."""
        now = self._clock()
        heap = self._deadlines
        while heap and heap[0][0] < now:
            deadline, _, job, link = heapq.heappop(heap)
            if self.jobs.get(job.job_id) is job and job.deadlines.get(link) == deadline:
                self._cancel_on(link, job)
                self._release(job, link, "deadline missed", penalize=True)
        if self._stopping:
            self._expire_stops(now)
        waits = self._partial_waits
        while waits and waits[0][0] < now:
            _, _, job = heapq.heappop(waits)
            if (
                self.jobs.get(job.job_id) is job
                and job.state is JobState.CANCELLING
                and not job.holders
                and not self._committing.get(job.job_id)
            ):
                self._let_go(job, "no partial receipt came", spent=False)
                self._save()
        queued: set[bytes] = set()  # requests with jobs waiting in the queue
        for request_id, entries in list(self._queued_by_request.items()):
            first = self._first_waiting(request_id, entries)
            if first is None:
                continue
            queued.add(request_id)
            # a request's jobs differ only by seed: one answer for all of them
            if self.can_serve(first.network, first.params):
                if request_id in self._unservable:  # their grace clocks stop
                    self._unservable.discard(request_id)
                    for job in entries:
                        job.unservable_since = None
                continue
            self._unservable.add(request_id)
            for job in [j for j in entries if self._waiting(j)]:
                if job.unservable_since is None:
                    job.unservable_since = now
                elif now - job.unservable_since > self.no_node_grace:
                    self._dequeued(job)
                    if self.cluster is not None:  # another coordinator's nodes may serve it
                        self.cluster.give_back(job)
                        continue
                    p = job.params
                    self._give_up(job, f"no connected node can serve {job.network} {p.model_id}")
            if request_id not in self._queued_by_request:
                self._unservable.discard(request_id)
        self._copy_stragglers(now, queued)
        self._save()

    def _first_waiting(self, request_id: bytes, entries: dict[Job, None]) -> Job | None:
        """The request's first queue entry still waiting; the stale ones before it are
        dropped (None: none waits, and the request leaves the index)."""
        for job in list(entries):
            if self._waiting(job):
                return job
            del entries[job]
        del self._queued_by_request[request_id]
        self._unservable.discard(request_id)
        return None

    def _copy_stragglers(self, now: float, queued: set[bytes]) -> None:
        """A second copy of a job running far longer than its request's median, once the
        request has nothing left queued (the tail of a batch)."""
        for request_id, state in list(self.requests.items()):
            if request_id in queued or len(state.durations) < 3:
                continue
            limit = STRAGGLER_FACTOR * statistics.median(state.durations)
            running = {
                job.job_id: job
                for link in state.nodes
                for job in link.inflight.values()
                if job.request_id == request_id
            }
            for job in running.values():
                if (
                    self.jobs.get(job.job_id) is not job
                    or job.state is not JobState.RUNNING
                    or len(job.holders) != 1
                ):
                    continue
                started = next(iter(job.holders.values()))
                if now - started > limit:
                    link = self.router.pick(job, self._candidates(job), state.nodes.keys())
                    if link is not None and self._offer(job, link):
                        log.info("straggler_copied", job=job.job_id.hex()[:16])

    # --- holders and endings -------------------------------------------------------------
    def _cancel_on(self, link: NodeLink, job: Job) -> None:
        """Tell `link` to stop `job`, and keep the job from it until it answers or
        `cancel_grace` passes: re-offered while it still renders the job, it can only decline
        ("already running here"), and each decline would spend one of the job's attempts."""
        self._send_to_node(link, Cancel(job_id=job.job_id))
        self._stopping.setdefault(job.job_id, {})[link] = self._clock() + self.cancel_grace

    def _stopped(self, link: NodeLink, job_id: bytes) -> None:
        """`link` answered for a job it was told to stop: it may be offered the job again."""
        links = self._stopping.get(job_id)
        if links is None or links.pop(link, None) is None:
            return
        if not links:
            del self._stopping[job_id]
        self._wake()

    def _expire_stops(self, now: float) -> None:
        """Nodes that never answered a cancel within `cancel_grace` may be offered the job."""
        for job_id, links in list(self._stopping.items()):
            for link, until in list(links.items()):
                if until <= now:
                    self._stopped(link, job_id)

    def _forget_holder(self, job: Job, link: NodeLink) -> bool:
        """Drop `link` from `job`'s holders (no state change); False if it held nothing."""
        link.inflight.pop(job.job_id, None)
        self.free.touch(link)  # a slot freed: the pool's index files it idle again
        if job.holders.pop(link, None) is None:
            return False
        job.deadlines.pop(link, None)
        state = self.requests.get(job.request_id)
        if state is not None and link in state.nodes:
            state.nodes[link] -= 1
            if state.nodes[link] <= 0:
                del state.nodes[link]
        return True

    def _release(
        self,
        job: Job,
        link: NodeLink,
        reason: str,
        *,
        penalize: bool,
        spent: bool = True,
        partial_may_follow: bool = False,
    ) -> None:
        """`link` no longer renders `job`. When it was the last holder, the job goes back to
        the queue (an attempt spent unless not `spent`), or ends if it was being cancelled or
        out of attempts; a cancelled one whose node's stream was lost (`partial_may_follow`)
        first waits for the partial receipt the node sends when it reconnects."""
        if not self._forget_holder(job, link):
            return
        if penalize:
            self.reputation.failed(link.wallet)
        if job.holders:  # a straggler's copy runs on
            return
        if self._committing.get(job.job_id):  # a receipt for it is being committed: given
            self._let_go_later[job.job_id] = (reason, spent, partial_may_follow)  # up, and the
            return  # receipt would be stored, acked and never delivered nor paid; then refused
        self._let_go(job, reason, spent=spent, wait_partial=partial_may_follow)

    def _committed(self, job: Job, committed: bool) -> None:
        """A receipt write for `job` ended: a release put off meanwhile happens now unless
        the receipt was stored (then the job ends with it, as if the holder had stayed)."""
        left = self._committing[job.job_id] - 1
        if left:
            self._committing[job.job_id] = left
            return
        del self._committing[job.job_id]
        later = self._let_go_later.pop(job.job_id, None)
        if later is None or committed or self.jobs.get(job.job_id) is not job:
            return
        if not job.holders and job.state in (JobState.RUNNING, JobState.CANCELLING):
            self._let_go(job, later[0], spent=later[1], wait_partial=later[2])
            self._save()

    def _let_go(self, job: Job, reason: str, *, spent: bool, wait_partial: bool = False) -> None:
        """The job's last holder let go: back to the queue, or its end."""
        if wait_partial and job.state is JobState.CANCELLING and job.partial_wait is None:
            self._await_partial(job)
            return
        if self._to(job, JobEvent.RELEASE) is JobState.CANCELLED:
            self._ended(job)
            return
        if not spent:  # the shared queue's lease count bounds these (cluster.py)
            self._requeue(job)
            return
        job.attempts += 1
        self._unsaved[job.job_id] = job  # attempts survive a restart
        log.info("job_requeued", job=job.job_id.hex()[:16], attempts=job.attempts, reason=reason)
        if job.attempts >= MAX_ATTEMPTS:
            self._give_up(job, f"gave up after {job.attempts} attempts; last: {reason}")
            return
        self._requeue(job)

    def _await_partial(self, job: Job) -> None:
        """A cancelled job with no holder left stays live (cancelling) for `PARTIAL_WAIT`:
        the partial receipt its node kept comes when the node reconnects, checked against
        the offer made to it (`job.offers` keeps it); `sweep` ends it unpaid after that."""
        job.partial_wait = self._clock() + self.partial_wait
        heapq.heappush(self._partial_waits, (job.partial_wait, next(self._tiebreak), job))
        log.info("partial_receipt_awaited", job=job.job_id.hex()[:16], seconds=self.partial_wait)

    def _requeue(self, job: Job) -> None:
        """Back to the front of the queue; with several coordinators, the shared queue."""
        if self.cluster is not None:
            self.cluster.give_back(job)
        else:
            self._enqueue(job, front=True)

    def _give_up(self, job: Job, reason: str) -> None:
        self._to(job, JobEvent.GIVE_UP)
        if self.cluster is not None:
            self.cluster.gave_up(job)
        state = self.requests.get(job.request_id)
        if state is not None:  # told once its failed state is durable (`Store.after_queued`)
            self._save()
            box = state.mailbox
            failed = JobFailed(job_id=job.job_id, index=job.index, reason=reason)

            def tell() -> None:
                box.add_failure(failed)
                box.notify()

            self.store.after_queued(tell)
        self._ended(job)

    def _ended(self, job: Job, *, keep: NodeLink | None = None) -> None:
        """A job reached a terminal state: stop its other holders and count it for its
        request (the image or `JobFailed` was already sent)."""
        assert job.state in TERMINAL, job.state
        self.jobs.pop(job.job_id, None)
        self.excluded.pop(job.job_id, None)
        self._stopping.pop(job.job_id, None)
        if self.cluster is not None:
            self.cluster.ended(job)
        for other in list(job.holders):
            if other is not keep:  # e.g. a straggler's copy still running
                self._send_to_node(other, Cancel(job_id=job.job_id))
            self._forget_holder(job, other)
        state = self.requests.get(job.request_id)
        if state is None:
            return
        if job.state is JobState.DONE:
            state.delivered += 1
        elif job.state is JobState.FAILED:
            state.failed += 1
        else:
            state.cancelled += 1
        state.remaining -= 1
        if state.remaining <= 0:
            self.finish_request(state)

    def finish_request(self, state: RequestState) -> None:
        """Every job of the request ended: refund the rest, tell the client, forget it."""
        if self.requests.get(state.request_id) is state:
            del self.requests[state.request_id]
            self.queue.forget(state.request_id)
            self._save()  # the jobs' end is durable before the rest is refunded
            if self.billing is not None:
                self.billing.finish(state.request_id)
            box = state.mailbox
            done = RequestDone(
                request_id=state.request_id,
                delivered=state.delivered,
                failed=state.failed,
                cancelled=state.cancelled,
            )

            def tell() -> None:  # once the jobs' end and the refund are durable: a client
                box.done = done  # told "cancelled" before, then a crash, had its request
                box.notify()  # rendered (and charged) after the restart
                if box.idle and self.mailboxes.get(box.request_id) is box:
                    del self.mailboxes[box.request_id]

            self.store.after_queued(tell)
            log.debug("request_ended", request=short(state.request_id))
            self._shred_wake.set()
            state.finished.set()

    def _send_to_node(self, link: NodeLink, msg: Message) -> None:
        try:
            link.outbox.send_nowait(msg)
        except trio.WouldBlock:
            # The node stopped reading: its writer times out within 30 s and node_left
            # re-queues its jobs.
            log.warning("node_outbox_full", peer=link.peer_id, kind=type(msg).__name__)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the node is gone; its jobs are re-queued by node_left
