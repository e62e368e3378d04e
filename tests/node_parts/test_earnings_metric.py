"""The node's earnings on `/metrics`: accepted receipts from the real journal, counted once
(a refused receipt never, a late acknowledgement on the next refresh, a receipt voided and
re-signed after a coordinator's key rotation once), valued at each receipt's tier price, and
read by a task off the event loop; the scrape parses with prometheus_client's own parser."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import trio
from eth_account import Account
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sogni_node.earnings import EarningsTally, receipt_spark_micro
from sogni_node.http_api import NodeView
from sogni_node.journal import Journal
from sogni_node.metrics import metered, observe
from sogni_protocol.messages import Receipt

WORKER = Account.create().address
COORDINATOR = Account.create().address


def _receipt(units: int, bps: int = 10_000, completed_at: int | None = None) -> Receipt:
    image = os.urandom(16)
    return Receipt(
        job_id=os.urandom(32),
        offer_hash=os.urandom(32),
        worker=WORKER,
        coordinator=COORDINATOR,
        model_id="sogni-tiny-sd",
        result_hash=hashlib.sha256(image).digest(),
        steps_done=3,
        work_units=units,
        completed_at=completed_at or int(time.time()),
        price_factor_bps=bps,
    )


def _record(journal: Journal, receipt: Receipt) -> None:
    journal.record_receipt(receipt, os.urandom(65))


def test_the_tally_counts_each_accepted_receipt_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    fast, relaxed, refused, late = (
        _receipt(43_200),
        _receipt(43_200, 5_000),
        _receipt(7),
        _receipt(100),
    )
    for r in (fast, relaxed, refused, late):
        _record(journal, r)
    journal.mark_acked(fast.job_id, True)
    journal.mark_acked(relaxed.job_id, True)
    journal.mark_acked(refused.job_id, False, "bad image")
    tally = EarningsTally(journal)
    tally.refresh()
    assert (tally.accepted, tally.work_units) == (2, 86_400)
    assert tally.spark_micro == 1_500_000  # one Spark at full price, half a Spark relaxed
    journal.mark_acked(late.job_id, True)  # answered after the refresh
    # a receipt voided when its coordinator rotated keys, re-signed and then accepted
    rotated = _receipt(200, completed_at=int(time.time()) - 60)
    _record(journal, rotated)
    tally.refresh()
    journal.mark_acked(rotated.job_id, False, "void: re-signed for the coordinator's new key")
    resigned = msgspec.structs.replace(rotated, offer_hash=os.urandom(32))
    _record(journal, resigned)
    journal.mark_acked(resigned.job_id, True)
    tally.refresh()
    tally.refresh()  # nothing new: nothing added twice
    assert (tally.accepted, tally.work_units) == (4, 86_700)
    assert journal.counts()["work_units_accepted"] == tally.work_units
    assert tally.spark_micro == 1_500_000 + receipt_spark_micro(100, 10_000) + receipt_spark_micro(
        200, 10_000
    )
    fresh = EarningsTally(journal)  # a restart reads the whole journal again
    fresh.refresh()
    assert (fresh.accepted, fresh.work_units, fresh.spark_micro) == (
        tally.accepted,
        tally.work_units,
        tally.spark_micro,
    )
    journal.close()


class _NoRenders:
    """Nothing renders here: only the metrics wiring is under test."""

    name = "none"
    supports_loras = False


async def test_earnings_appear_on_the_scrape(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    receipt = _receipt(86_400)
    _record(journal, receipt)
    journal.mark_acked(receipt.job_id, True)
    worker: Any = metered(["sogni-tiny-sd"])(_NoRenders(), 1)
    async with trio.open_nursery() as nursery:
        view = NodeView("peer", WORKER, worker, lambda: 1, 1)
        view = observe(view, nursery, journal, earnings_interval=0.05)
        assert view.registry is not None
        with trio.fail_after(10):
            while True:
                families = {
                    f.name: f
                    for f in text_string_to_metric_families(generate_latest(view.registry).decode())
                }
                if families["sogni_node_receipts_accepted"].samples[0].value == 1:
                    break
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    [units] = families["sogni_node_earned_work_units"].samples
    [spark] = families["sogni_node_earned_spark"].samples
    assert (units.value, spark.value, units.labels, spark.labels) == (86_400, 2.0, {}, {})
    journal.close()
