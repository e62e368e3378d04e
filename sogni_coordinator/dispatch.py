"""The job queue and the life of each job: offered, re-queued, cancelled, receipted once.

One `Dispatcher` per coordinator holds the live view: queued jobs, connected nodes with their
free slots, and the requests waiting for images. Node and client sessions call into it; its
`run` task matches queued jobs to nodes (through the `Router`) whenever either side changes,
and a sweep each fraction of a second re-queues expired jobs, re-dispatches stragglers near
the end of a request, and fails jobs no connected node can serve. All of it runs on one trio
thread, so no locks.

A job may be held by two nodes at once (a straggler's copy); the first valid receipt wins and
the other holder is told to stop.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import deque
from collections.abc import Callable

import trio

from sogni_coordinator.billing import Billing
from sogni_coordinator.group_commit import GroupCommit
from sogni_coordinator.jobs import Job, NodeLink, RequestState
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import Router
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.image_types import format_of
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
    RenderRequest,
    Result,
)

log = get_logger(__name__)

MAX_ATTEMPTS = 5
"""A job that fails this many times (node lost, deadline, hand-back) is given up on."""
NO_NODE_GRACE = 10.0
"""Seconds a queued job may wait with no connected node able to serve it before it fails."""
STRAGGLER_FACTOR = 2.0
"""A job running this many times longer than its request's median is copied to another node."""
EMPTY_SHA256 = hashlib.sha256(b"").digest()


def render_budget(params: JobParams, floor: float, base: float = 30.0) -> float:
    """AI Horde's deadline rule: generous for small jobs, grows with steps x pixels."""
    return max(floor, base + 2.0 * params.steps * params.width * params.height / 512**2)


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
        router: Router | None = None,
        deadline_floor: float = 150.0,
        deadline_base: float = 30.0,
        clock: Callable[[], float] = time.time,
        billing: Billing | None = None,
    ) -> None:
        self.store = store
        self._key = signer_key
        self.address = signer_address
        self.domain = domain
        self.router = router or Router(Reputation(":memory:"))
        self.reputation = self.router.reputation
        self.deadline_floor = deadline_floor
        self.deadline_base = deadline_base
        self._clock = clock
        self.billing = billing
        self.no_node_grace = NO_NODE_GRACE
        self.receipts = GroupCommit(store)
        self.queue: deque[Job] = deque()
        self.jobs: dict[bytes, Job] = {}
        self.nodes: dict[str, NodeLink] = {}
        self.requests: dict[bytes, RequestState] = {}
        self._changed = trio.Event()

    # --- bookkeeping ---------------------------------------------------------------------
    def known_models(self) -> set[str]:
        return {m for link in self.nodes.values() for m in link.models}

    def can_serve(self, network: str, want: JobParams | RenderRequest) -> bool:
        """Some connected node could take such a job (now or once it has a free slot)."""
        return any(self.router.capable(link, network, want) for link in self.nodes.values())

    def _wake(self) -> None:
        self._changed.set()

    def enqueue(self, job: Job, *, front: bool = False) -> None:
        self.jobs[job.job_id] = job
        job.queued_since = self._clock()
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
        link.networks, link.stake_weight = self.router.classify(link.device, link.wallet)
        self.nodes[link.peer_id] = link
        self._wake()

    def node_left(self, link: NodeLink, reason: str) -> None:
        if self.nodes.get(link.peer_id) is link:
            del self.nodes[link.peer_id]
            self.reputation.disconnected(link.wallet, self._clock() - link.connected_at)
        for job in list(link.inflight.values()):
            self._drop_holder(job, link, f"node left: {reason}", penalize=True)
        link.outbox.close()

    def add_credit(self, link: NodeLink, slots: int) -> None:
        link.credit = max(0, min(slots, link.slots) - len(link.inflight))
        self._wake()

    # --- matching ------------------------------------------------------------------------
    async def run(self) -> None:
        """Match queued jobs to nodes whenever something changes; sweep on a short period."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_forever)
            nursery.start_soon(self.receipts.run)
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                self._match()

    def _match(self) -> None:
        if not self.queue or not any(n.credit > 0 for n in self.nodes.values()):
            return
        unmatched: deque[Job] = deque()
        blocked: set[bytes] = set()  # requests no free node can serve in this pass
        while self.queue:
            job = self.queue.popleft()
            if job.job_id not in self.jobs or job.holders:  # done, or picked up meanwhile
                continue
            if job.request_id in blocked:  # its jobs differ only by seed: same answer
                unmatched.append(job)
                continue
            state = self.requests.get(job.request_id)
            link = self.router.pick(job, self.nodes.values(), set(state.nodes) if state else set())
            if link is None:
                blocked.add(job.request_id)
                unmatched.append(job)
                if not any(n.credit > 0 for n in self.nodes.values()):
                    break
                continue
            self._offer(job, link)
        unmatched.extend(self.queue)
        self.queue = unmatched

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
            if not job.holders:
                self.queue.append(job)
            return
        log.debug("offer_sent", job=job.job_id.hex()[:16], peer=link.peer_id, budget_s=budget)
        job.offers[offer_hash] = link.peer_id
        job.holders[link] = now
        job.deadlines[link] = now + budget
        link.credit -= 1
        link.inflight[job.job_id] = job
        state = self.requests.get(job.request_id)
        if state is not None:
            state.nodes[link] = state.nodes.get(link, 0) + 1

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(min(0.5, self.deadline_floor / 4))
            self.sweep()

    def sweep(self) -> None:
        """Deadlines, jobs nobody can serve, and stragglers near the end of a request."""
        now = self._clock()
        for job in list(self.jobs.values()):
            for link, deadline in list(job.deadlines.items()):
                if deadline < now:
                    self._send_to_node(link, Cancel(job_id=job.job_id))
                    self._drop_holder(job, link, "deadline missed", penalize=True)
        for job in [j for j in self.queue if j.job_id in self.jobs and not j.holders]:
            p = job.params
            if now - job.queued_since > self.no_node_grace and not self.can_serve(job.network, p):
                self._give_up(job, f"no connected node can serve {job.network} {p.model_id}")
        self._redispatch_stragglers(now)

    def _redispatch_stragglers(self, now: float) -> None:
        queued = {j.request_id for j in self.queue if j.job_id in self.jobs}
        for job in list(self.jobs.values()):
            state = self.requests.get(job.request_id)
            if (
                state is None
                or job.request_id in queued
                or len(job.holders) != 1
                or len(state.durations) < 3
                or job.cancelled
            ):
                continue
            started = next(iter(job.holders.values()))
            if now - started > STRAGGLER_FACTOR * statistics.median(state.durations):
                link = self.router.pick(job, self.nodes.values(), set(state.nodes))
                if link is not None:
                    log.info("straggler_redispatched", job=job.job_id.hex()[:16])
                    self._offer(job, link)

    # --- events from nodes ---------------------------------------------------------------
    def _drop_holder(self, job: Job, link: NodeLink, reason: str, *, penalize: bool) -> None:
        """`link` no longer renders `job`; re-queue it if nobody else does."""
        link.inflight.pop(job.job_id, None)
        if job.holders.pop(link, None) is None:
            return
        job.deadlines.pop(link, None)
        state = self.requests.get(job.request_id)
        if state is not None and link in state.nodes:
            state.nodes[link] -= 1
            if state.nodes[link] <= 0:
                del state.nodes[link]
        if penalize:
            self.reputation.failed(link.wallet)
        if job.job_id not in self.jobs or job.holders:
            return
        if job.cancelled:
            self._end_job(job, "cancelled")
            return
        job.attempts += 1
        self.store.count_attempt(job.job_id)
        log.info("job_requeued", job=job.job_id.hex()[:16], attempts=job.attempts, reason=reason)
        if job.attempts >= MAX_ATTEMPTS:
            self._give_up(job, f"gave up after {job.attempts} attempts; last: {reason}")
            return
        self.enqueue(job, front=True)

    def _give_up(self, job: Job, reason: str) -> None:
        state = self.requests.get(job.request_id)
        if state is not None:
            self._to_client(state, JobFailed(job_id=job.job_id, index=job.index, reason=reason))
        self._end_job(job, "failed")

    def _end_job(self, job: Job, outcome: str) -> None:
        """Forget a job that ends without an image (failed or cancelled).

        The store hears it too, so a restart never re-queues (and charges for) a job that
        ended; a partial receipt already marked it done, which `mark_failed` leaves alone.
        """
        if self.jobs.pop(job.job_id, None) is None:
            return
        self.store.mark_failed(job.job_id)
        for link in list(job.holders):
            self._send_to_node(link, Cancel(job_id=job.job_id))
            self._drop_holder(job, link, outcome, penalize=False)
        state = self.requests.get(job.request_id)
        if state is not None:
            if outcome == "cancelled":
                state.cancelled += 1
            else:
                state.failed += 1
            self._finish_one(state)

    def handed_back(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        job = link.inflight.get(job_id)
        if job is not None:
            self._drop_holder(job, link, f"handed back: {reason}", penalize=False)

    def declined(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        self.reputation.declined(link.wallet)
        self.handed_back(link, job_id, f"declined: {reason}")

    def bad_result(self, link: NodeLink, job_id: bytes, reason: str) -> None:
        if self.reputation.strike(link.wallet):
            log.warning("worker_blacklisted", wallet=link.wallet, reason=reason)
        job = link.inflight.get(job_id)
        if job is not None:
            self._drop_holder(job, link, f"bad result: {reason}", penalize=False)

    def cancel_request(self, request_id: bytes) -> None:
        """The client cancelled: queued jobs end now, running ones stop at their next step
        and are paid for the steps done (their nodes send partial receipts)."""
        for job in [j for j in self.jobs.values() if j.request_id == request_id]:
            job.cancelled = True
            if not job.holders:
                self._end_job(job, "cancelled")
            for link in list(job.holders):
                self._send_to_node(link, Cancel(job_id=job.job_id, pay_partial=True))

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

    async def accept_result(self, link: NodeLink, result: Result) -> None:
        """Verify a result and commit its receipt, or raise `ResultRefused` naming the fault.

        The receipt is durable when this returns; only then may the node hear "accepted".
        A cancelled job may come back partial: no image, steps done < steps, work units
        pro rata; it is paid for those steps.
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
        steps = job.params.steps
        partial = receipt.steps_done < steps
        if partial:
            if not job.cancelled or result.image or receipt.result_hash != EMPTY_SHA256:
                raise ResultRefused("partial receipt for a job that was not cancelled")
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
        if not await self.receipts.commit(receipt, result.signature, job.request_id):
            raise ResultRefused("job already receipted")
        if job.job_id not in self.jobs:  # it ended (failed, cancelled) while we committed
            return
        if self.billing is not None:
            self.billing.settle(
                job.request_id, job.job_id, receipt.worker, receipt.steps_done, steps
            )
        started = job.holders.get(link, self._clock())
        elapsed = self._clock() - started
        budget = render_budget(job.params, self.deadline_floor, self.deadline_base)
        self.reputation.succeeded(link.wallet, elapsed, budget, receipt.work_units)
        if partial:
            self._drop_holder(job, link, "cancelled", penalize=False)
            return
        self._complete(job, link, result, elapsed)

    def _complete(self, job: Job, link: NodeLink, result: Result, elapsed: float) -> None:
        del self.jobs[job.job_id]
        for other in list(job.holders):
            if other is not link:  # a straggler's copy still running
                self._send_to_node(other, Cancel(job_id=job.job_id))
            self._drop_holder(job, other, "done", penalize=False)
        state = self.requests.get(job.request_id)
        if state is None:
            return
        state.delivered += 1
        state.durations.append(elapsed)
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
