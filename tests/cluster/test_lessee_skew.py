"""Coordinators' clocks that disagree. Lease expiry, heartbeats and the orphan window use
the database's clock; a ledger reservation is stamped with its writer's own. One whose
clock runs an hour behind the database's stamps every reservation "an hour old": another
coordinator's look for reservations nobody registered (`UNREGISTERED_GRACE`) that fell
between that reserve and its request's registering (milliseconds) claimed and refunded a
request whose client was being told "accepted". Now a reservation must stay unregistered
`UNREGISTERED_CONFIRM` seconds, by the looking coordinator's own clock, to be claimed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import trio
from eth_account import Account

from sogni_coordinator.cluster import UNREGISTERED_CONFIRM
from sogni_coordinator.ledger import Ledger
from sogni_protocol.pricing import quote

from ..e2e.conftest import tiny_request
from .conftest import MODEL, pg_rows, start_cluster

RID = b"\x5b" * 32


async def test_a_reservation_stamped_by_a_slow_clock_is_not_refunded_while_registering(
    tmp_path: Path, pg_url: str
) -> None:
    payer = Account.create()
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(payer.address, 1)
        ledger.reserve(RID, payer.address, quote(tiny_request(1, seed=51)), "spark")
    finally:
        ledger.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # its writer's clock: 1 h behind
        conn.execute("UPDATE ledger_reservations SET created_at = created_at - 3600")
    async with start_cluster(tmp_path, pg_url, ["a"], models=[MODEL]) as m:
        cluster = m["a"].running.dispatcher.cluster
        with trio.fail_after(10):  # its first look at unregistered reservations has run
            while not getattr(cluster, "_unregistered", None) and pg_rows(
                pg_url, "SELECT state FROM ledger_reservations"
            ) == [("open",)]:
                await trio.sleep(0.05)
        # the reserving coordinator registers the request now, as it does milliseconds later
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO cluster_requests VALUES (%s, 'skewed', 0) ON CONFLICT DO NOTHING",
                (RID,),
            )
        await trio.sleep(UNREGISTERED_CONFIRM + 2)
        assert pg_rows(pg_url, "SELECT owner FROM cluster_requests") == [("skewed",)]
        assert pg_rows(pg_url, "SELECT state FROM ledger_reservations") == [("open",)]
