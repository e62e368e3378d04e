"""Pipelined credit at the coordinator: a node that says `slots + n` holds n offers in hand
(n at most `MAX_LOOKAHEAD`).

Its next job is there when a render ends (no idle slot for the result -> ack -> offer round
trip); its credit comes back with each acked result, without a `Ready`. An offer in hand is
still a held offer: it expires at its deadline and goes back to the queue, and a node that
dies with one in hand has it re-offered. Older nodes (a `Ready` counting free slots) keep
the Ready-driven flow.
"""

from __future__ import annotations

from sogni_coordinator.dispatch import MAX_LOOKAHEAD
from sogni_coordinator.job_state import JobState
from sogni_coordinator.routing import MAX_NODES_PER_REQUEST

from .conftest import FLOOR, Harness, request


def _state(coord: Harness, job_id: bytes) -> JobState:
    return coord.dispatcher.jobs[job_id].state


async def test_a_pipelining_node_holds_what_it_asks_up_to_max_lookahead(coord: Harness) -> None:
    sub = await coord.submit(request(MAX_LOOKAHEAD + 3))
    a = coord.node(0, slots=1, ready=False)
    coord.dispatcher.ready(a.link, 1 + 1)  # slots + one in hand (a render slower than the trip)
    coord.dispatcher.match()
    first, second = a.offers()  # one to render, one in hand; no third
    ids = sub.accepted.job_ids
    assert [first.offer.job_id, second.offer.job_id] == ids[:2]
    assert _state(coord, ids[2]) is JobState.QUEUED and a.link.credit == 0
    # renders faster than the round trip: it asks for more; more than MAX_LOOKAHEAD earns none
    coord.dispatcher.ready(a.link, 1 + MAX_LOOKAHEAD + 5)
    coord.dispatcher.match()
    more = a.offers()
    assert [o.offer.job_id for o in more] == ids[2 : 1 + MAX_LOOKAHEAD]
    assert _state(coord, ids[1 + MAX_LOOKAHEAD]) is JobState.QUEUED and a.link.credit == 0
    # the result is acked: the credit is back without a Ready, the next offer goes out
    await coord.deliver(a, first)
    coord.dispatcher.result_acked(a.link)
    coord.dispatcher.match()
    (last,) = a.offers()
    assert last.offer.job_id == ids[1 + MAX_LOOKAHEAD]
    assert len(a.link.inflight) == 1 + MAX_LOOKAHEAD


async def test_an_older_node_still_waits_for_its_ready(coord: Harness) -> None:
    await coord.submit(request(3))
    a = coord.node(0, slots=1)  # Ready(1): one free slot
    coord.dispatcher.match()
    (first,) = a.offers()
    await coord.deliver(a, first)
    coord.dispatcher.result_acked(a.link)
    coord.dispatcher.match()
    assert a.offers() == []  # its credit comes with its Ready, as before
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    assert len(a.offers()) == 1


async def test_an_offer_in_hand_expires_at_its_deadline_and_goes_back(coord: Harness) -> None:
    sub = await coord.submit(request(2))
    a = coord.node(0, slots=1, ready=False)
    coord.dispatcher.ready(a.link, 2)
    coord.dispatcher.match()
    rendering, in_hand = a.offers()
    coord.clock.advance(FLOOR + 1)  # neither answered in time
    coord.dispatcher.sweep()
    assert {c.job_id for c in a.cancels()} == set(sub.accepted.job_ids)
    assert _state(coord, in_hand.offer.job_id) is JobState.QUEUED
    assert a.link.inflight == {}
    b = coord.node(1, slots=1)
    coord.dispatcher.match()
    (again,) = b.offers()  # one of the two, re-offered
    assert again.offer.job_id in {rendering.offer.job_id, in_hand.offer.job_id}


async def test_a_node_that_dies_with_an_offer_in_hand_has_it_reoffered(coord: Harness) -> None:
    sub = await coord.submit(request(2))
    a = coord.node(0, slots=1, ready=False)
    coord.dispatcher.ready(a.link, 2)
    coord.dispatcher.match()
    assert len(a.offers()) == 2
    coord.dispatcher.node_left(a.link, "stream closed")  # crashed: one rendering, one in hand
    assert coord.dispatcher.free == {}
    b = coord.node(1, slots=1, ready=False)
    coord.dispatcher.ready(b.link, 2)
    coord.dispatcher.match()
    got = [o.offer.job_id for o in b.offers()]
    assert sorted(got) == sorted(sub.accepted.job_ids)


async def test_an_idle_node_goes_before_an_offer_in_hand(coord: Harness) -> None:
    sub = await coord.submit(request(1))
    busy = coord.node(0, slots=1, ready=False)
    coord.dispatcher.ready(busy.link, 2)
    coord.dispatcher.match()
    assert len(busy.offers()) == 1  # now rendering, with credit for one in hand
    assert busy.link.credit == 1
    idle = coord.node(1, slots=1)
    await coord.submit(request(1))
    for _ in range(20):  # weighted random otherwise: never the busy node while one is idle
        job = next(j for j in coord.dispatcher.queue if j.state is JobState.QUEUED)
        state = coord.dispatcher.requests.get(job.request_id)
        in_use = set(state.nodes) if state else set()
        picked = coord.dispatcher.router.pick(job, list(coord.dispatcher.free), in_use)
        assert picked is idle.link
    assert sub.accepted.job_ids[0] in busy.link.inflight


async def test_a_request_at_its_node_cap_lets_busy_nodes_drain_for_idle_ones(
    coord: Harness,
) -> None:
    n = MAX_NODES_PER_REQUEST
    sub = await coord.submit(request(n + 8))
    nodes = [coord.node(i, slots=1, ready=False) for i in range(n + 1)]
    for node in nodes:
        coord.dispatcher.ready(node.link, 2)
    coord.dispatcher.match()
    offered = {i: [o.offer.job_id for o in node.offers()] for i, node in enumerate(nodes)}
    busy = [i for i, jobs in offered.items() if jobs]
    (left_out,) = [i for i, jobs in offered.items() if not jobs]
    # The cap is full with one job per node, and while a capable node waits idle outside
    # it no node takes a second job in hand: the rest stay queued.
    assert len(busy) == n and all(len(offered[i]) == 1 for i in busy)
    queued = [j for j in sub.accepted.job_ids if _state(coord, j) is JobState.QUEUED]
    assert len(queued) == 8
    # A result drains one node out of the request: an idle node (the one left out, or the
    # drained one: weighted random) gets the next job, never a busy one as an offer in
    # hand; as results come in, the one left out gets work too.
    got_work = False
    for first in busy[:8]:
        offer = next(o for o in nodes[first].seen if o.offer.job_id == offered[first][0])
        await coord.deliver(nodes[first], offer)
        coord.dispatcher.result_acked(nodes[first].link)
        coord.dispatcher.match()
        new = {i: len(node.offers()) for i, node in enumerate(nodes)}
        assert sum(new.values()) == 1 and new[first] + new[left_out] == 1, new
        got_work |= new[left_out] == 1
        if got_work:
            break
    assert got_work
