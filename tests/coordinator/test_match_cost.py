"""A match pass costs the jobs it places, not the jobs of requests it cannot place.

A request at its 16-node cap, its nodes busy, cannot take a free node outside the cap: the
pass sets all its queued jobs aside as one run (`TieredQueue.take_run`) instead of popping
each, and the jobs queued behind it still get the free nodes. The queue's order is what it
was. Counted on the queue's own pops, not timed.
"""

from __future__ import annotations

from collections import deque

from sogni_coordinator.jobs import Job
from sogni_coordinator.routing import MAX_NODES_PER_REQUEST
from sogni_coordinator.staking_benefits import TieredQueue
from sogni_protocol.messages import JobParams

from .conftest import Harness, request


class _CountingQueue(TieredQueue):
    pops = 0

    def popleft(self) -> Job:
        _CountingQueue.pops += 1
        return super().popleft()


async def test_a_capped_request_is_set_aside_whole_and_the_next_gets_the_free_nodes(
    coord: Harness,
) -> None:
    d = coord.dispatcher
    d.queue = _CountingQueue(d.queue.tiers)
    await coord.submit(request(300))
    nodes = [coord.node(i) for i in range(MAX_NODES_PER_REQUEST + 4)]
    d.match()  # 16 nodes busy with the capped request; 4 idle nodes outside its cap
    assert sum(len(n.offers()) for n in nodes) == MAX_NODES_PER_REQUEST
    after = await coord.submit(request(10, seed=2))
    queued_before = list(d.queue)
    _CountingQueue.pops = 0
    d.match()
    offered = [o.offer.job_id for n in nodes for o in n.offers()]
    assert sorted(offered) == sorted(after.accepted.job_ids[:4])  # the next request's jobs
    # one pop for the capped request (its 283 others set aside at once), four placed
    assert _CountingQueue.pops == 1 + 4, _CountingQueue.pops
    assert list(d.queue) == [j for j in queued_before if j.job_id not in offered]
    assert len(d.queue) == 300 - MAX_NODES_PER_REQUEST + 10 - 4


def _job(request: int, index: int) -> Job:
    params = JobParams(
        model_id="m", positive_prompt="x", steps=1, guidance=1.0, width=64, height=64, seed=index
    )
    return Job(bytes([request, index]) * 16, bytes([request]) * 32, index, params, 1)


def test_runs_keep_the_queue_order() -> None:
    q = TieredQueue()
    a = [_job(1, i) for i in range(5)]
    b = [_job(2, i) for i in range(3)]
    q.extend(a[1:])
    q.extend(b)
    q.appendleft(a[0])  # a requeued job joins its request's run at the front
    assert list(q) == a + b and len(q) == 8
    first = q.popleft()
    rest = q.take_run(first.request_id)
    assert list(rest) == a[1:] and len(q) == 3
    assert q.take_run(first.request_id) == deque()  # the front is another request's now
    q.put_back_run(rest)
    q.appendleft(first)
    assert list(q) == a + b and len(q) == 8
    assert q.take_run(a[0].request_id) == deque(a) and list(q) == b
    # put back in front of a run of the same request: copied whichever is shorter
    q.appendleft(a[4])
    q.put_back_run(deque(a[:4]))  # the longer run: the front's job moves onto it
    assert list(q) == a + b
    assert q.take_run(a[0].request_id) == deque(a)
    q.put_back_run(deque(a[1:]))
    q.put_back_run(deque(a[:1]))  # the shorter run: its job moves onto the front's
    assert list(q) == a + b and len(q) == 8
