"""A job owned by coordinator A, leased and rendered by coordinator B's node, cancelled by
A's client mid-render: the node's partial receipt (the steps it did before the cancel) is
stored once and paid pro rata by A, the owner; the rest of the reservation is refunded."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import trio

from sogni_app.api import authorize
from sogni_coordinator.cluster import DEAD_GRACE
from sogni_coordinator.ledger import ASSETS, Ledger, partial_value, reserved_account, worker_account
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Cancel,
    CancelRequest,
    Offer,
    Receipt,
    RenderMeta,
    RequestDone,
    Result,
    ResultAck,
)
from sogni_protocol.pricing import quote

from ..e2e.conftest import receive_skipping, tiny_request
from ..e2e.rogue_kit import heartbeats
from .conftest import Rogue, paying_account, pg_rows, submit, two_and_a_node


def partial_result(node: Rogue, offer: Offer, domain: Domain, steps_done: int) -> Result:
    """The signed partial receipt `node` sends for `offer` after a cancel (no image, work
    units pro rata)."""
    o = offer.offer
    receipt = Receipt(
        job_id=o.job_id,
        offer_hash=eip712.offer_hash(domain, o),
        worker=node.acct.address,
        coordinator=o.coordinator,
        model_id=o.model_id,
        result_hash=hashlib.sha256(b"").digest(),
        steps_done=steps_done,
        work_units=o.work_units * steps_done // o.steps,
        completed_at=int(time.time()),
        price_factor_bps=o.price_factor_bps,
    )
    return Result(
        job_id=o.job_id,
        image=b"",
        receipt=receipt,
        signature=eip712.sign_receipt(bytes(node.acct.key), domain, receipt),
        meta=RenderMeta(backend="rogue", device="cpu", dtype="float32", threads=1),
    )


async def _until(check: Any, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.1)


async def test_a_partial_receipt_at_the_lessee_is_stored_and_paid_by_the_owner(
    tmp_path: Path, pg_url: str
) -> None:
    payer = paying_account(pg_url)
    ledger = Ledger(pg_url)
    req = tiny_request(1, seed=31, steps=10)
    per_image = quote(req).per_image.spark_micro
    try:
        async with two_and_a_node(tmp_path, pg_url, 30.0) as (a, _b, client, node):
            assert node.channel is not None
            channel, accepted = await submit(
                client, a, authorize(req, bytes(payer.key), a.net.domain)
            )
            offer = await node.offer()  # B leased A's job and offered it
            await trio.sleep(1.0)  # a step's worth of time at a newcomer's rate
            await channel.send(CancelRequest(request_id=accepted.request_id))
            cancel = await receive_skipping(node.channel, (Cancel,), 20)
            assert cancel.job_id == offer.offer.job_id and cancel.pay_partial
            await node.channel.send(partial_result(node, offer, a.net.domain, 1))
            ack = await receive_skipping(node.channel, (ResultAck,), 20)
            assert ack.accepted, ack.reason
            done = await receive_skipping(channel, (RequestDone,), 20)
            assert (done.delivered, done.cancelled) == (0, 1)
            rid = accepted.request_id
            await _until(lambda: sum(ledger.balance(reserved_account(rid)).values()) == 0, 20)
        charged = partial_value(per_image, 1, 10)
        assert charged > 0
        assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - charged
        assert sum(ledger.balance(worker_account(node.acct.address)).values()) > 0
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)
        assert pg_rows(pg_url, "SELECT state FROM jobs") == [("cancelled",)]
        assert pg_rows(pg_url, "SELECT count(*) FROM receipts") == [(1,)]
        assert pg_rows(pg_url, "SELECT state FROM queue_jobs") == [("done",)]
    finally:
        ledger.close()


async def _cancelled_at_b_then_b_dies(
    tmp_path: Path, pg_url: str, payer: Any, req: Any, *, wait_for_lease: bool
) -> tuple[bytes, Rogue]:
    """A owns a paid request, B's node renders it, A's client cancels, B tells its node to
    stop and dies before the node's partial receipt reaches it; the node delivers it to A
    (`wait_for_lease`: after B's lease lapsed and A leased the job). Returns the request id
    and the node once the request ended."""
    async with (
        two_and_a_node(tmp_path, pg_url, 2.0) as (a, b, client, node),
        trio.open_nursery() as beats,
    ):
        assert node.channel is not None
        channel, accepted = await submit(client, a, authorize(req, bytes(payer.key), a.net.domain))
        offer = await node.offer()
        await trio.sleep(1.0)
        await channel.send(CancelRequest(request_id=accepted.request_id))
        cancel = await receive_skipping(node.channel, (Cancel,), 20)
        assert cancel.pay_partial
        await _until(lambda: pg_rows(pg_url, "SELECT state FROM jobs") == [("cancelling",)], 10)
        await b.kill()
        await node.connect(a)
        beats.start_soon(heartbeats, node.channel)  # a stream kept alive while it waits
        if wait_for_lease:  # B's lease lapsed: A (its node has a slot) leases the job
            me = a.running.dispatcher.cluster.me
            await _until(
                lambda: pg_rows(pg_url, "SELECT lease_owner FROM queue_jobs") == [(me,)], 20
            )
            await trio.sleep(DEAD_GRACE + 1.5)  # what the owner gives a dead job
        await node.channel.send(partial_result(node, offer, a.net.domain, 1))
        ack = await receive_skipping(node.channel, (ResultAck,), 20)
        assert ack.accepted, ack.reason
        done = await receive_skipping(channel, (RequestDone,), 30)
        assert (done.delivered, done.failed, done.cancelled) == (0, 0, 1)
        rid = accepted.request_id
        ledger = Ledger(pg_url)
        try:
            await _until(lambda: sum(ledger.balance(reserved_account(rid)).values()) == 0, 20)
        finally:
            ledger.close()
        beats.cancel_scope.cancel()
        return rid, node


async def _paid_once(pg_url: str, payer: Any, node: Rogue, per_image: int) -> None:
    ledger = Ledger(pg_url)
    try:
        charged = partial_value(per_image, 1, 10)
        assert ledger.balance(payer.address)["spark_paid"] == 1_000_000 - charged
        assert sum(ledger.balance(worker_account(node.acct.address)).values()) > 0
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)
    finally:
        ledger.close()
    assert pg_rows(pg_url, "SELECT state FROM jobs") == [("cancelled",)]
    assert pg_rows(pg_url, "SELECT count(*) FROM receipts") == [(1,)]


async def test_a_partial_receipt_for_a_dead_lessee_is_taken_by_another_coordinator(
    tmp_path: Path, pg_url: str
) -> None:
    """B dies after telling its node to stop: the node's partial receipt, delivered to A
    while B's lease still stands, is taken (the stored job is cancelling, not running) and
    paid."""
    payer = paying_account(pg_url)
    req = tiny_request(1, seed=32, steps=10)
    _rid, node = await _cancelled_at_b_then_b_dies(
        tmp_path, pg_url, payer, req, wait_for_lease=False
    )
    await _paid_once(pg_url, payer, node, quote(req).per_image.spark_micro)


async def test_a_cancelling_job_leased_again_waits_for_its_partial_receipt(
    tmp_path: Path, pg_url: str
) -> None:
    """B dies after telling its node to stop; its lease lapses and A leases the job, stored
    cancelling: A waits for the partial receipt (as a restarted coordinator does), never
    fails the job as dead, and pays the receipt when the node brings it."""
    payer = paying_account(pg_url)
    req = tiny_request(1, seed=33, steps=10)
    _rid, node = await _cancelled_at_b_then_b_dies(
        tmp_path, pg_url, payer, req, wait_for_lease=True
    )
    await _paid_once(pg_url, payer, node, quote(req).per_image.spark_micro)
