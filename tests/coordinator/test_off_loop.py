"""Nothing blocks the coordinator's event loop: chain reads, ledger and receipt writes run in
worker threads; a locked database delays a receipt instead of resetting the node's stream;
a node that stops reading is held back without losing an ack.

The node stream is the real `serve_node` over an in-memory channel (these tests run no
libp2p, as the rest of tests/coordinator). The hanging chain is a fake `standing` callable
that blocks on a `threading.Event`: it stands for an RPC endpoint that never answers, which
cannot be had on demand. Everything else is real: dispatcher, SQLite, ledger, signatures,
and the embedded EVM for the event feed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator import db as dbmod
from sogni_coordinator.billing import Billing
from sogni_coordinator.chain_link import ChainLink
from sogni_coordinator.dispatch import Dispatcher, Refusal
from sogni_coordinator.job_state import JobState
from sogni_coordinator.ledger import ISSUERS, Ledger, reserved_account, worker_account
from sogni_coordinator.node_session import (
    RESULTS_AT_ONCE,
    outbox_size,
    results_at_once,
    serve_node,
)
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import Router, TierMode
from sogni_coordinator.standing import Standing, StandingCache, StandingLookup
from sogni_coordinator.store import Store
from sogni_net import ChannelClosed, ReadTimeout, WriteTimeout
from sogni_protocol import eip712
from sogni_protocol.messages import (
    Capabilities,
    Goodbye,
    Heartbeat,
    Message,
    NodeHello,
    Offer,
    Ready,
    ResultAck,
    Welcome,
)
from sogni_protocol.payout_rules import SOGNI
from sogni_protocol.pricing import quote

from .conftest import DOMAIN, MODEL, SIGNER, FakeNode, request


# --- an in-memory node stream -----------------------------------------------------------------
class MemoryChannel:
    """The coordinator's end of a node's stream. While `stall()` is in effect the node reads
    nothing: sends wait, as on a stream whose window is shut."""

    def __init__(self, peer_id: str) -> None:
        self.remote_peer_id = peer_id
        self._to_coord, self._from_node = trio.open_memory_channel[Message](64)
        self._to_node, self.inbox = trio.open_memory_channel[Message](1000)
        self._reading = trio.Event()
        self._reading.set()
        self.waiting = 0
        """Sends held back by a stall."""

    def stall(self) -> None:
        self._reading = trio.Event()

    def resume(self) -> None:
        self._reading.set()

    async def receive(self, *, limit: int = 0, timeout: float) -> Message:
        with trio.move_on_after(timeout):
            try:
                return await self._from_node.receive()
            except trio.EndOfChannel:
                raise ChannelClosed("node closed its stream") from None
        raise ReadTimeout(f"no frame within {timeout}s")

    async def send(self, message: Message, *, limit: int = 0, timeout: float = 10.0) -> None:
        await self.send_many([(message, limit)], timeout=timeout)

    async def send_many(
        self, frames: Sequence[tuple[Message, int]], *, timeout: float = 10.0
    ) -> None:
        """As the real channel's: the frames leave together in one write (one wait while
        stalled), and the call returns once all are written."""
        with trio.move_on_after(timeout):
            self.waiting += 1
            try:
                await self._reading.wait()
            finally:
                self.waiting -= 1
            for message, _ in frames:
                self._to_node.send_nowait(message)
            return
        raise WriteTimeout(f"frames not written within {timeout}s")

    async def close(self, *, timeout: float = 10.0) -> None:
        pass


@dataclass
class Node:
    channel: MemoryChannel
    signer: FakeNode
    """conftest's node, for correctly signed results."""

    async def send(self, msg: Message) -> None:
        await self.channel._to_coord.send(msg)

    async def next(self, kind: type | types.UnionType, timeout: float = 5.0) -> Any:
        with trio.fail_after(timeout):
            while True:
                msg = await self.channel.inbox.receive()
                if not isinstance(msg, Heartbeat):
                    assert isinstance(msg, kind), msg
                    return msg


@dataclass
class Coordinator:
    path: Path
    store: Store
    ledger: Ledger
    reputation: Reputation
    dispatcher: Dispatcher
    nursery: trio.Nursery
    nodes: list[Node] = field(default_factory=list)

    async def connect(self, n: int, *, slots: int = 1, device: str = "cpu") -> Node:
        key = bytes([n + 1]) * 32
        wallet = Account.from_key(key).address
        channel = MemoryChannel(f"peer-{n}")
        caps = Capabilities(
            peer_id=channel.remote_peer_id,
            wallet=wallet,
            expiry=int(time.time()) + 600,
            models=[MODEL],
            slots=slots,
            backend="test",
            device=device,
            max_pixels=0,
        )
        serve = partial(serve_node, heartbeat_interval=30.0, heartbeat_timeout=60.0)
        self.nursery.start_soon(serve, channel, self.dispatcher)
        node = Node(channel, None)  # type: ignore[arg-type]
        await node.send(
            NodeHello(capabilities=caps, binding_signature=eip712.sign_binding(key, DOMAIN, caps))
        )
        await node.next(Welcome)
        link = self.dispatcher.nodes[channel.remote_peer_id]
        node.signer = FakeNode(link, key, trio.open_memory_channel[Message](1)[1])
        return node

    async def submit(self, req: Any) -> Any:
        return await self.dispatcher.submit(req, client_peer="client", allowed_models={MODEL})


@asynccontextmanager
async def coordinator(
    tmp_path: Path,
    *,
    standing: StandingLookup | None = None,
    tiers: TierMode = "open",
    billing: bool = False,
) -> AsyncIterator[Coordinator]:
    """A coordinator without libp2p: dispatcher (its `run`: matching, sweeps, the writer)
    and, for a `StandingCache`, the cache's `run`, in one nursery cancelled on exit."""
    path = tmp_path / "coordinator.db"
    store, ledger, reputation = Store(path), Ledger(path), Reputation(path)
    try:
        router = Router(reputation, tiers=tiers, fast_min_stake=10)
        bill = Billing(ledger, DOMAIN) if billing else None
        if standing is not None:
            router.standing = standing
            if bill is not None:
                bill.standing = standing
        dispatcher = Dispatcher(
            store,
            signer_key=bytes(SIGNER.key),
            signer_address=SIGNER.address,
            domain=DOMAIN,
            router=router,
            billing=bill,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dispatcher.run)
            if isinstance(standing, StandingCache):
                nursery.start_soon(standing.run)
            yield Coordinator(path, store, ledger, reputation, dispatcher, nursery)
            nursery.cancel_scope.cancel()
    finally:
        for component in (reputation, ledger, store):
            component.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


def hold_write_lock(path: Path, seconds: float) -> threading.Event:
    """Another process's connection takes the write lock now and lets go after `seconds`
    (in a thread of its own, so the event loop cannot be what releases it)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()
        released.set()

    threading.Thread(target=release, daemon=True).start()
    return released


# --- chain reads --------------------------------------------------------------------------------
async def test_a_chain_that_hangs_does_not_stall_dispatch(tmp_path: Path) -> None:
    unblock = threading.Event()
    asked: list[str] = []

    def hanging(wallet: str) -> Standing:
        asked.append(wallet)
        unblock.wait(30)  # an RPC endpoint that never answers
        return Standing(True, 10**6)

    cache = StandingCache(hanging, timeout=0.3)
    try:
        async with coordinator(tmp_path, standing=cache, tiers="enforced") as c:
            start = trio.current_time()
            node = await c.connect(0, device="cuda")
            link = c.dispatcher.nodes["peer-0"]
            networks, _ = c.dispatcher.router.classify(link.device, link.wallet)
            assert asked and networks == {"relaxed"}  # no standing known: relaxed
            sub = await c.submit(request(1, network="relaxed"))
            await node.send(Ready(slots=1))
            offer = await node.next(Offer)
            await node.send(node.signer.result(offer))
            ack = await node.next(ResultAck)
            assert ack.accepted and ack.job_id == sub.accepted.job_ids[0]
            assert trio.current_time() - start < 3.0  # the hung call cost one timeout
            assert c.store.job_state(ack.job_id) is JobState.DONE
            # later lookups use the last known value and do not wait again
            assert cache(link.wallet) == Standing()
            with trio.fail_after(1):
                await cache.warm(link.wallet)
    finally:
        unblock.set()


async def test_the_cache_is_used_and_invalidated_by_chain_events() -> None:
    chain = {"0xaa": Standing(True, 5)}
    feed: list[set[str] | None] = []
    clock = [0.0]

    def lookup(wallet: str) -> Standing:
        if wallet == "0xbad":
            raise ConnectionError("rpc down")
        return chain[wallet]

    def changes() -> set[str] | None:
        return feed.pop(0) if feed else set()

    cache = StandingCache(
        lookup, changes=changes, ttl=100.0, timeout=1.0, poll_interval=0.02, clock=lambda: clock[0]
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        assert cache("0xAA") == Standing()  # unknown: no standing now, read in the background
        await until(lambda: cache("0xaa") == Standing(True, 5))
        for _ in range(10):
            cache("0xaa")
        assert await cache.warm("0xAA") == Standing(True, 5)
        assert cache.lookups == 1  # served from memory

        chain["0xaa"] = Standing(True, 50)
        clock[0] += 50
        assert cache("0xaa").stake == 5  # still fresh: the chain is not asked
        feed.append({"0xaa"})  # a Staked event
        await until(lambda: cache("0xaa").stake == 50)
        assert cache.lookups == 2

        chain["0xaa"] = Standing(False, 50)
        clock[0] += 101  # past the TTL: the old value now, a new one soon
        assert cache("0xaa") == Standing(True, 50)
        await until(lambda: cache("0xaa") == Standing(False, 50))
        assert cache.lookups == 3

        chain["0xaa"] = Standing(True, 7)
        feed.append(None)  # a blacklisting: every wallet is read again
        await until(lambda: cache("0xaa") == Standing(True, 7))

        assert await cache.warm("0xbad") == Standing()  # a chain error: no standing
        nursery.cancel_scope.cancel()


def test_the_change_feed_names_wallets_from_staking_and_licence_events() -> None:
    from sogni_chain import Deployment, connect, deploy_all

    chain = connect()
    treasury, worker, licensee = chain.accounts[0], chain.accounts[3], chain.accounts[4]
    deployment = Deployment(chain, deploy_all(chain, treasury), sender=treasury)
    link = ChainLink(deployment, settler=None)  # type: ignore[arg-type]  # no epochs here
    feed = link.standing_changes()
    assert feed() == set()  # the first call only marks where to start
    deployment.token.transfer(worker, 100 * SOGNI)
    deployment.token.approve(deployment.staking.address, 100 * SOGNI, sender=worker)
    deployment.staking.stake(100 * SOGNI, sender=worker)
    assert feed() == {worker.address.lower()}
    (token,) = deployment.license.mint_batch([licensee])
    assert feed() == {licensee.address.lower()}
    assert feed() == set()
    deployment.license.blacklist(token)
    assert feed() is None  # the owner is not in the event: every wallet is read again
    assert link.standing(worker.address) == Standing(False, 100)


# --- writes off the loop ---------------------------------------------------------------------
async def test_receipt_ledger_and_reputation_writes_run_off_the_trio_thread(
    tmp_path: Path,
) -> None:
    loop_thread = threading.get_ident()
    writers: dict[str, set[int]] = {}
    async with coordinator(tmp_path, billing=True) as c:
        for obj, name in (
            (c.store, "store_receipts"),
            (c.ledger, "settle"),
            (c.ledger, "refund"),
            (c.reputation, "_write"),
        ):
            real = getattr(obj, name)

            def record(*a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                writers.setdefault(_name, set()).add(threading.get_ident())
                return _real(*a, **kw)

            setattr(obj, name, record)
        payer = Account.create()
        c.ledger.credit_purchase(payer.address, 1)
        req = request(1)
        sub = await c.submit(authorize(req, bytes(payer.key), DOMAIN))
        node = await c.connect(0)
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        await node.send(node.signer.result(offer))
        assert (await node.next(ResultAck)).accepted
        await until(lambda: {"settle", "refund", "_write"} <= writers.keys())
        assert all(loop_thread not in threads for threads in writers.values()), writers
        # and the money is right: paid once, the rest refunded, every asset sums to zero
        per_image = quote(req).per_image.spark_micro
        assert sum(c.ledger.balance(worker_account(node.signer.wallet)).values()) > 0
        assert c.ledger.balance(payer.address)["spark_paid"] == 1_000_000 - per_image
        assert set(c.ledger.totals().values()) == {0}
        assert sum(c.ledger.balance(reserved_account(sub.accepted.request_id)).values()) == 0


async def test_queued_settlements_pay_each_receipt_once_and_conserve_the_ledger(
    tmp_path: Path,
) -> None:
    """Cheating through the queue: the same receipt settled twice in one group (and once
    more raw, at no take), a failing write beside them, a settlement after the refund."""
    path = tmp_path / "coordinator.db"
    store, ledger = Store(path), Ledger(path)
    billing = Billing(ledger, DOMAIN)
    worker = Account.create().address
    payer = Account.create()
    ledger.credit_purchase(payer.address, 1)
    req = request(3)
    rid = b"\x01" * 32
    total = billing.admit(authorize(req, bytes(payer.key), DOMAIN), rid)
    per_image = total // 3
    jobs = [bytes([i]) * 32 for i in (1, 2, 3)]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run_writer)
            await until(lambda: ledger.writer_running)  # what follows is queued
            billing.settle(rid, jobs[0], worker, 10, 10)
            billing.settle(rid, jobs[0], worker, 10, 10)  # a duplicate result
            ledger.submit("cheat", ledger.settle, rid, per_image, worker, 0, 0, job_id=jobs[0])

            def boom() -> None:
                with ledger._tx() as db:
                    db.execute("INSERT INTO ledger_tx (kind, ref, created_at) VALUES ('x','',0)")
                    raise RuntimeError("a write that fails")

            ledger.submit("boom", boom)
            billing.settle(rid, jobs[1], worker, 4, 10)  # a cancelled job: pro rata
            billing.finish(rid)
            billing.settle(rid, jobs[2], worker, 10, 10)  # after the end: nothing to pay
            ledger.submit("late", ledger.settle, rid, per_image, worker, 0, 0, job_id=jobs[2])
            await ledger.call(lambda: None)  # everything queued before is written
            nursery.cancel_scope.cancel()
        paid = per_image + per_image * 4 // 10
        settled = ledger.settled_jobs(0, 2e10)
        assert len(settled) == 2
        assert sum(sum(row[2:5]) for row in settled) == paid
        assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - paid
        assert sum(ledger.balance(reserved_account(rid)).values()) == 0
        assert set(ledger.totals().values()) == {0}
        for account, held in ledger.balances().items():
            assert account in ISSUERS or min(held.values()) >= 0, account
        with ledger._lock:
            kinds = [k for (k,) in ledger._db.execute("SELECT kind FROM ledger_tx")]
        assert "x" not in kinds  # the failed write left nothing
    finally:
        ledger.close()
        store.close()


# --- a busy database ----------------------------------------------------------------------------
async def test_a_locked_database_delays_a_receipt_but_does_not_fail_it(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as c:
        node = await c.connect(0)
        await c.submit(request(1))
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        released = hold_write_lock(c.path, 0.6)
        start = trio.current_time()
        await node.send(node.signer.result(offer))
        ack = await node.next(ResultAck)
        assert ack.accepted and released.is_set()
        assert trio.current_time() - start >= 0.4
        assert c.store.receipt(ack.job_id) is not None


async def test_a_database_locked_past_the_deadline_refuses_the_receipt_not_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dbmod, "WRITE_DEADLINE", 0.2)
    async with coordinator(tmp_path) as c:
        node = await c.connect(0)
        sub = await c.submit(request(1))
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        released = hold_write_lock(c.path, 2.0)
        await node.send(node.signer.result(offer))
        ack = await node.next(ResultAck)
        assert not ack.accepted and "receipt not stored" in ack.reason
        assert c.store.receipt(ack.job_id) is None
        await trio.to_thread.run_sync(released.wait, 5)
        # the same stream carries on: the job was re-queued and is receipted now
        await node.send(Ready(slots=1))
        again = await node.next(Offer)
        assert again.offer.job_id == sub.accepted.job_ids[0]
        await node.send(node.signer.result(again))
        assert (await node.next(ResultAck)).accepted
        assert c.store.job_state(again.offer.job_id) is JobState.DONE


async def test_a_result_read_before_a_bad_frame_is_still_settled(tmp_path: Path) -> None:
    """The session ends on the bad frame, but only after the result before it is committed
    and acked: results are settled concurrently, and the bad frame is read meanwhile."""
    async with coordinator(tmp_path) as c:
        node = await c.connect(0, slots=1)
        [job] = (await c.submit(request(1))).accepted.job_ids
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        await node.send(node.signer.result(offer))
        await node.send(offer)  # not a node's message: a protocol error
        ack = await node.next(ResultAck)
        assert ack.accepted and ack.job_id == job
        assert c.store.job_state(job) is JobState.DONE
        goodbye = await node.next(Goodbye)
        assert "unexpected Offer" in goodbye.reason


# --- backpressure -------------------------------------------------------------------------------
async def test_a_nodes_results_are_committed_without_waiting_for_each_other(
    tmp_path: Path,
) -> None:
    """A result of a two-slot node does not wait for the one before it to be committed and
    acked: while the node reads nothing (its first ack cannot be written), its second result
    still commits (`results_at_once`: one per slot, at most `RESULTS_AT_ONCE`)."""
    assert [results_at_once(n) for n in (0, 1, 2, 64)] == [1, 1, 2, RESULTS_AT_ONCE]
    async with coordinator(tmp_path) as c:
        node = await c.connect(0, slots=2)
        first, second = (await c.submit(request(2))).accepted.job_ids
        await node.send(Ready(slots=2))
        offers = [await node.next(Offer), await node.next(Offer)]
        node.channel.stall()
        for offer in offers:
            await node.send(node.signer.result(offer))
        await until(lambda: c.store.job_state(first) is JobState.DONE)
        await until(lambda: c.store.job_state(second) is JobState.DONE)
        node.channel.resume()
        acks = [await node.next(ResultAck), await node.next(ResultAck)]
        assert {a.job_id for a in acks if a.accepted} == {first, second}


async def test_a_node_that_stops_reading_is_held_back_without_losing_an_ack(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as c:
        node = await c.connect(0, slots=1)
        link = c.dispatcher.nodes["peer-0"]
        assert link.outbox.statistics().max_buffer_size == outbox_size(1)
        first, second, third = (await c.submit(request(3))).accepted.job_ids
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        assert offer.offer.job_id == first

        # the node stops reading: its acks wait for the stream; once `results_at_once` results
        # (one per slot) wait for theirs, the reader reads nothing more
        node.channel.stall()
        result = node.signer.result(offer)
        await node.send(result)
        await until(lambda: node.channel.waiting == 1)
        await until(lambda: c.store.job_state(first) is JobState.DONE)
        at_once = results_at_once(1)
        for _ in range(at_once):  # the same result again: refused, answered all the same
            await node.send(result)
        await node.send(Ready(slots=1))  # would earn the next offer, if it were read
        await trio.sleep(0.2)
        assert c.dispatcher.jobs[second].state is JobState.QUEUED  # the Ready is unread
        node.channel.resume()
        # the last duplicate is read once an ack is written, and the Ready after it: its offer
        # may leave before that duplicate's refusal
        sent = [await node.next(ResultAck | Offer) for _ in range(2 + at_once)]
        acks = [m for m in sent if isinstance(m, ResultAck)]
        assert acks[0].accepted and acks[0].job_id == first  # not dropped
        assert len(acks) == 1 + at_once and not any(a.accepted for a in acks[1:])
        [offer] = [m for m in sent if isinstance(m, Offer)]
        assert offer.offer.job_id == second
        await node.send(node.signer.result(offer))
        assert (await node.next(ResultAck)).accepted

        # a full outbox (the writer is stuck too): no offer is made, the job waits
        node.channel.stall()
        for _ in range(2):  # the writer takes a batch off the outbox into its stuck write
            while True:
                try:
                    link.outbox.send_nowait(Heartbeat(seq=0))
                except trio.WouldBlock:
                    break
            await until(lambda: node.channel.waiting == 1)
        await node.send(Ready(slots=1))
        await trio.sleep(0.2)
        assert c.dispatcher.jobs[third].state is JobState.QUEUED and link.credit == 0
        node.channel.resume()
        await until(lambda: link.outbox.statistics().current_buffer_used == 0)
        await node.send(Ready(slots=1))
        offer = await node.next(Offer)
        assert offer.offer.job_id == third
        await node.send(node.signer.result(offer))
        assert (await node.next(ResultAck)).accepted


async def test_the_standing_cache_forgets_the_least_recently_read_wallet_at_its_limit() -> None:
    """Each new wallet past `max_wallets` scanned every entry for the oldest (~10 ms at
    100,000, on the loop; a throwaway wallet's hello is enough). Now the oldest goes in O(1):
    asserted here as which wallet goes."""
    cache = StandingCache(lambda w: Standing(True, len(w)), max_wallets=3)
    for wallet in ("0x1", "0x2", "0x3"):
        await cache.warm(wallet)
    await cache.warm("0x1")  # fresh: served from memory, now the most recently read
    await cache.warm("0x4")  # one too many: the least recently read goes (0x2)
    assert list(cache._entries) == ["0x3", "0x1", "0x4"]
    cache.invalidate(["0x3"])
    await cache.warm("0x3")  # read again: now the most recent
    await cache.warm("0x5")
    assert list(cache._entries) == ["0x4", "0x3", "0x5"]


async def test_a_database_error_while_shredding_keys_leaves_the_dispatcher_running(
    tmp_path: Path,
) -> None:
    """`_shred_forever` had no `except`: one busy or full database during a shred ended
    `Dispatcher.run`, and with it the coordinator. It is tried again at the next round."""
    async with coordinator(tmp_path) as c:
        real, calls = c.store.shred_keys, []

        def flaky(retention: float) -> int:
            calls.append(retention)
            if len(calls) == 1:
                raise dbmod.DatabaseBusy("stayed locked by another process for 30 s")
            return real(retention)

        c.store.shred_keys = flaky  # type: ignore[method-assign]
        c.dispatcher._shred_wake.set()
        with trio.fail_after(10):
            while len(calls) < 1:
                await trio.sleep(0.01)
            c.dispatcher._shred_wake.set()  # the next round: the loop is still there
            while len(calls) < 2:
                await trio.sleep(0.01)
                c.dispatcher._shred_wake.set()


async def test_the_writer_commits_while_every_default_worker_thread_is_busy(
    tmp_path: Path,
) -> None:
    """The writer's commits ran in trio's default thread pool (40), beside work any peer
    can start at will (balance queries, key lookups): a flood of those queued every receipt's
    commit behind them. The writer has threads of its own."""
    async with coordinator(tmp_path) as c:
        release = threading.Event()
        limiter = trio.to_thread.current_default_thread_limiter()
        try:
            async with trio.open_nursery() as busy:
                for _ in range(int(limiter.total_tokens)):
                    busy.start_soon(partial(trio.to_thread.run_sync, release.wait, 30))
                with trio.fail_after(10):
                    while limiter.borrowed_tokens < limiter.total_tokens:
                        await trio.sleep(0.01)
                    await c.store.call(c.store.save_job_states, [])  # committed meanwhile
                release.set()
        finally:
            release.set()


async def test_a_resume_with_a_random_token_waits_off_the_event_loop(tmp_path: Path) -> None:
    """Anyone may send a `ResumeRequest` with a random id and token: its token check read
    the database on the event loop, which waited there while the writer held the database
    (a commit, or another process's lock: up to 30 s): every session stalled."""
    async with coordinator(tmp_path) as c:
        held, alive, outcome = threading.Event(), threading.Event(), []

        def writer_busy() -> None:  # the writer holds the database until the loop is seen
            with c.store._shared.rlock:
                held.set()
                outcome.append("loop ran" if alive.wait(10) else "loop was blocked")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, writer_busy))
            await trio.to_thread.run_sync(held.wait, 10)

            async def resume() -> None:
                with pytest.raises(Refusal):
                    await c.dispatcher.resume_anywhere(os.urandom(32), os.urandom(32))

            nursery.start_soon(resume)
            await trio.sleep(0.05)  # the resume task has started and waits for the database
            alive.set()  # only if the loop runs meanwhile
        assert outcome == ["loop ran"]
