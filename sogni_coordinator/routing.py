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
from typing import TYPE_CHECKING, Literal, Protocol

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
    it (`Router._sample`) instead of walking it; any other collection of nodes is walked.

    Per model it keeps an index across passes (`_ModelIndex`: idle and busy nodes with the
    model, in weight classes), built by one look at each node the first time a model is
    asked for and then kept up to date by what changes: a node that gets or loses credit
    (the setter), or whose slots, models or warm models change (`touch`), is re-filed at
    the next pick, so a pass that places one job costs O(1) looks, not one per node."""

    def __init__(self) -> None:
        super().__init__()
        self._indexes: dict[str, _ModelIndex] = {}

    def __setitem__(self, link: NodeLink, value: None) -> None:
        super().__setitem__(link, value)
        self.touch(link)

    def __delitem__(self, link: NodeLink) -> None:
        super().__delitem__(link)
        self.touch(link)

    def pop(self, link: NodeLink, *default: None) -> None:  # type: ignore[override]
        if link in self:
            self.touch(link)
        return super().pop(link, *default)

    def clear(self) -> None:
        super().clear()
        self._indexes.clear()

    def touch(self, link: NodeLink) -> None:
        """`link`'s credit, slots in use, models or warm models changed: re-file it in every
        model's index at the next pick (O(models indexed)). The index of a model no pick
        has asked for in a while is dropped once its backlog outgrows the pool (rebuilt
        when asked for again), so departed nodes are not kept for it."""
        stale = None
        for model, index in self._indexes.items():
            index.dirty.add(link)
            if len(index.dirty) > 2 * len(self) + 64:
                stale = model
        if stale is not None:
            del self._indexes[stale]

    def index(self, model: str, weigh: Callable[[NodeLink], float]) -> _ModelIndex:
        """`model`'s index, up to date: built on first use (one look at each node), then
        only the nodes changed since the last pick are re-filed. `weigh`: a node's weight
        bound (stake weight x warm bonus; the score, at most 1, is left to the draw)."""
        index = self._indexes.get(model)
        if index is None:
            index = self._indexes[model] = _ModelIndex(model)
            index.dirty.update(self)
        if index.dirty:
            for link in index.dirty:
                index.refile(link, link in self, weigh)
            index.dirty.clear()
        return index


class _Random(Protocol):
    """What a draw needs of `random.Random` (or the `random` module itself)."""

    def random(self) -> float: ...

    def randrange(self, stop: int, /) -> int: ...


class _Bag:
    """Nodes with O(1) add, remove and uniform draw (a list and each node's position)."""

    __slots__ = ("at", "items")

    def __init__(self) -> None:
        self.items: list[NodeLink] = []
        self.at: dict[NodeLink, int] = {}

    def add(self, link: NodeLink) -> None:
        self.at[link] = len(self.items)
        self.items.append(link)

    def remove(self, link: NodeLink) -> None:
        i = self.at.pop(link)
        last = self.items.pop()
        if last is not link:
            self.items[i] = last
            self.at[last] = i


class _Classes:
    """Nodes in weight classes: class `k` holds those whose weight bound is in
    (2^(k-1), 2^k]. A draw picks a class in proportion to its size x 2^k, then a node
    uniformly in it; kept with probability weight / 2^k, a node is kept in proportion to
    its weight (rejection sampling), and a heavy node (a big staker) bounds only its own
    class's draws, not everyone's."""

    __slots__ = ("bags", "total")

    def __init__(self) -> None:
        self.bags: dict[int, _Bag] = {}
        self.total = 0.0

    @staticmethod
    def of(weight: float) -> int:
        mantissa, exponent = math.frexp(weight)
        return exponent - 1 if mantissa == 0.5 else exponent

    def add(self, link: NodeLink, k: int) -> None:
        bag = self.bags.get(k)
        if bag is None:
            bag = self.bags[k] = _Bag()
        bag.add(link)
        self.total += 2.0**k

    def remove(self, link: NodeLink, k: int) -> None:
        bag = self.bags[k]
        bag.remove(link)
        self.total -= 2.0**k
        if not bag.items:
            del self.bags[k]
            if not self.bags:
                self.total = 0.0  # no float drift left behind

    def draw(self, rng: _Random) -> tuple[NodeLink, int]:
        """A node, uniformly within a class drawn in proportion to size x bound."""
        target = rng.random() * self.total
        bags = self.bags
        for k, bag in bags.items():
            target -= len(bag.items) * 2.0**k
            if target < 0:
                break
        else:  # rounding: the last class
            k, bag = next(reversed(bags.items()))
        return bag.items[rng.randrange(len(bag.items))], k

    def members(self) -> list[NodeLink]:
        return [link for bag in self.bags.values() for link in bag.items]


class _ModelIndex:
    """The pool's nodes with one model (`FreePool.index`): those with an idle slot and the
    busy ones (an offer would be held in hand), each in its weight class. A node made busy
    without a `touch` is found at its next draw or walk and moved (nothing is lost: the
    walk is the fallback); one freed without a `touch` waits for its next credit."""

    __slots__ = ("busy", "dirty", "idle", "looks", "model", "where")

    def __init__(self, model: str) -> None:
        self.model = model
        self.idle = _Classes()
        self.busy = _Classes()
        self.where: dict[NodeLink, tuple[bool, int]] = {}
        self.dirty: set[NodeLink] = set()
        self.looks = 0
        """Nodes re-filed or walked (`Router._sample` step 2): what a pick costs."""

    def refile(
        self, link: NodeLink, pooled: bool, weigh: Callable[[NodeLink], float] | None
    ) -> None:
        """Put `link` where it belongs now (or nowhere: out of the pool, or not this model)."""
        self.looks += 1
        old = self.where.pop(link, None)
        if old is not None:
            (self.idle if old[0] else self.busy).remove(link, old[1])
        if not pooled or self.model not in link.models:
            return
        idle = len(link.inflight) < link.slots
        if weigh is None:  # moved between idle and busy: its class stays
            assert old is not None
            k = old[1]
        else:
            k = _Classes.of(weigh(link))
        (self.idle if idle else self.busy).add(link, k)
        self.where[link] = (idle, k)

    def reclass(self, link: NodeLink, weight: float) -> None:
        """`link` weighs more than its class allows (its stake grew): file it anew."""
        idle, k = self.where.pop(link)
        (self.idle if idle else self.busy).remove(link, k)
        k = _Classes.of(weight)
        (self.idle if idle else self.busy).add(link, k)
        self.where[link] = (idle, k)


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

        1. Rejection sampling among the pool's idle nodes with the model (`FreePool.index`,
           kept across passes): draw a weight class in proportion to its size x bound, a
           node uniformly in it, and keep it if it is an idle candidate, with probability
           weight / the class's bound, so each is kept in proportion to its weight, as the
           walk's `choices` keeps it. A drawn node found busy is moved to the busy nodes.
        2. No draw kept: look at each idle node with the model (few while the network is
           busy; busy ones found here are moved out) and choose among the idle candidates
           as the walk does; none, but one idle outside the request's node cap: None, as
           the walk says.
        3. No idle node fits: an offer in hand, by rejection sampling over the busy nodes
           with the model; the walk after `SAMPLE_TRIES` (or when a drawn node turns out
           idle: step 2 did not see it).
        Each step's choice has the walk's distribution, so the mix does too. A pick costs a
        few draws plus a re-filing of each node changed since the last pick."""
        rng = self.rng or random
        model = job.params.model_id

        def bound(link: NodeLink) -> float:
            return memo.classify(self, link)[1] * (WARM_BONUS if model in link.warm else 1.0)

        index = pool.index(model, bound)
        capped = len(in_use) >= MAX_NODES_PER_REQUEST

        def fitting(link: NodeLink) -> float | None:
            """Its stake weight if it has credit and fits the job (tier, model, size)."""
            if link.credit <= 0 or link in job.holders:
                return None
            networks, stake_weight = memo.classify(self, link)
            if tier not in networks or not memo.fits(self, link, job):
                return None
            return stake_weight

        def kept(link: NodeLink, k: int, stake_weight: float) -> bool:
            """The rejection step: True with probability weight / 2^k."""
            heavy = stake_weight * (WARM_BONUS if model in link.warm else 1.0)
            if heavy > 2.0**k:  # its stake grew since it was filed: file it anew, draw again
                index.reclass(link, heavy)
                return False
            return rng.random() * 2.0**k < memo.score(self, link) * heavy

        idle = index.idle
        if idle.total:
            for _ in range(SAMPLE_TRIES):
                link, k = idle.draw(rng)
                if len(link.inflight) >= link.slots:  # busy since it was filed
                    index.refile(link, link in pool, None)
                    if not idle.total:
                        break
                    continue
                if capped and link not in in_use:
                    continue
                stake_weight = fitting(link)
                if stake_weight is not None and kept(link, k, stake_weight):
                    return True, link
            candidates: list[tuple[NodeLink, float]] = []
            outside_idle = False
            for link in idle.members():
                index.looks += 1
                if len(link.inflight) >= link.slots:
                    index.refile(link, link in pool, None)  # compacted: busy now
                    continue
                stake_weight = fitting(link)
                if stake_weight is None:
                    continue
                if capped and link not in in_use:
                    outside_idle = True
                else:
                    candidates.append((link, stake_weight))
            if candidates:
                weights = [
                    memo.score(self, link) * w * (WARM_BONUS if model in link.warm else 1.0)
                    for link, w in candidates
                ]
                return True, rng.choices([c[0] for c in candidates], weights=weights)[0]
            if outside_idle:
                return True, None
        busy = index.busy
        for _ in range(SAMPLE_TRIES if busy.total else 0):
            link, k = busy.draw(rng)
            if len(link.inflight) < link.slots:  # freed without a touch: step 2 missed it
                index.refile(link, link in pool, None)
                return False, None
            if capped and link not in in_use:
                continue
            stake_weight = fitting(link)
            if stake_weight is not None and kept(link, k, stake_weight):
                return True, link
        return False, None


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
