"""Pipelined credit at the node: one offer in hand while the slots render.

The node (the real pull loop, worker and journal, libp2p on 127.0.0.1) against the scripted
coordinator of `test_node_resilience`. Its 2 slots render 2 jobs; a third offer is held (not
declined) and starts the moment a slot frees, before the finished job's result has even been
kept and sent; a fourth is declined. An offer in hand that is not started before its deadline,
or that the coordinator cancels, goes back (HandBack). Progress frames are not sent per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from structlog.testing import capture_logs

from sogni_node.worker import LOOKAHEAD, MAX_LOOKAHEAD, Worker
from sogni_protocol.messages import (
    Cancel,
    HandBack,
    OfferDeclined,
    Progress,
    Ready,
    Result,
    ResultAck,
)

from .test_node_resilience import MODEL, CountingBackend, Link, coordinator, node


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def collect(link: Link, n: int, *kinds: type) -> list[Any]:
    """The next `n` messages of `kinds`, and every Progress seen meanwhile (in order)."""
    out: list[Any] = []
    while sum(isinstance(m, kinds) for m in out) < n:
        out.append(await link.next(*kinds, Progress))
    return out


async def test_the_node_holds_one_offer_and_starts_it_before_the_last_result_leaves(
    tmp_path: Path,
) -> None:
    backend = CountingBackend()
    backend.hold.clear()  # renders wait at step 1
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        ready = await link.next(Ready)
        assert ready.slots == 2 + 1  # both slots and one offer in hand
        a, b, c, d = (coord.offer(seed) for seed in (1, 2, 3, 4))
        await link.channel.send(a)
        await link.channel.send(b)
        await until(lambda: backend.calls == 2)
        await link.channel.send(c)
        await until(lambda: n.worker.in_hand == {c.offer.job_id})
        await link.channel.send(d)
        declined = await link.next(OfferDeclined)
        assert declined.job_id == d.offer.job_id and "no free render slot" in declined.reason
        assert backend.calls == 2  # c waits in hand, unrendered

        # Keeping a result waits until c's render has started: it can only start before a
        # result leaves if the node held it (without pipelining c was declined: time-out).
        keep = n.journal.keep_result
        seen: list[int] = []

        def keep_after_c_started(*args: Any, **kwargs: Any) -> None:
            deadline = time.monotonic() + 10
            while backend.calls < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append(backend.calls)
            keep(*args, **kwargs)

        n.journal.keep_result = keep_after_c_started  # type: ignore[method-assign]
        with capture_logs() as logs:
            backend.hold.set()
            results = [
                m for m in await collect(link, 3, Result, HandBack) if not isinstance(m, Progress)
            ]
        assert all(isinstance(r, Result) for r in results)
        assert {r.job_id for r in results} == {o.offer.job_id for o in (a, b, c)}
        assert seen[0] >= 3  # c rendered before the first result was kept, let alone sent
        events = [(e["event"], e.get("job")) for e in logs]
        started_c = events.index(("job_started", c.offer.job_id.hex()[:16]))
        first_sent = next(i for i, e in enumerate(events) if e[0] == "receipt_sent")
        assert started_c < first_sent  # ordering, not timing: no idle slot between images
        assert n.worker.in_hand == set()
        link.done.set()


async def test_an_offer_in_hand_past_its_deadline_is_handed_back_unrendered(
    tmp_path: Path,
) -> None:
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        await link.channel.send(coord.offer(1))
        await link.channel.send(coord.offer(2))
        await until(lambda: backend.calls == 2)
        soon = coord.offer(3)
        soon_deadline = int(time.time()) + 2
        soon = _with_deadline(coord, soon, soon_deadline)
        await link.channel.send(soon)
        await until(lambda: n.worker.in_hand == {soon.offer.job_id})
        back = await link.next(HandBack, Result)  # at its deadline, both slots still busy
        assert isinstance(back, HandBack) and back.job_id == soon.offer.job_id
        assert back.reason == "offer expired before a slot was free" and back.steps_done == 0
        assert time.time() >= soon_deadline - 1
        backend.hold.set()
        got = [m for m in await collect(link, 2, Result) if isinstance(m, Result)]
        assert soon.offer.job_id not in {r.job_id for r in got}
        assert backend.calls == 2  # never rendered
        link.done.set()


async def test_a_cancelled_offer_in_hand_goes_back_at_once(tmp_path: Path) -> None:
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        await link.channel.send(coord.offer(1))
        await link.channel.send(coord.offer(2))
        await until(lambda: backend.calls == 2)
        held = coord.offer(3)
        await link.channel.send(held)
        await until(lambda: n.worker.in_hand == {held.offer.job_id})
        await link.channel.send(Cancel(job_id=held.offer.job_id))
        back = await link.next(HandBack, Result, timeout=5)
        assert isinstance(back, HandBack) and back.reason == "cancelled by coordinator"
        backend.hold.set()
        await collect(link, 2, Result)
        assert backend.calls == 2
        link.done.set()


async def test_no_progress_frame_per_step(tmp_path: Path) -> None:
    backend = CountingBackend()  # three instant steps
    async with coordinator() as coord, node(tmp_path, coord, backend):
        link = await coord.link()
        for seed in (1, 2, 3):
            await link.channel.send(coord.offer(seed))
        seen = await collect(link, 3, Result, HandBack)
        # one Progress per job (its first step: a listening client sees it start), not one
        # per step: nobody needs 9 frames
        assert sorted(type(m).__name__ for m in seen) == ["Progress"] * 3 + ["Result"] * 3
        assert {m.step for m in seen if isinstance(m, Progress)} == {1}
        link.done.set()


def test_the_lookahead_covers_the_round_trip_at_the_render_rate() -> None:
    worker = Worker(CountingBackend(), slots=2)
    assert worker.lookahead == LOOKAHEAD  # nothing measured yet
    worker.note_render(3.0)  # a GPU render of seconds against a LAN round trip
    worker.note_round_trip(0.05)
    assert worker.lookahead == 1  # a real job is never held back from an idle node
    fast = Worker(CountingBackend(), slots=2)
    fast.note_render(0.1)
    fast.note_round_trip(0.1)  # two slots finish two renders while a credit travels
    assert fast.lookahead == 2
    for _ in range(30):  # a moving average: renders now take a millisecond
        fast.note_render(0.001)
    assert fast.lookahead == MAX_LOOKAHEAD  # never more, however fast
    assert fast.advertise() == MAX_LOOKAHEAD  # a Ready says so
    for _ in range(30):  # renders slow down: it asks for fewer ...
        fast.note_render(1.0)
    assert fast.lookahead == 1 and fast.advertise() == 1
    fast.in_hand.update({b"a", b"b", b"c"})  # ... but what the last big Ready credited fits
    assert fast.can_hold()
    fast.in_hand.add(b"d")
    assert not fast.can_hold()  # never beyond what it promised
    fast.in_hand.clear()
    fast.draining = True
    assert not fast.can_hold()
    slow = Worker(CountingBackend(), slots=1)
    slow.in_hand.add(b"a")
    assert not slow.can_hold()  # nothing promised beyond one: an extra offer is declined


async def test_renders_faster_than_the_round_trip_hold_more_offers(tmp_path: Path) -> None:
    backend = CountingBackend()  # instant renders
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        assert (await link.next(Ready)).slots == 2 + 1
        for seed in (1, 2, 3):
            await link.channel.send(coord.offer(seed))
            result = await link.next(Result)
            await trio.sleep(0.3)  # the coordinator answers slowly: a long round trip
            await link.channel.send(ResultAck(job_id=result.job_id, accepted=True))
        await until(lambda: n.worker.lookahead == MAX_LOOKAHEAD)
        await link.channel.send(coord.offer(4))  # the next credit spent: a fresh Ready
        assert (await link.next(Ready)).slots == 2 + MAX_LOOKAHEAD
        link.done.set()


def _with_deadline(coord: Any, offer: Any, deadline: int) -> Any:
    """`offer` re-signed with another deadline."""
    import msgspec

    from sogni_protocol import eip712
    from sogni_protocol.messages import Offer

    from .test_node_resilience import DOMAIN

    o = msgspec.structs.replace(offer.offer, deadline=deadline)
    signature = eip712.sign_digest(coord.key, eip712.offer_hash(DOMAIN, o))
    assert o.model_id == MODEL
    return Offer(offer=o, params=offer.params, signature=signature)
