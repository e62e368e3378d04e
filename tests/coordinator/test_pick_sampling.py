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
