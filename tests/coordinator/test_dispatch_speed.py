"""What the dispatch-speed work (#16) must not change: the node a pass picks and the
reputation rows written.

- `Router.one_pass` remembers tiers, fits and scores for one match pass: with the same random
  stream it picks exactly the nodes it picks without the memo.
- `Reputation` writes the records changed before its queued write runs in that one write,
  each as it last was.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from sogni_coordinator.jobs import Job, NodeLink
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import Router
from sogni_protocol.messages import JobParams

MODEL = "m"


def _link(i: int) -> NodeLink:
    send, _ = trio.open_memory_channel[object](1)
    return NodeLink(
        peer_id=f"p{i}",
        wallet=f"0x{i:040x}",
        models=frozenset({MODEL} if i % 5 else {"other"}),  # every fifth lacks the model
        slots=1 + i % 2,
        outbox=send,  # type: ignore[arg-type]
        max_pixels=0 if i % 7 else 32 * 32,  # every seventh is too small
        connected_at=1000.0 - i,
        warm=frozenset({MODEL}) if i % 3 == 0 else frozenset(),
    )


def _job(request: int, index: int) -> Job:
    params = JobParams(
        model_id=MODEL, positive_prompt="x", steps=1, guidance=1.0, width=64, height=64, seed=index
    )
    return Job(bytes([request, index]) * 16, bytes([request]) * 32, index, params, 1)


def _picks(memo: bool) -> list[str | None]:
    """Thirty picks over 20 nodes of mixed credit, load, fit and reputation."""
    reputation = Reputation(":memory:", clock=lambda: 2000.0)
    for i in range(20):  # different scores: jobs, failures, speeds
        for _ in range(i % 4):
            reputation.succeeded(f"0x{i:040x}", elapsed=1.0 + i, budget=30.0, work_units=1)
        if i % 6 == 0:
            reputation.failed(f"0x{i:040x}")
    router = Router(reputation, rng=random.Random(7), clock=lambda: 2000.0)
    links = [_link(i) for i in range(20)]
    for i, link in enumerate(links):
        link.credit = 0 if i % 4 == 3 else 1
        if i % 3 == 1:  # busy: an offer would be held in hand
            link.inflight[bytes(32)] = _job(9, 0)
    out: list[str | None] = []
    in_use: set[NodeLink] = set()
    for n in range(30):
        job = _job(n % 3, n)
        if memo:
            with router.one_pass():
                got = router.pick(job, links, in_use)
        else:
            got = router.pick(job, links, in_use)
        out.append(None if got is None else got.peer_id)
    reputation.close()
    return out


def test_a_pick_in_a_pass_is_the_pick_without_the_memo() -> None:
    picks = _picks(memo=False)
    assert len({p for p in picks if p is not None}) > 3  # the choice is a real one
    assert _picks(memo=True) == picks


async def test_reputation_changes_before_the_write_share_it(tmp_path: Path) -> None:
    path = tmp_path / "rep.db"
    reputation = Reputation(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reputation.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(30):  # nothing awaits in between: the writer has not run yet
            reputation.succeeded(f"0x{n % 3:040x}", elapsed=1.0, budget=30.0, work_units=n)
        reputation.strike("0x" + "0" * 40, now=1234.0)
        assert len(reputation._shared._queue) == 1  # one queued write for 31 changes
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    expected = {w: r.jobs for w, r in reputation.records.items()}
    strikes = reputation.records["0x" + "0" * 40].strikes
    reputation.close()
    again = Reputation(path)  # what was written is what memory held last
    assert (
        {w: r.jobs for w, r in again.records.items()}
        == expected
        == {f"0x{i:040x}": 10 for i in range(3)}
    )
    assert again.records["0x" + "0" * 40].strikes == strikes == [1234.0]
    again.close()
