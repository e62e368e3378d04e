"""A cluster owner's cancel of the jobs still in the shared queue survives a database blip:
it was queued for one try, and a failed one was dropped for good (no `cluster_cancels` row,
nothing buried): the jobs stayed queued, and any coordinator leased, rendered and billed
them while the client had been told "cancelled"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.cluster import Cluster

from ..coordinator.conftest import Harness, request
from .conftest import pg_rows


async def test_a_cancel_the_database_failed_once_is_tried_again(
    pg_url: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    h = Harness(pg_url, nursery, billing=True, folder=tmp_path)
    cluster = await Cluster.open(pg_url, me=h.dispatcher.address, signers=[], lease_ttl=30)
    try:
        cluster.attach(h.dispatcher)
        payer = Account.create()
        assert h.ledger is not None
        h.ledger.credit_purchase(payer.address, 1)
        sub = await h.submit(authorize(request(2), bytes(payer.key), h.dispatcher.domain))
        real, calls = cluster._sql, []

        async def blip(fn: Any, *args: Any) -> Any:  # the cluster's connection drops once
            calls.append(fn)
            if len(calls) == 1:
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return await real(fn, *args)

        cluster._sql = blip  # type: ignore[method-assign]
        h.dispatcher.cancel_request(sub.accepted.request_id)
        nursery.start_soon(cluster._todo_forever)
        with trio.fail_after(20):
            while await trio.to_thread.run_sync(
                pg_rows, pg_url, "SELECT 1 FROM queue_jobs WHERE state = 'queued'"
            ):
                await trio.sleep(0.1)
        cancels = await trio.to_thread.run_sync(
            pg_rows, pg_url, "SELECT count(*) FROM cluster_cancels"
        )
        assert cancels == [(1,)] and len(calls) >= 2
        assert await cluster.queue.lease("0x" + "77" * 20, 2, 30) == []  # nobody renders them
    finally:
        await cluster.aclose()
        h.close()
