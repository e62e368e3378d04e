"""One job can never take the node down, and a rendered result is never rendered twice.

The node here is the real one (`pull_forever`, `PullSession`, `Worker`, `Journal`, libp2p on
127.0.0.1) against a scripted coordinator: a libp2p host that welcomes the node and then
sends exactly the offers, acks and stream breaks each test names, signing offers with its
own key. The renderer is a stand-in that counts its renders and makes every image unique (a
second render could never reproduce the bytes), since what is under test is the job path
around it, not diffusion.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from structlog.testing import capture_logs

from sogni_net import Channel, open_host
from sogni_node import pull
from sogni_node.daemon import _forward_orphans
from sogni_node.journal import Journal
from sogni_node.metrics import metered
from sogni_node.pull import NodeIdentity, PullSession, pull_forever
from sogni_node.render.backend import RenderCancelled, RenderJob, RenderOutput
from sogni_node.worker import OVERTIME_REASON, Worker
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, JOBS_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.logs import redact_sensitive
from sogni_protocol.messages import (
    Cancel,
    Capabilities,
    HandBack,
    JobOffer,
    JobParams,
    NodeHello,
    Offer,
    OfferDeclined,
    Result,
    ResultAck,
    Welcome,
)

MODEL = "sogni-tiny-sd"
MARK = "SENT" + "INEL"  # the prompt; assembled so a traceback quoting this file cannot hold it
DOMAIN = Domain(31337, "0x" + "ab" * 20)
PNG = b"\x89PNG\r\n\x1a\n"


class CountingBackend:
    """Counts renders; fails the seeds in `fail`; holds every render at step 1 while `hold`
    is clear (`started` is set when one is held there)."""

    name = "counting"
    supports_loras = False

    def __init__(self) -> None:
        self.calls = 0
        self.fail: set[int] = set()
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        self.calls += 1
        if job.seed in self.fail:
            raise RuntimeError(f"cannot render {job.prompt}")  # a message quoting the prompt
        for step in range(1, job.steps + 1):
            if should_cancel():
                raise RenderCancelled(step - 1)
            on_step(step)
            if step == 1:
                self.started.set()
                assert self.hold.wait(timeout=30)
        image = PNG + os.urandom(32)  # unique: only a re-send can repeat these bytes
        return RenderOutput(image, job.steps, self.name, "cpu", "float32", 1)

    def close(self) -> None:
        pass


@dataclass
class Link:
    """The coordinator's end of one node stream."""

    channel: Channel
    done: trio.Event = field(default_factory=trio.Event)

    async def next(self, *kinds: type, timeout: float = 20.0) -> Any:
        """The next message of one of `kinds`, skipping Ready, Progress and heartbeats."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.channel.receive(limit=RESULT_FRAME_LIMIT, timeout=timeout)
                if isinstance(msg, kinds):
                    return msg


@dataclass
class Coordinator:
    addr: str
    key: bytes
    address: str
    links: trio.MemoryReceiveChannel[Link]

    def offer(self, seed: int, *, job_id: bytes | None = None, later: int = 0) -> Offer:
        """A signed offer; `later` moves its deadline, which changes its hash."""
        params = JobParams(
            model_id=MODEL,
            positive_prompt=MARK,
            steps=3,
            guidance=4.0,
            width=64,
            height=64,
            seed=seed,
        )
        offer = JobOffer(
            job_id=job_id or os.urandom(32),
            coordinator=self.address,
            model_id=MODEL,
            params_hash=eip712.params_hash(params),
            steps=3,
            width=64,
            height=64,
            seed=seed,
            work_units=3000,
            deadline=int(time.time()) + 600 + later,
        )
        digest = eip712.offer_hash(DOMAIN, offer)
        return Offer(offer=offer, params=params, signature=eip712.sign_digest(self.key, digest))

    async def link(self) -> Link:
        with trio.fail_after(20):
            return await self.links.receive()


@asynccontextmanager
async def coordinator(heartbeat_interval: float = 0.5) -> AsyncIterator[Coordinator]:
    acct = Account.create()
    send, receive = trio.open_memory_channel[Link](16)

    async def on_node(channel: Channel) -> None:
        hello = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(hello, NodeHello)
        await channel.send(
            Welcome(
                coordinator=acct.address,
                chain_id=DOMAIN.chain_id,
                verifying_contract=DOMAIN.verifying_contract,
                heartbeat_interval=heartbeat_interval,
            )
        )
        link = Link(channel)
        await send.send(link)
        await link.done.wait()

    async with open_host(key_path=None, listen=["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler(JOBS_PROTOCOL, on_node)
        yield Coordinator(host.addrs[0], bytes(acct.key), acct.address, receive)


@dataclass
class Node:
    journal: Journal
    worker: Worker
    results: Path


@asynccontextmanager
async def node(
    tmp: Path,
    coord: Coordinator,
    backend: CountingBackend,
    wallet: Any = None,
    heartbeat_timeout: float = 60,  # the scripted coordinator sends no heartbeats
    resend_after: float | None = None,
) -> AsyncIterator[Node]:
    """A node daemon's pull loop for `coord`; leaving the block stops it (a node restart
    when the next block opens on the same `tmp` and `wallet`). `resend_after`: the daemon's
    `_forward_orphans` runs too, results unanswered that long sent again."""
    acct = wallet or Account.create()
    identity = NodeIdentity(
        acct.address, bytes(acct.key), DOMAIN, frozenset({coord.address.lower()})
    )
    worker = metered([MODEL])(backend, slots=2)  # as the daemon's (its HTTP listener on)
    journal = Journal(tmp / "journal.db", tmp / "results")
    try:
        async with open_host(key_path=tmp / "node.key", listen=()) as host:
            caps = Capabilities(
                peer_id=host.peer_id,
                wallet=acct.address,
                expiry=int(time.time()) + 600,
                models=[MODEL],
                slots=2,
                backend=backend.name,
                device="cpu",
                max_pixels=1 << 20,
            )

            def new_session() -> PullSession:
                return PullSession(
                    host,
                    coord.addr,
                    identity,
                    worker,
                    journal,
                    caps,
                    heartbeat_interval=0.5,
                    heartbeat_timeout=heartbeat_timeout,
                )

            async with trio.open_nursery() as nursery:
                sessions: set[PullSession] = set()
                nursery.start_soon(pull_forever, new_session, coord.addr, sessions, trio.Event())
                if resend_after is not None:
                    nursery.start_soon(
                        functools.partial(
                            _forward_orphans,
                            journal,
                            sessions,
                            identity,
                            interval=0.1,
                            orphan_after=resend_after,
                        )
                    )
                yield Node(journal, worker, tmp / "results")
                nursery.cancel_scope.cancel()
    finally:
        journal.close()


def kept(journal: Journal) -> set[str]:
    """Job ids (hex) whose images the node keeps."""
    return {job_id.hex() for job_id in journal.kept_results()}


def recover(result: Result) -> str:
    return eip712.recover_receipt_signer(DOMAIN, result.receipt, result.signature)


async def test_a_journal_failure_hands_that_job_back_and_the_next_job_renders(
    tmp_path: Path,
) -> None:
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        keep = n.journal.keep_result
        failures: list[int] = []

        def keep_once(*args: Any, **kwargs: Any) -> None:
            if not failures:
                failures.append(1)
                raise OSError("disk full")
            keep(*args, **kwargs)

        n.journal.keep_result = keep_once  # type: ignore[method-assign]
        first = coord.offer(1)
        with capture_logs() as logs:
            await link.channel.send(first)
            back = await link.next(HandBack, Result)
        assert isinstance(back, HandBack) and back.job_id == first.offer.job_id
        assert back.reason == "node error"
        [failed] = [e for e in logs if e["event"] == "job_failed"]
        assert failed["error"] == "OSError" and failed["job"] == first.offer.job_id.hex()[:16]
        second = coord.offer(2)
        await link.channel.send(second)
        result = await link.next(HandBack, Result)
        assert isinstance(result, Result) and result.job_id == second.offer.job_id
        assert n.worker.running == {}  # the failed job's slot came back
        link.done.set()


async def test_a_failed_render_is_contained_and_never_logs_the_prompt(tmp_path: Path) -> None:
    backend = CountingBackend()
    backend.fail.add(1)
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        with capture_logs() as logs:
            await link.channel.send(coord.offer(1))
            back = await link.next(HandBack, Result)
            await link.channel.send(coord.offer(2))
            result = await link.next(HandBack, Result)
        assert isinstance(back, HandBack) and back.reason == "render failed"
        assert (
            isinstance(result, Result) and recover(result) == n.journal.receipts()[0].receipt.worker
        )
        emitted = [redact_sensitive(None, e["log_level"], dict(e)) for e in logs]
        assert MARK not in repr(emitted)  # what the logger's processors let through
        (failed,) = [e for e in logs if e["event"] == "render_failed"]
        assert failed["error"] == "RuntimeError"  # and where, without the message: an
        assert "test_node_resilience.py" in failed["where"]  # operator finds the line
        assert "in render" in failed["where"]
        link.done.set()


async def test_a_reoffer_of_a_rendered_job_resends_the_kept_result(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        offer = coord.offer(1)
        await link.channel.send(offer)
        first = await link.next(Result, HandBack)
        assert isinstance(first, Result)

        await link.channel.send(offer)  # the same offer again (same hash)
        same = await link.next(Result, HandBack)
        assert (same.image, same.receipt, same.signature) == (
            first.image,
            first.receipt,
            first.signature,
        )

        again = coord.offer(1, job_id=offer.offer.job_id, later=5)  # a restarted coordinator
        await link.channel.send(again)  # on this session the first result awaits its ack
        declined = await link.next(OfferDeclined, Result, HandBack)
        assert isinstance(declined, OfferDeclined) and "awaits" in declined.reason
        link.done.set()  # the coordinator restarts: a new session, the same re-offer
        link = await coord.link()
        await link.channel.send(again)
        resent = await link.next(Result, HandBack)
        assert isinstance(resent, Result) and resent.image == first.image
        assert resent.receipt.result_hash == first.receipt.result_hash
        assert resent.receipt.result_hash == hashlib.sha256(first.image).digest()
        assert resent.receipt.offer_hash == eip712.offer_hash(DOMAIN, again.offer)
        assert recover(resent) == recover(first)  # re-signed by the same wallet
        assert backend.calls == 1
        [entry] = n.journal.receipts()
        assert (entry.receipt, entry.signature) == (resent.receipt, resent.signature)
        link.done.set()


async def test_a_reoffer_naming_other_parameters_is_declined_not_resigned(
    tmp_path: Path,
) -> None:
    """Only the coordinator, model, work units and steps were compared: a re-offer of the
    job with another seed (or prompt, size) had the node sign a receipt binding its kept
    image to parameters it never rendered, which every check then held against it."""
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        offer = coord.offer(1)
        await link.channel.send(offer)
        first = await link.next(Result, HandBack)
        assert isinstance(first, Result)
        link.done.set()  # a new session (the first result's ack never comes)
        link = await coord.link()
        other = coord.offer(2, job_id=offer.offer.job_id, later=5)  # another seed
        await link.channel.send(other)
        declined = await link.next(OfferDeclined, Result, HandBack)
        assert isinstance(declined, OfferDeclined) and "differs" in declined.reason
        [entry] = n.journal.receipts()
        assert (entry.receipt, entry.signature) == (first.receipt, first.signature)
        again = coord.offer(1, job_id=offer.offer.job_id, later=9)  # same parameters
        await link.channel.send(again)
        resent = await link.next(Result, HandBack)
        assert isinstance(resent, Result) and backend.calls == 1
        [entry] = n.journal.receipts()  # what the journal holds verifies as signed
        assert eip712.recover_receipt_signer(
            eip712.Domain(DOMAIN.chain_id, DOMAIN.verifying_contract, entry.domain_version),
            entry.receipt,
            entry.signature,
        ) == recover(resent)
        link.done.set()


async def test_a_coordinator_beating_less_often_than_the_node_times_out_is_waited_for(
    tmp_path: Path,
) -> None:
    """The reader always used the node's own timeout (15 s by default): a coordinator whose
    `Welcome` says it beats every 20 s timed out every idle node, which reconnected and had
    its jobs re-queued. Now the node waits 3 beats of the coordinator's interval."""
    async with (
        coordinator(heartbeat_interval=1.0) as coord,
        node(tmp_path, coord, CountingBackend(), heartbeat_timeout=0.8),
    ):
        link = await coord.link()
        await trio.sleep(2.0)  # silent for 2.5 of the node's timeouts, under 3 beats
        await link.channel.send(coord.offer(1))
        assert isinstance(await link.next(Result, HandBack), Result)
        assert coord.links.statistics().current_buffer_used == 0  # never reconnected
        link.done.set()


async def test_results_are_kept_until_acked_then_deleted(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        ids = []
        for seed in (1, 2, 3):
            offer = coord.offer(seed)
            await link.channel.send(offer)
            assert isinstance(await link.next(Result, HandBack), Result)
            ids.append(offer.offer.job_id)
        assert kept(n.journal) == {i.hex() for i in ids}

        await link.channel.send(ResultAck(job_id=ids[0], accepted=True))
        await link.channel.send(ResultAck(job_id=ids[1], accepted=False, reason="bad image"))
        await link.channel.send(coord.offer(4))
        fourth = await link.next(Result, HandBack)
        with trio.fail_after(20):  # the acks are journaled in a batch of their own, off the
            while kept(n.journal) != {ids[2].hex(), fourth.job_id.hex()}:  # loop: polled
                await trio.sleep(0.01)
        states = {r.receipt.job_id: r.accepted for r in n.journal.receipts()}
        assert (states[ids[0]], states[ids[1]], states[ids[2]]) == (True, False, None)

        await link.channel.send(coord.offer(1, job_id=ids[0], later=5))  # already delivered
        declined = await link.next(OfferDeclined, Result, HandBack)
        assert isinstance(declined, OfferDeclined) and "already accepted" in declined.reason
        await link.channel.send(coord.offer(2, job_id=ids[1], later=5))  # refused: rendered anew
        rerendered = await link.next(Result, HandBack)
        assert isinstance(rerendered, Result) and rerendered.job_id == ids[1]
        assert backend.calls == 5
        link.done.set()


async def test_an_ack_for_a_result_this_session_never_sent_is_ignored(tmp_path: Path) -> None:
    """Only the acks of results written on this session are journaled: a refusal naming a
    job whose result went out on an earlier session (or to another coordinator) would void
    a kept result nobody refused."""
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        first = await coord.link()
        offer = coord.offer(1)
        await first.channel.send(offer)
        assert isinstance(await first.next(Result, HandBack), Result)
        job = offer.offer.job_id
        first.done.set()  # the stream ends before the coordinator acks
        second = await coord.link()  # the node's next session
        await second.channel.send(ResultAck(job_id=job, accepted=False, reason="not yours"))
        await second.channel.send(coord.offer(2))  # read after the ack: it would be journaled
        assert isinstance(await second.next(Result, HandBack), Result)
        assert job.hex() in kept(n.journal)
        assert {r.receipt.job_id: r.accepted for r in n.journal.receipts()}[job] is None
        second.done.set()


async def test_a_refusal_and_the_reoffer_in_one_write_render_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator refuses a result and offers the job again in the same write: the
    re-offer waits for the refusal to be journaled (acks are written in batches off the
    reader) and renders anew, instead of resending the refused image as still unanswered."""
    mark = Journal.mark_acked_many

    def slow_mark(self: Journal, acks: Any) -> int:
        time.sleep(0.5)  # the ack batch is still being written when the re-offer is read
        return mark(self, acks)

    monkeypatch.setattr(Journal, "mark_acked_many", slow_mark)
    backend = CountingBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend):
        link = await coord.link()
        offer = coord.offer(1)
        await link.channel.send(offer)
        first = await link.next(Result, HandBack)
        assert isinstance(first, Result)
        again = coord.offer(1, job_id=offer.offer.job_id, later=5)
        refusal = ResultAck(job_id=offer.offer.job_id, accepted=False, reason="bad image")
        await link.channel.send_many([(refusal, CONTROL_FRAME_LIMIT), (again, CONTROL_FRAME_LIMIT)])
        second = await link.next(Result, HandBack, OfferDeclined)
        assert isinstance(second, Result) and second.image != first.image  # rendered anew
        assert backend.calls == 2


async def test_a_node_restart_resends_an_unacked_result_when_offered_again(
    tmp_path: Path,
) -> None:
    wallet = Account.create()
    async with coordinator() as coord:
        async with node(tmp_path, coord, CountingBackend(), wallet):
            link = await coord.link()
            offer = coord.offer(7)
            await link.channel.send(offer)
            first = await link.next(Result, HandBack)
            assert isinstance(first, Result)
            link.done.set()  # no ack: the node stops now
        backend = CountingBackend()
        async with node(tmp_path, coord, backend, wallet):
            link = await coord.link()
            again = coord.offer(7, job_id=offer.offer.job_id, later=5)
            await link.channel.send(again)
            resent = await link.next(Result, HandBack)
            assert isinstance(resent, Result)
            assert (resent.image, resent.receipt.result_hash) == (
                first.image,
                first.receipt.result_hash,
            )
            assert resent.receipt.offer_hash == eip712.offer_hash(DOMAIN, again.offer)
            assert recover(resent) == wallet.address
            assert backend.calls == 0
            link.done.set()


async def _reoffered_mid_render(
    coord: Coordinator, backend: CountingBackend
) -> tuple[Link, Offer, Offer]:
    """A job offered, its render held at step 1, the coordinator's stream reset (it died);
    the node reconnects and the job is offered again (another hash). Returns the new link,
    the first offer and the re-offer."""
    link = await coord.link()
    offer = coord.offer(1)
    await link.channel.send(offer)
    await trio.to_thread.run_sync(backend.started.wait, 20)
    await link.channel.reset()  # the coordinator dies mid-render
    link.done.set()
    relink = await coord.link()  # the node reconnected
    again = coord.offer(1, job_id=offer.offer.job_id, later=5)
    await relink.channel.send(again)
    return relink, offer, again


async def test_a_render_outlives_its_broken_stream_and_answers_the_reoffer(
    tmp_path: Path,
) -> None:
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        relink, offer, again = await _reoffered_mid_render(coord, backend)
        assert set(n.worker.running) == {offer.offer.job_id}  # the render runs on
        backend.hold.set()
        resent = await relink.next(Result, HandBack, OfferDeclined)
        assert isinstance(resent, Result) and backend.calls == 1
        assert resent.receipt.offer_hash == eip712.offer_hash(DOMAIN, again.offer)
        assert resent.receipt.result_hash == hashlib.sha256(resent.image).digest()
        relink.done.set()


async def test_a_cancel_after_a_reconnect_stops_the_earlier_sessions_render(
    tmp_path: Path,
) -> None:
    """The coordinator re-offers a job whose render outlived its broken stream, then
    cancels it: the earlier session is gone, so its render stops; the re-offer waiting
    behind it is handed back once it has (it used to wait the render out and answer the
    cancelled offer with a full result)."""
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        relink, offer, _again = await _reoffered_mid_render(coord, backend)
        await relink.channel.send(Cancel(job_id=offer.offer.job_id))
        with trio.fail_after(20):
            while not n.worker.running[offer.offer.job_id].cancel.is_set():
                await trio.sleep(0.01)  # polled: the worker offers no event for it
        backend.hold.set()  # the earlier render, held at step 1, sees its cancel now
        back = await relink.next(HandBack, Result, OfferDeclined)
        assert isinstance(back, HandBack) and "cancelled" in back.reason
        assert not n.worker.running and backend.calls == 1
        relink.done.set()


async def test_a_paid_cancel_after_a_reconnect_is_answered_with_the_partial_receipt(
    tmp_path: Path,
) -> None:
    """The client cancels (paid) a re-offered job whose earlier session's render is still
    running: that render stops, its partial receipt (steps done, no image) is kept and
    answers the re-offer, re-signed for it. It was journaled but never sent (the re-offer
    was handed back with 0 steps): the node went unpaid for steps the client pays for."""
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        relink, offer, again = await _reoffered_mid_render(coord, backend)
        await relink.channel.send(Cancel(job_id=offer.offer.job_id, pay_partial=True))
        with trio.fail_after(20):
            while not n.worker.running[offer.offer.job_id].cancel.is_set():
                await trio.sleep(0.01)  # polled: the worker offers no event for it
        backend.hold.set()
        partial = await relink.next(Result, HandBack, OfferDeclined)
        assert isinstance(partial, Result) and partial.image == b""
        assert partial.receipt.steps_done == 1 and backend.calls == 1
        assert partial.receipt.offer_hash == eip712.offer_hash(DOMAIN, again.offer)
        assert partial.receipt.work_units == again.offer.work_units // again.offer.steps
        assert eip712.same_address(recover(partial), partial.receipt.worker)
        relink.done.set()


async def test_a_partial_receipt_lost_with_its_stream_is_sent_when_the_node_is_back(
    tmp_path: Path,
) -> None:
    """The stream drops between the paid cancel and the partial receipt: the render stops,
    its receipt is kept, and the node's next session to that coordinator gets it unasked
    (the coordinator waits for it, `Dispatcher.PARTIAL_WAIT`); it was kept and never sent."""
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend, resend_after=0.5) as n:
        link = await coord.link()
        offer = coord.offer(1)
        await link.channel.send(offer)
        await trio.to_thread.run_sync(backend.started.wait, 20)
        await link.channel.send(Cancel(job_id=offer.offer.job_id, pay_partial=True))
        with trio.fail_after(20):
            while not n.worker.running[offer.offer.job_id].cancel.is_set():
                await trio.sleep(0.01)  # polled: the worker offers no event for it
        await link.channel.reset()  # the stream is lost before the partial receipt
        link.done.set()
        backend.hold.set()
        relink = await coord.link()
        partial = await relink.next(Result, HandBack, OfferDeclined)
        assert isinstance(partial, Result) and partial.image == b""
        assert partial.receipt.steps_done == 1
        assert partial.receipt.offer_hash == eip712.offer_hash(DOMAIN, offer.offer)
        assert eip712.same_address(recover(partial), partial.receipt.worker)
        await relink.channel.send(ResultAck(job_id=offer.offer.job_id, accepted=True))
        with trio.fail_after(20):
            while n.journal.unacked():
                await trio.sleep(0.05)  # the ack is journaled off the loop
        relink.done.set()


async def test_a_result_kept_under_a_previous_wallet_is_declined_not_resigned(
    tmp_path: Path,
) -> None:
    """The operator replaced the wallet (or a container's ephemeral key changed) with a
    result kept for the coordinator: re-signed with the new key it named the old worker, and
    the coordinator refused it as a bad result (a strike) and rendered it again."""
    backend = CountingBackend()
    async with coordinator() as coord:
        async with node(tmp_path, coord, backend):
            link = await coord.link()
            offer = coord.offer(1)
            await link.channel.send(offer)
            assert isinstance(await link.next(Result, HandBack), Result)  # kept, never acked
            link.done.set()
        async with node(tmp_path, coord, backend, wallet=Account.create()):
            relink = await coord.link()
            again = coord.offer(1, job_id=offer.offer.job_id, later=5)
            await relink.channel.send(again)
            answer = await relink.next(Result, HandBack, OfferDeclined)
            assert isinstance(answer, OfferDeclined) and "previous wallet" in answer.reason
            assert backend.calls == 1  # not rendered again on this node either
            relink.done.set()


async def test_a_result_too_large_to_send_is_handed_back_and_the_stream_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull, "RESULT_FRAME_LIMIT", 64)  # any real image is above it
    async with coordinator() as coord, node(tmp_path, coord, CountingBackend()):
        link = await coord.link()
        offer = coord.offer(1)
        await link.channel.send(offer)
        back = await link.next(HandBack, Result)
        assert isinstance(back, HandBack) and back.reason == "result too large"
        await link.channel.send(coord.offer(2))
        assert isinstance(await link.next(HandBack, Result), HandBack)  # same stream, alive
        link.done.set()


async def test_a_render_far_past_its_deadline_stops_and_is_handed_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render had no wall-clock limit: one stuck slow (a throttled GPU, a swapping host)
    held its slot for ever after the coordinator had given the job to another node. Past
    the deadline by as long again (at least `OVERTIME_FLOOR`), it stops at its next step."""
    monkeypatch.setattr(pull, "OVERTIME_FLOOR", 0.5)
    backend = CountingBackend()
    backend.hold.clear()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:
        link = await coord.link()
        offer = coord.offer(1, later=-598)  # deadline in 2 s
        await link.channel.send(offer)
        await trio.to_thread.run_sync(backend.started.wait, 20)
        with trio.fail_after(20):
            while time.time() <= offer.offer.deadline + 2.5:  # past deadline + max(floor, 2 s)
                await trio.sleep(0.1)
        backend.hold.set()  # the render reaches its next step
        back = await link.next(HandBack, Result)
        assert isinstance(back, HandBack) and back.reason == OVERTIME_REASON
        assert back.steps_done == 1 and not n.worker.running
        link.done.set()
