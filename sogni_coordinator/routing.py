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
        in_use: set[NodeLink],
        network: str | None = None,
    ) -> NodeLink | None:
        """Weighted random capable node with a free slot; at most 16 nodes per request.
        `network` picks among another tier's nodes (a free upgrade: staking_benefits.py).

        `nodes` is usually the dispatcher's pool of nodes with credit (`Dispatcher.free`),
        so a pick looks only at nodes that can take an offer now: O(1) while the network is
        busy. A node with an idle slot goes before one that would hold the offer in hand
        (pipelined credit), and a request at its node cap gives no offer-in-hand while a
        capable idle node waits outside the cap: the busy node then drains, and the request
        moves on to the idle one (every node gets work, as without pipelining)."""
        p = job.params
        tier = network or job.network
        memo = self._memo
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


class _PassMemo:
    """What one match pass has already computed per node (`Router.one_pass`)."""

    __slots__ = ("fitting", "now", "scores", "tiers")

    def __init__(self, now: float) -> None:
        self.now = now
        self.tiers: dict[NodeLink, tuple[frozenset[str], float]] = {}
        self.scores: dict[NodeLink, float] = {}
        self.fitting: dict[tuple[NodeLink, bytes], bool] = {}

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
