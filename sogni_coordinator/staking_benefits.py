"""Staked payers' benefits on the coordinator: the discount billing applies, the queue that
offers higher tiers' jobs first, and the free upgrade of relaxed jobs to idle fast nodes.

The tier comes from the payer's active stake as the chain says it (`StandingCache`, the same
cache as workers' stake: re-read after `ttl`, and soon after a `Staked`/`UnstakeRequested`
event), never from the request, so nobody can claim a tier without stake. A request's tier is
fixed when it is admitted (its reservation is priced with it).

Rules (`StakeBenefits`, `[staking_benefits]`) are in `sogni_protocol.stake_benefits`, shared
with `sogni quote --stake`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from sogni_coordinator.standing import StandingCache, StandingLookup
from sogni_protocol.logs import get_logger
from sogni_protocol.stake_benefits import StakeBenefits

if TYPE_CHECKING:
    from sogni_coordinator.jobs import Job, NodeLink
    from sogni_coordinator.routing import Router

__all__ = [
    "PayerBenefits",
    "TieredQueue",
    "fast_idle_fraction",
    "pick_with_upgrade",
    "upgrade_rule",
]

log = get_logger(__name__)


class PayerBenefits:
    """A payer's tier from its chain stake, and the quote discounted for it."""

    def __init__(self, rules: StakeBenefits, standing: StandingLookup) -> None:
        self.rules = rules
        self.standing = standing

    async def warm(self, payer: str | None) -> None:
        """Read a payer's stake before its first quote (at most the cache's timeout)."""
        if payer is not None and isinstance(self.standing, StandingCache):
            await self.standing.warm(payer)

    def tier(self, payer: str | None) -> int:
        if payer is None:
            return 0
        try:
            stake = self.standing(payer).stake
        except Exception as exc:  # a raw chain lookup raises many kinds: no benefit
            log.warning("payer_stake_lookup_failed", payer=payer.lower(), error=type(exc).__name__)
            return 0
        return self.rules.tier(stake)

    def discount_bps(self, payer: str | None) -> int:
        """The payer's discount now (basis points off each image's price)."""
        return self.rules.discount_for(self.tier(payer))


class _Run:
    """Consecutive queue entries of one request (a request's jobs are queued together)."""

    __slots__ = ("jobs", "request_id")

    def __init__(self, request_id: bytes, jobs: deque[Job]) -> None:
        self.request_id = request_id
        self.jobs = jobs


class TieredQueue:
    """The dispatcher's job queue: one FIFO per payer tier, higher tiers popped first.

    Every operation is O(number of tiers) (a handful), never a scan of the jobs. Supports
    the `deque` calls the dispatcher makes; `tiers` (request id -> tier) is shared with the
    queue `emptied` returns, so a match pass can rebuild the queue. Entries are kept as runs
    of one request's consecutive jobs, so a match pass sets aside every job of a request no
    free node can take at once (`take_run`, `put_back_run`), not one by one."""

    def __init__(self, tiers: dict[bytes, int] | None = None) -> None:
        self.tiers: dict[bytes, int] = {} if tiers is None else tiers
        self._buckets: dict[int, deque[_Run]] = {}
        self._order: list[int] = []  # tiers present, highest first
        self._len = 0

    def emptied(self) -> TieredQueue:
        return TieredQueue(self.tiers)

    def forget(self, request_id: bytes) -> None:
        """The request ended: drop its tier."""
        self.tiers.pop(request_id, None)

    def _bucket(self, request_id: bytes) -> deque[_Run]:
        tier = self.tiers.get(request_id, 0)
        got = self._buckets.get(tier)
        if got is None:
            got = self._buckets[tier] = deque()
            self._order = sorted(self._buckets, reverse=True)
        return got

    def append(self, job: Job) -> None:
        bucket = self._bucket(job.request_id)
        if bucket and bucket[-1].request_id == job.request_id:
            bucket[-1].jobs.append(job)
        else:
            bucket.append(_Run(job.request_id, deque((job,))))
        self._len += 1

    def appendleft(self, job: Job) -> None:
        bucket = self._bucket(job.request_id)
        if bucket and bucket[0].request_id == job.request_id:
            bucket[0].jobs.appendleft(job)
        else:
            bucket.appendleft(_Run(job.request_id, deque((job,))))
        self._len += 1

    def extend(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.append(job)

    def _front(self) -> deque[_Run] | None:
        for tier in self._order:
            bucket = self._buckets[tier]
            if bucket:
                return bucket
        return None

    def popleft(self) -> Job:
        bucket = self._front()
        if bucket is None:
            raise IndexError("pop from an empty queue")
        run = bucket[0]
        job = run.jobs.popleft()
        if not run.jobs:
            bucket.popleft()
        self._len -= 1
        return job

    def take_run(self, request_id: bytes) -> deque[Job]:
        """The jobs of `request_id` at the very front of the queue (the ones behind the job
        just popped), taken at once; empty if the front holds another request's."""
        bucket = self._front()
        if bucket is None or bucket[0].request_id != request_id:
            return deque()
        run = bucket.popleft()
        self._len -= len(run.jobs)
        return run.jobs

    def put_back_run(self, jobs: deque[Job]) -> None:
        """`take_run`'s jobs back at the front of their tier, in order."""
        if not jobs:
            return
        request_id = jobs[0].request_id
        bucket = self._bucket(request_id)
        self._len += len(jobs)
        if bucket and bucket[0].request_id == request_id:  # one run again: copy the shorter
            front = bucket[0]
            if len(jobs) < len(front.jobs):
                front.jobs.extendleft(reversed(jobs))
            else:
                jobs.extend(front.jobs)
                front.jobs = jobs
        else:
            bucket.appendleft(_Run(request_id, jobs))

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Job]:
        for tier in self._order:
            for run in self._buckets[tier]:
                yield from run.jobs

    def __eq__(self, other: object) -> bool:
        """Same jobs in the same order (like two deques)."""
        if not isinstance(other, TieredQueue | deque):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like deque


def fast_idle_fraction(router: Router, nodes: Iterable[NodeLink]) -> float:
    """Free slots / all slots of the nodes that may serve the fast tier (0 with none)."""
    free = total = 0
    for link in nodes:
        if "fast" in router.classify(link.device, link.wallet)[0]:
            total += max(link.slots, 0)
            free += max(min(link.credit, link.slots), 0)
    return free / total if total else 0.0


def pick_with_upgrade(
    router: Router,
    job: Job,
    candidates: Iterable[NodeLink],
    in_use: AbstractSet[NodeLink],
    *,
    upgrade: bool,
) -> NodeLink | None:
    """The node for `job`: a fast node first when `upgrade` (a relaxed job of a payer whose
    tier upgrades, while the fast tier is idle enough), else the usual pick. The job keeps
    its relaxed network, so the offer, the receipt and the pay are the relaxed price the
    payer was charged."""
    if upgrade and job.network == "relaxed":
        link = router.pick(job, candidates, in_use, network="fast")
        if link is not None:
            log.info("free_upgrade", job=job.job_id.hex()[:16])
            return link
    return router.pick(job, candidates, in_use)


def upgrade_rule(
    benefits: PayerBenefits | None,
    router: Router,
    nodes: dict[str, NodeLink],
    tiers: dict[bytes, int],
) -> Callable[[Job], bool]:
    """For one match pass: may this job take a free upgrade now? Only relaxed jobs of
    payers at `upgrade_min_tier` or above, while the fast tier's idle share of slots is
    above `upgrade_idle_fraction` (checked again for each such job, as offers use slots)."""
    if benefits is None:
        return lambda _job: False
    rules = benefits.rules

    def rule(job: Job) -> bool:
        return (
            job.network == "relaxed"
            and rules.upgrades(tiers.get(job.request_id, 0))
            and fast_idle_fraction(router, nodes.values()) > rules.upgrade_idle_fraction
        )

    return rule
