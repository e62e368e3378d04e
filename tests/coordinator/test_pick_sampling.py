"""`Router.pick` in a match pass over many free nodes: the same choice, without the walk.

With the dispatcher's pool (`FreePool`) and a pass memo, a pick draws nodes uniformly from
the pass's view of the pool (per model: idle ones first, then all) and keeps one with
probability weight / bound (rejection sampling), looking further only when the draws find
nothing. The tests check what a node would see: each idle capable node is chosen as often
as the walk's weighted choice chooses it, busy or unfit nodes never while an idle one fits,
an offer in hand likewise, a capped request waits as the walk says, and a pass costs one
look at each free node plus a few draws per pick instead of a walk per pick.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import trio

from sogni_coordinator.jobs import Job, NodeLink
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import WARM_BONUS, FreePool, Router
from sogni_coordinator.standing import Standing
from sogni_protocol.messages import JobParams

MODEL = "m"
NOW = 2000.0


def _job(request: int, index: int) -> Job:
    params = JobParams(
        model_id=MODEL, positive_prompt="x", steps=1, guidance=1.0, width=64, height=64, seed=index
    )
    return Job(bytes([request, index % 256]) * 16, bytes([request]) * 32, index, params, 1)


def _pool(n: int, pool: FreePool, *, mixed: bool) -> list[NodeLink]:
    """`n` nodes with credit in `pool`; `mixed`: some lack the model, some are too small,
    some busy (an offer would be held in hand), some warm."""
    links = []
    for i in range(n):
        send, _ = trio.open_memory_channel[object](1)
        link = NodeLink(
            peer_id=f"p{i}",
            wallet=f"0x{i:040x}",
            models=frozenset({"other"} if mixed and i % 5 == 0 else {MODEL}),
            slots=1,
            outbox=send,  # type: ignore[arg-type]
            max_pixels=32 * 32 if mixed and i % 7 == 0 else 0,
            connected_at=NOW - 100 * i,
            warm=frozenset({MODEL}) if i % 3 == 0 else frozenset(),
        )
        if mixed and i % 4 == 1:
            link.inflight[bytes(32)] = _job(9, 0)
        link.pool = pool
        link.credit = 1
        links.append(link)
    return links


def _reputation(n: int) -> Reputation:
    reputation = Reputation(":memory:", clock=lambda: NOW)
    for i in range(n):  # scores spread between the floor and 1
        for _ in range(i % 6):
            reputation.succeeded(f"0x{i:040x}", elapsed=1.0 + i % 9, budget=10.0, work_units=1)
        if i % 6 == 0:
            reputation.failed(f"0x{i:040x}")
    return reputation


def _weights(reputation: Reputation, links: list[NodeLink]) -> dict[NodeLink, float]:
    return {
        link: reputation.get(link.wallet).score(NOW, link.connected_at)
        * (WARM_BONUS if MODEL in link.warm else 1.0)
        for link in links
    }


def _assert_drawn_as(
    router: Router, pool: FreePool, in_use: set[NodeLink], expected: dict[NodeLink, float]
) -> None:
    """20,000 picks of one job in one pass: each expected node within 5 sigma of its share
    of the weights, no other node ever."""
    picks = 20_000
    got: Counter[NodeLink] = Counter()
    job = _job(1, 1)
    with router.one_pass():
        for _ in range(picks):
            link = router.pick(job, pool, in_use)
            assert link is not None
            got[link] += 1
    assert set(got) <= set(expected)
    total = sum(expected.values())
    for link, weight in expected.items():
        p = weight / total
        sigma = math.sqrt(picks * p * (1 - p))
        assert abs(got[link] - picks * p) < 5 * sigma + 1, (link.peer_id, got[link], picks * p)


def test_a_sampled_pick_chooses_each_idle_node_as_often_as_the_walk() -> None:
    n = 40
    reputation = _reputation(n)
    router = Router(reputation, rng=random.Random(3), clock=lambda: NOW)
    pool = FreePool()
    links = _pool(n, pool, mixed=True)
    idle = [
        link
        for link in links
        if MODEL in link.models and link.max_pixels == 0 and not link.inflight
    ]  # never busy, never unfit, while an idle node fits
    _assert_drawn_as(router, pool, set(), _weights(reputation, idle))
    reputation.close()


def test_with_no_idle_fit_the_offer_in_hand_is_drawn_as_the_walk_draws_it() -> None:
    """Idle nodes that cannot render the job, and busy ones that can: the job goes to a
    busy node (held in hand), in proportion to the weights."""
    n = 30
    reputation = _reputation(n)
    router = Router(reputation, rng=random.Random(5), clock=lambda: NOW)
    pool = FreePool()
    links = _pool(n, pool, mixed=True)
    for link in links:
        if not link.inflight:
            link.models = frozenset({"other"})
    ahead = [link for link in links if link.inflight and MODEL in link.models]
    ahead = [link for link in ahead if link.max_pixels == 0]
    assert len(ahead) > 3
    _assert_drawn_as(router, pool, set(), _weights(reputation, ahead))
    reputation.close()


def test_a_request_at_its_node_cap_waits_while_an_idle_node_outside_it_fits() -> None:
    """Its 16 nodes busy (with credit for an offer in hand) and an idle node outside the
    cap: no offer in hand, as the walk decides, so the busy nodes drain and the request
    moves on to the idle node."""
    reputation = _reputation(20)
    router = Router(reputation, rng=random.Random(9), clock=lambda: NOW)
    pool = FreePool()
    links = _pool(20, pool, mixed=False)
    for link in links[:16]:
        link.inflight[bytes(32)] = _job(9, 0)
    in_use = set(links[:16])
    with router.one_pass():
        assert all(router.pick(_job(1, i), pool, in_use) is None for i in range(50))
        assert router.pick(_job(1, 1), list(pool), in_use) is None  # the walk agrees
    for link in links[16:]:  # the idle ones busy too: an offer in hand inside the cap
        link.inflight[bytes(32)] = _job(9, 0)
    _assert_drawn_as(router, pool, in_use, _weights(reputation, links[:16]))
    reputation.close()


class _CountingPool(FreePool):
    """Counts the pool nodes a pass looks at: each a walk or the pass's view passes."""

    looks = 0

    def __iter__(self) -> Iterator[NodeLink]:
        for link in super().__iter__():
            _CountingPool.looks += 1
            yield link


class _CountingRandom(random.Random):
    """Counts the draws of a node (`randrange`)."""

    draws = 0

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        _CountingRandom.draws += 1
        return super().randrange(*args, **kwargs)


def test_a_pass_over_many_free_nodes_looks_at_a_few_per_pick() -> None:
    n, picks = 500, 200
    reputation = _reputation(n)
    router = Router(reputation, rng=_CountingRandom(11), clock=lambda: NOW)
    pool = _CountingPool()
    links = _pool(n, pool, mixed=False)
    for link in links[::2]:  # half of them busy: offers in hand are drawn too
        link.inflight[bytes(32)] = _job(9, 0)
    _CountingPool.looks = _CountingRandom.draws = 0
    with router.one_pass():
        for i in range(picks):
            assert router.pick(_job(1, i), pool, set()) is not None
    # the pass's view (one look at each node: 500) and ~2 draws per pick (333 when written);
    # a walk per pick would be 100,000 looks
    assert _CountingPool.looks <= n, _CountingPool.looks
    assert _CountingRandom.draws <= 5 * picks, _CountingRandom.draws
    reputation.close()


# --- the pool's index kept across passes (`FreePool.index`) -----------------------------------
def _looks(pool: FreePool) -> int:
    """Nodes a pass looked at: pool walks (`_CountingPool`) and the index's re-filings and
    step-2 walks (0 where there is no index)."""
    indexes = getattr(pool, "_indexes", {})
    return _CountingPool.looks + sum(index.looks for index in indexes.values())


class _Inflight(dict[bytes, Job]):
    """A node's jobs in flight, counting how often a pick asks how many (each look at a
    node asks once: is it busy?), whatever the router keeps to find nodes."""

    lens = 0

    def __len__(self) -> int:
        _Inflight.lens += 1
        return super().__len__()


def _counted(links: list[NodeLink]) -> None:
    for link in links:
        link.inflight = _Inflight(link.inflight)


def _place(link: NodeLink, job: Job) -> None:
    """What `Dispatcher._offer` does to the node: a credit spent, a slot taken."""
    link.credit -= 1
    link.inflight[job.job_id] = job


def _free(pool: FreePool, link: NodeLink, job: Job) -> None:
    """What `Dispatcher._forget_holder` and the node's next credit do."""
    link.inflight.pop(job.job_id)
    pool.touch(link)
    link.credit += 1


def test_one_pick_per_pass_over_many_nodes_looks_at_a_few() -> None:
    """Steady state with pipelined credit: 2,000 nodes with credit, all but 5 busy, one job
    placed per pass and one node freed: a pass looks at O(1) nodes (amortised), not every
    node with credit (2,000 per pass before the index was kept across passes)."""
    n, passes = 2000, 400
    reputation = _reputation(50)
    router = Router(reputation, rng=_CountingRandom(13), clock=lambda: NOW)
    pool = _CountingPool()
    links = _pool(n, pool, mixed=False)
    for link in links:
        link.credit = 2  # room for an offer in hand
    for link in links[: n - 5]:
        link.inflight[bytes(32)] = _job(9, 0)
    placed: list[tuple[NodeLink, Job]] = []
    _CountingPool.looks = _CountingRandom.draws = 0
    for i in range(passes):
        job = _job(1 + i % 200, i % 256)
        with router.one_pass():
            picked = router.pick(job, pool, set())
        assert picked is not None and len(picked.inflight) < picked.slots  # idle ones first
        _place(picked, job)
        placed.append((picked, job))
        if len(placed) > 3:  # a render ends: its node is idle again
            _free(pool, *placed.pop(0))
    # the first pass builds the index (a look at each node and its filing: 2 x 2,000), then
    # a few per pass
    assert _looks(pool) <= 2 * n + 5 * passes, _looks(pool)
    assert _CountingRandom.draws <= 5 * passes, _CountingRandom.draws
    reputation.close()


def test_a_burst_of_picks_costs_linear_looks() -> None:
    """`n` idle nodes and `n` jobs in one pass, each placed: drawn nodes that are busy leave
    the idle nodes, so the looks grow linearly with `n` (~n^2/6 step-2 looks before)."""
    costs = {}
    for n in (250, 1000):
        reputation = _reputation(50)
        router = Router(reputation, rng=_CountingRandom(17), clock=lambda: NOW)
        pool = _CountingPool()
        _counted(_pool(n, pool, mixed=False))
        _CountingPool.looks = _CountingRandom.draws = _Inflight.lens = 0
        with router.one_pass():
            for i in range(n):
                job = _job(1 + (i // 15) % 250, i % 256)
                link = router.pick(job, pool, set())
                assert link is not None and not link.inflight
                _place(link, job)
        assert not pool
        costs[n] = _CountingPool.looks + _Inflight.lens + _CountingRandom.draws
        reputation.close()
    assert costs[1000] <= 6 * costs[250], costs  # linear: 4x; quadratic: 16x


def test_a_big_staker_bounds_only_its_own_weight_class() -> None:
    """Mixed stakes (one whale, some stakers, most with none), the whale and half of the
    rest busy: idle nodes are still chosen in proportion to score x stake weight x warm,
    and a pick needs a few draws, not a walk of the idle nodes (one whale's weight bounded
    every draw before, so most failed and fell to the walk: 240 looks per pick)."""
    n = 1000
    reputation = _reputation(n)  # scores spread between the floor and 1

    def standing(wallet: str) -> Standing:
        i = int(wallet, 16)  # node 0: the whale; every third node: no stake
        return Standing(True, 10**12 if i == 0 else 0 if i % 3 == 0 else 10 ** (i % 7 * 2))

    router = Router(reputation, rng=_CountingRandom(19), clock=lambda: NOW, standing=standing)
    pool = _CountingPool()
    links = _pool(n, pool, mixed=False)
    for link in links[::2]:  # the whale among them
        link.inflight[bytes(32)] = _job(9, 0)
    _counted(links)
    _CountingPool.looks = _Inflight.lens = 0
    picks = 200
    with router.one_pass():
        for i in range(picks):
            job = _job(1 + i // 16, i)
            picked = router.pick(job, pool, set())
            assert picked is not None
            _place(picked, job)
    looks = _CountingPool.looks + _Inflight.lens
    assert looks <= 2 * n + 5 * picks, looks  # the build, then a few per pick

    idle = links[9:49:2]  # 20 idle nodes of every stake: drawn as the walk would
    small = FreePool()
    for link in links:
        link.inflight.clear()
        link.pool = None
    for link in idle:
        link.credit = 1
        link.pool = small
        small[link] = None
    for link in links[:8]:  # the whale and others busy, with credit: never chosen
        link.inflight[bytes(32)] = _job(9, 0)
        link.credit = 1
        link.pool = small
        small[link] = None
    weights = {
        link: w * router.classify(link.device, link.wallet)[1]
        for link, w in _weights(reputation, idle).items()
    }
    assert len({round(w, 3) for w in weights.values()}) > 8
    _assert_drawn_as(router, small, set(), weights)
    reputation.close()


def test_the_index_follows_touched_nodes_and_forgets_unasked_models() -> None:
    """A node whose models change (`touch`, as `capabilities_changed` does) is drawn for
    its new model only; an index no pick asks for is dropped once its backlog outgrows
    the pool, and rebuilt when asked for again."""
    reputation = _reputation(20)
    router = Router(reputation, rng=random.Random(23), clock=lambda: NOW)
    pool = FreePool()
    links = _pool(20, pool, mixed=False)
    with router.one_pass():
        assert router.pick(_job(1, 0), pool, set()) is not None  # builds MODEL's index
    for link in links[1:]:
        link.models = frozenset({"other"})
        pool.touch(link)
    with router.one_pass():
        assert all(router.pick(_job(1, i), pool, set()) is links[0] for i in range(50))
    for link in _pool(200, pool, mixed=False):  # nodes that come and go, no pick between
        link.credit = 0
    assert MODEL not in pool._indexes and len(pool) == 20
    links[5].models = frozenset({MODEL})
    pool.touch(links[5])
    with router.one_pass():
        got = {router.pick(_job(1, i), pool, set()) for i in range(100)}
    assert got == {links[0], links[5]}
    reputation.close()
