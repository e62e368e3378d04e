"""Which node gets a job: capability, tier, and weighted random choice by reputation x stake.

- Capable: has the model, serves the request's network tier, allows the job's pixel count,
  is not blacklisted, and has a free slot (credit).
- Tiers (whitepaper, "Dual-Tier Architecture"): `fast` jobs go only to CUDA nodes whose wallet
  holds a worker licence and the minimum stake; `relaxed` jobs go to the others (Macs, CPUs).
  With `tiers = "open"` (local networks) every node serves both.
- Choice: weighted random over capable nodes, weight = reputation score (with a newcomer
  floor) x stake weight x `WARM_BONUS` if the model is already loaded there, so good nodes
  get more work, loads are avoided, and every capable node gets some.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sogni_coordinator.reputation import Reputation
from sogni_coordinator.standing import StandingLookup, no_chain

if TYPE_CHECKING:
    from sogni_coordinator.jobs import Job, NodeLink
    from sogni_protocol.messages import JobParams, RenderRequest

TierMode = Literal["open", "enforced"]
MAX_NODES_PER_REQUEST = 16
WARM_BONUS = 2.0
SAMPLE_FROM = 8
"""A pick in a match pass draws from the pool (`Router._sample`) once it holds this many
nodes; a smaller pool is walked."""
SAMPLE_TRIES = 12
"""Draws a pick makes per step of `Router._sample` before it looks further."""


class FreePool(dict["NodeLink", None]):
    """The dispatcher's nodes with credit, in the order they got it (kept by
    `NodeLink.credit`'s setter). Given this very pool, a pick in a match pass draws from
    it (`Router._sample`) instead of walking it; any other collection of nodes is walked."""


@dataclass
class Router:
    reputation: Reputation
    tiers: TierMode = "open"
    fast_min_stake: int = 0
    standing: StandingLookup = no_chain
    rng: random.Random | None = None
    clock: Callable[[], float] | None = None
    blocked_nodes: frozenset[str] = frozenset()
    """Lowercase wallets the operator blocked after a content report (`reports.py`)."""
    _memo: _PassMemo | None = field(default=None, init=False, repr=False, compare=False)

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """Picks inside this block (one synchronous match pass: nothing awaits, so no
        standing, reputation or blocklist changes meanwhile) remember each node's tier,
        stake weight and score, and whether it fits a request (a request's jobs differ only
        by seed): a pick then costs a few dict lookups per free node instead of a standing
        lookup, a blacklist check and a score computation each."""
        outer, self._memo = self._memo, _PassMemo((self.clock or time.time)())
        try:
            yield
        finally:
            self._memo = outer

    def classify(self, device: str, wallet: str) -> tuple[frozenset[str], float]:
        """Networks a node may serve and its stake weight, from its standing now: asked at
        every match, so an unstake or a licence handed to another wallet takes effect as soon
        as the chain's events reach the cache, not at the next connection.

        Runs on the event loop: `standing` must answer from memory (the service's
        `StandingCache`, warmed by the node's session before it joins)."""
        st = self.standing(wallet)
        weight = 1.0 + math.log10(1.0 + max(st.stake, 0)) / 2
        if self.tiers == "open":
            return frozenset({"fast", "relaxed"}), weight
        fast = device == "cuda" and st.licensed and st.stake >= self.fast_min_stake
        return frozenset({"fast"} if fast else {"relaxed"}), weight

    def capable(self, link: NodeLink, network: str, want: JobParams | RenderRequest) -> bool:
        """The node has the model and every LoRA, serves the tier, and fits the size."""
        return network in self.classify(link.device, link.wallet)[0] and self._fits(link, want)

    def _fits(self, link: NodeLink, want: JobParams | RenderRequest) -> bool:
        return (
            want.model_id in link.models
            and (link.max_pixels == 0 or want.width * want.height <= link.max_pixels)
            and all(lora.id in link.loras for lora in want.loras)
            and not self.reputation.blacklisted(link.wallet)
            and link.wallet.lower() not in self.blocked_nodes
        )

    def pick(
        self,
        job: Job,
        nodes: Iterable[NodeLink],
        in_use: AbstractSet[NodeLink],
        network: str | None = None,
    ) -> NodeLink | None:
        """Weighted random capable node with a free slot; at most 16 nodes per request.
        `network` picks among another tier's nodes (a free upgrade: staking_benefits.py).

        `nodes` is usually the dispatcher's pool of nodes with credit (`Dispatcher.free`),
        so a pick looks only at nodes that can take an offer now; in a match pass, a pool
        of `SAMPLE_FROM` nodes or more is drawn from (`_sample`: a few draws per pick, the
        same distribution) instead of walked. A node with an idle slot goes before one that
        would hold the offer in hand (pipelined credit), and a request at its node cap gives
        no offer-in-hand while a capable idle node waits outside the cap: the busy node then
        drains, and the request moves on to the idle one (every node gets work, as without
        pipelining)."""
        p = job.params
        tier = network or job.network
        memo = self._memo
        if memo is not None and isinstance(nodes, FreePool) and len(nodes) >= SAMPLE_FROM:
            decided, sampled = self._sample(memo, job, nodes, in_use, tier)
            if decided:
                return sampled
        idle: list[tuple[NodeLink, float]] = []
        ahead: list[tuple[NodeLink, float]] = []
        capped = len(in_use) >= MAX_NODES_PER_REQUEST
        outside_idle = False
        for link in nodes:
            if link.credit <= 0 or link in job.holders:
                continue
            busy = len(link.inflight) >= link.slots
            outside = capped and link not in in_use
            if outside and (busy or outside_idle):
                continue
            if memo is None:
                networks, stake_weight = self.classify(link.device, link.wallet)
                fits = tier in networks and self._fits(link, p)
            else:
                networks, stake_weight = memo.classify(self, link)
                fits = tier in networks and memo.fits(self, link, job)
            if fits:
                if outside:
                    outside_idle = True
                elif busy:
                    ahead.append((link, stake_weight))
                else:
                    idle.append((link, stake_weight))
        candidates = idle or ([] if outside_idle else ahead)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0][0]
        if memo is None:
            now = (self.clock or time.time)()
            weights = [
                self.reputation.get(link.wallet).score(now, link.connected_at)
                * stake_weight
                * (WARM_BONUS if p.model_id in link.warm else 1.0)
                for link, stake_weight in candidates
            ]
        else:
            weights = [
                memo.score(self, link)
                * stake_weight
                * (WARM_BONUS if p.model_id in link.warm else 1.0)
                for link, stake_weight in candidates
            ]
        return (self.rng or random).choices([c[0] for c in candidates], weights=weights)[0]

    def _sample(
        self,
        memo: _PassMemo,
        job: Job,
        pool: FreePool,
        in_use: AbstractSet[NodeLink],
        tier: str,
    ) -> tuple[bool, NodeLink | None]:
        """`pick`'s choice without walking the pool: (True, the node or None), or (False,
        None) when the walk must decide.

        1. Rejection sampling among the pool nodes with the model and an idle slot when the
           pass began (a superset of those idle now: nothing frees a slot during a pass):
           draw one uniformly, keep it if it is an idle candidate, with probability weight /
           `bound` (the most such a node weighs this pass), so each is kept in proportion
           to its weight, as the walk's `choices` keeps it.
        2. No draw kept: look at each of those nodes (few while the network is busy) and
           choose among the idle candidates as the walk does; none, but one idle outside
           the request's node cap: None, as the walk says.
        3. No idle node fits: an offer in hand, by rejection sampling over the pool nodes
           with the model (every one with credit is busy or unfit now); the walk after
           `SAMPLE_TRIES`.
        Each step's choice has the walk's distribution, so the mix does too. A pick costs a
        few draws; the pass pays one look at each pool node per model (`_PassMemo.view`)."""
        rng = self.rng or random
        model = job.params.model_id
        idle, having, bound = memo.view(self, pool, model)
        capped = len(in_use) >= MAX_NODES_PER_REQUEST

        def weight(link: NodeLink, stake_weight: float) -> float:
            warm = WARM_BONUS if model in link.warm else 1.0
            return memo.score(self, link) * stake_weight * warm

        def fitting(link: NodeLink) -> float | None:
            """Its stake weight if it has credit and fits the job (tier, model, size)."""
            if link.credit <= 0 or link in job.holders:
                return None
            networks, stake_weight = memo.classify(self, link)
            if tier not in networks or not memo.fits(self, link, job):
                return None
            return stake_weight

        if idle:
            for _ in range(SAMPLE_TRIES):
                link = idle[rng.randrange(len(idle))]
                if len(link.inflight) >= link.slots or (capped and link not in in_use):
                    continue
                stake_weight = fitting(link)
                if stake_weight is not None and rng.random() * bound < weight(link, stake_weight):
                    return True, link
            candidates: list[tuple[NodeLink, float]] = []
            outside_idle = False
            for link in idle:
                if len(link.inflight) >= link.slots:
                    continue
                stake_weight = fitting(link)
                if stake_weight is None:
                    continue
                if capped and link not in in_use:
                    outside_idle = True
                else:
                    candidates.append((link, stake_weight))
            if candidates:
                weights = [weight(link, w) for link, w in candidates]
                return True, rng.choices([c[0] for c in candidates], weights=weights)[0]
            if outside_idle:
                return True, None
        for _ in range(SAMPLE_TRIES if having else 0):
            link = having[rng.randrange(len(having))]
            if len(link.inflight) < link.slots or (capped and link not in in_use):
                continue  # idle: it does not fit (step 2), so it is not a candidate
            stake_weight = fitting(link)
            if stake_weight is not None and rng.random() * bound < weight(link, stake_weight):
                return True, link
        return False, None


class _PassMemo:
    """What one match pass has already computed per node (`Router.one_pass`)."""

    __slots__ = ("fitting", "now", "scores", "tiers", "views")

    def __init__(self, now: float) -> None:
        self.now = now
        self.tiers: dict[NodeLink, tuple[frozenset[str], float]] = {}
        self.scores: dict[NodeLink, float] = {}
        self.fitting: dict[tuple[NodeLink, bytes], bool] = {}
        self.views: dict[str, tuple[list[NodeLink], list[NodeLink], float]] = {}

    def view(
        self, router: Router, pool: FreePool, model: str
    ) -> tuple[list[NodeLink], list[NodeLink], float]:
        """The pool nodes that have `model`: those with an idle slot, all of them, and the
        most any of them can weigh (a score is at most 1), as the pass began: one look at
        each pool node per pass and model. Nothing frees a slot or gives credit during a
        pass (nothing awaits), so the lists hold every node that can take the job later in
        it, and the bound stays one."""
        got = self.views.get(model)
        if got is None:
            idle: list[NodeLink] = []
            having: list[NodeLink] = []
            bound = 0.0
            for link in pool:
                if model not in link.models:
                    continue
                having.append(link)
                if len(link.inflight) < link.slots:
                    idle.append(link)
                warm = WARM_BONUS if model in link.warm else 1.0
                bound = max(bound, self.classify(router, link)[1] * warm)
            got = self.views[model] = (idle, having, bound)
        return got

    def classify(self, router: Router, link: NodeLink) -> tuple[frozenset[str], float]:
        got = self.tiers.get(link)
        if got is None:
            got = self.tiers[link] = router.classify(link.device, link.wallet)
        return got

    def fits(self, router: Router, link: NodeLink, job: Job) -> bool:
        key = (link, job.request_id)  # a request's jobs share model, size and LoRAs
        got = self.fitting.get(key)
        if got is None:
            got = self.fitting[key] = router._fits(link, job.params)
        return got

    def score(self, router: Router, link: NodeLink) -> float:
        got = self.scores.get(link)
        if got is None:
            rec = router.reputation.get(link.wallet)
            got = self.scores[link] = rec.score(self.now, link.connected_at)
        return got
