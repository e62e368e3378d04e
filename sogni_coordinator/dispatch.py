"""The job queue and the routing of jobs to connected nodes.

One `Dispatcher` per coordinator holds the live view: queued jobs, connected nodes with their
free slots, and the requests waiting for images. Node and client sessions call into it; its
`run` task matches queued jobs to nodes whenever either side changes, and its deadline sweep
puts expired jobs back in the queue. All of it runs on one trio thread, so no locks.

Routing here is "least-loaded capable node first"; the economics issue replaces `_pick_node`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from sogni_coordinator.billing import Billing
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    Cancel,
    JobFailed,
    JobImage,
    JobOffer,
    JobParams,
    JobProgress,
    Message,
    Offer,
    Result,
)

log = get_logger(__name__)

MAX_ATTEMPTS = 5
"""A job that fails this many times (node lost, deadline, hand-back) is given up on."""


def render_budget(params: JobParams, floor: float, base: float = 30.0) -> float:
    """AI Horde's deadline rule: generous for small jobs, grows with steps x pixels."""
    return max(floor, base + 2.0 * params.steps * params.width * params.height / 512**2)


@dataclass(eq=False)
class NodeLink:
    """The coordinator's view of one connected node (one pull stream)."""

    peer_id: str
    wallet: str
    models: frozenset[str]
    slots: int
    outbox: trio.MemorySendChannel[Message]
    credit: int = 0
    inflight: dict[bytes, Job] = field(default_factory=dict)

    @property
    def load(self) -> float:
        return len(self.inflight) / max(self.slots, 1)


@dataclass(eq=False)
class Job:
    job_id: bytes
    request_id: bytes
    index: int
    params: JobParams
    work_units: int
    attempts: int = 0
    node: NodeLink | None = None
    deadline: float = math.inf
    offers: dict[bytes, str] = field(default_factory=dict)
    """Every offer hash issued for this job -> the peer id it was issued to."""


@dataclass(eq=False)
class RequestState:
    request_id: bytes
    remaining: int
    outbox: trio.MemorySendChannel[Message] | None
    on_orphan_image: Callable[[bytes, int, bytes], None]
    delivered: int = 0
    failed: int = 0
    finished: trio.Event = field(default_factory=trio.Event)


class ResultRefused(Exception):
    """A result the coordinator will not receipt; the message goes back to the node."""


class Dispatcher:
    def __init__(
        self,
        store: Store,
        *,
        signer_key: bytes,
        signer_address: str,
        domain: Domain,
        deadline_floor: float = 150.0,
        deadline_base: float = 30.0,
        clock: Callable[[], float] = time.time,
        billing: Billing | None = None,
    ) -> None:
        self.store = store
        self._key = signer_key
        self.address = signer_address
        self.domain = domain
        self.deadline_floor = deadline_floor
        self.deadline_base = deadline_base
        self._clock = clock
        self.billing = billing
        self.queue: deque[Job] = deque()
        self.jobs: dict[bytes, Job] = {}
        self.nodes: dict[str, NodeLink] = {}
        self.requests: dict[bytes, RequestState] = {}
        self._changed = trio.Event()

    # --- bookkeeping ---------------------------------------------------------------------
    def known_models(self) -> set[str]:
        return {m for link in self.nodes.values() for m in link.models}

    def _wake(self) -> None:
        self._changed.set()

    def enqueue(self, job: Job, *, front: bool = False) -> None:
        self.jobs[job.job_id] = job
        job.node = None
        job.deadline = math.inf
        (self.queue.appendleft if front else self.queue.append)(job)
        self._wake()

    def add_request(self, state: RequestState, jobs: list[Job]) -> None:
        self.requests[state.request_id] = state
        for job in jobs:
            self.enqueue(job)

    def detach_client(self, request_id: bytes) -> None:
        """The client went away: its jobs still run and are receipted; images go to disk."""
        state = self.requests.get(request_id)
        if state is not None and state.outbox is not None:
            state.outbox.close()
            state.outbox = None

    def node_joined(self, link: NodeLink) -> None:
        old = self.nodes.get(link.peer_id)
        if old is not None:
            self.node_left(old, "replaced by a new stream from the same peer")
        self.nodes[link.peer_id] = link
        self._wake()

    def node_left(self, link: NodeLink, reason: str) -> None:
        if self.nodes.get(link.peer_id) is link:
            del self.nodes[link.peer_id]
        for job in list(link.inflight.values()):
            self._retry(job, f"node left: {reason}")
        link.inflight.clear()
        link.outbox.close()

    def add_credit(self, link: NodeLink, slots: int) -> None:
        link.credit = max(0, min(slots, link.slots))
        self._wake()

    # --- matching ------------------------------------------------------------------------
    async def run(self) -> None:
        """Match queued jobs to nodes whenever something changes; sweep deadlines each second."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_deadlines)
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                self._match()

    def _match(self) -> None:
        if not self.queue or not self.nodes:
            return
        unmatched: deque[Job] = deque()
        while self.queue:
            job = self.queue.popleft()
            if job.job_id not in self.jobs:  # finished while it waited (late receipt)
                continue
            link = self._pick_node(job)
            if link is None:
                unmatched.append(job)
                if not any(n.credit > 0 for n in self.nodes.values()):
                    break
                continue
            self._offer(job, link)
        unmatched.extend(self.queue)
        self.queue = unmatched

    def _pick_node(self, job: Job) -> NodeLink | None:
        best: NodeLink | None = None
        for link in self.nodes.values():
            if link.credit <= 0 or job.params.model_id not in link.models:
                continue
            if best is None or link.load < best.load:
                best = link
        return best

    def _offer(self, job: Job, link: NodeLink) -> None:
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
        )
        offer_hash = eip712.offer_hash(self.domain, offer)
        signature = eip712.sign_digest(self._key, offer_hash)
        try:
            link.outbox.send_nowait(Offer(offer=offer, params=job.params, signature=signature))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.queue.append(job)
            return
        log.debug("offer_sent", job=job.job_id.hex()[:16], peer=link.peer_id, budget_s=budget)
        job.offers[offer_hash] = link.peer_id
        job.node = link
        job.deadline = now + budget
        link.credit -= 1
        link.inflight[job.job_id] = job

    async def _sweep_deadlines(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.deadline_floor / 4))
            now = self._clock()
            for job in [j for j in self.jobs.values() if j.node is not None and j.deadline < now]:
                node = job.node
                assert node is not None
                node.inflight.pop(job.job_id, None)
                self._send_to_node(node, Cancel(job_id=job.job_id))
                self._retry(job, "deadline missed")

    # --- events from nodes ---------------------------------------------------------------
    def _retry(self, job: Job, reason: str) -> None:
        if job.job_id not in self.jobs:
            return
        if job.node is not None:
            job.node.inflight.pop(job.job_id, None)
        job.attempts += 1
        self.store.count_attempt(job.job_id)
        log.info("job_requeued", job=job.job_id.hex()[:16], attempts=job.attempts, reason=reason)
        if job.attempts >= MAX_ATTEMPTS:
            self._give_up(job, f"gave up after {job.attempts} attempts; last: {reason}")
            return
        self.enqueue(job, front=True)

    def _give_up(self, job: Job, reason: str) -> None:
        self.jobs.pop(job.job_id, None)
        self.store.mark_failed(job.job_id)
        state = self.requests.get(job.request_id)
        if state is not None:
            state.failed += 1
            self._to_client(state, JobFailed(job_id=job.job_id, index=job.index, reason=reason))
            self._finish_one(state)

    def handed_back(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        job = link.inflight.pop(job_id, None)
        if job is not None:
            self._retry(job, f"handed back: {reason}")

    def progress(self, link: NodeLink, job_id: bytes, step: int) -> None:
        job = link.inflight.get(job_id)
        if job is None:
            return
        state = self.requests.get(job.request_id)
        if state is not None and state.outbox is not None:
            msg = JobProgress(job_id=job_id, index=job.index, step=step, steps=job.params.steps)
            try:
                state.outbox.send_nowait(msg)
            except trio.WouldBlock:
                pass  # progress is advisory: a slow client misses some, never an image

    def accept_result(self, link: NodeLink, result: Result) -> None:
        """Verify a result and commit its receipt, or raise `ResultRefused` naming the fault.

        The receipt is durable when this returns; only then may the node hear "accepted".
        """
        receipt = result.receipt
        if receipt.job_id != result.job_id:
            raise ResultRefused("receipt is for another job")
        job = self.jobs.get(result.job_id)
        if job is None:
            stored = self.store.receipt(result.job_id)
            raise ResultRefused("job already receipted" if stored else "unknown job")
        offered_to = job.offers.get(receipt.offer_hash)
        if offered_to is None:
            raise ResultRefused("receipt names an offer this coordinator did not make")
        if offered_to != link.peer_id:
            raise ResultRefused("offer was made to another node")
        if not eip712.same_address(receipt.coordinator, self.address):
            raise ResultRefused("receipt names another coordinator")
        if not eip712.same_address(receipt.worker, link.wallet):
            raise ResultRefused("receipt worker is not the wallet bound to this peer")
        if receipt.model_id != job.params.model_id:
            raise ResultRefused("receipt names another model")
        if receipt.steps_done != job.params.steps or receipt.work_units != job.work_units:
            raise ResultRefused("receipt steps or work units differ from the offer")
        if hashlib.sha256(result.image).digest() != receipt.result_hash:
            raise ResultRefused("resultHash is not the sha256 of the image bytes")
        signer = eip712.recover_receipt_signer(self.domain, receipt, result.signature)
        if not eip712.same_address(signer, link.wallet):
            raise ResultRefused("receipt signature is not from the node's wallet")
        if not self.store.store_receipt(receipt, result.signature, job.request_id):
            raise ResultRefused("job already receipted")
        if self.billing is not None:
            self.billing.settle(job.request_id, job.job_id, receipt.worker)
        self._complete(job, link, result)

    def _complete(self, job: Job, link: NodeLink, result: Result) -> None:
        del self.jobs[job.job_id]
        link.inflight.pop(job.job_id, None)
        if job.node is not None and job.node is not link:  # re-dispatched copy still running
            job.node.inflight.pop(job.job_id, None)
            self._send_to_node(job.node, Cancel(job_id=job.job_id))
        job.node = None
        state = self.requests.get(job.request_id)
        if state is None:
            return
        state.delivered += 1
        image = JobImage(
            job_id=job.job_id,
            index=job.index,
            seed=job.params.seed,
            image=result.image,
            receipt=result.receipt,
            signature=result.signature,
            meta=result.meta,
        )
        if not self._to_client(state, image):
            state.on_orphan_image(job.request_id, job.index, result.image)
        self._finish_one(state)

    def _finish_one(self, state: RequestState) -> None:
        state.remaining -= 1
        if state.remaining <= 0:
            del self.requests[state.request_id]
            if self.billing is not None:
                self.billing.finish(state.request_id)
            state.finished.set()

    def _to_client(self, state: RequestState, msg: Message) -> bool:
        if state.outbox is None:
            return False
        try:
            state.outbox.send_nowait(msg)
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    def _send_to_node(self, link: NodeLink, msg: Message) -> None:
        try:
            link.outbox.send_nowait(msg)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the node is gone or flooded; its jobs are requeued by node_left/deadline
