"""The journal's per-job write path: one call per new offer, fsyncs only where something is
sent, every commit durable within `SYNC_INTERVAL` (docs/ARCHITECTURE.md, "The node's journal
write path"). Real SQLite and files in a temporary folder."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import msgspec
import pytest
import trio

from sogni_node.daemon import _sync_journal
from sogni_node.journal import Journal
from sogni_protocol.messages import Receipt
from tests.node_parts.test_node_journal import SIG, offer, receipt

PNG = b"\x89PNG\r\n\x1a\n"
OFFER_HASH = b"\x0a" * 32


def rendered(n: int, image: bytes) -> Receipt:
    return msgspec.structs.replace(receipt(n), result_hash=hashlib.sha256(image).digest())


def offer_hash_of(path: Path, job_id: bytes) -> bytes | None:
    """What another connection reads (a committed row, whatever its fsync)."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT offer_hash FROM offers WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else bytes(row[0])


def test_take_offer_records_a_new_offer_and_answers_a_kept_one(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        first = offer(1)
        assert j.take_offer(first, OFFER_HASH, SIG) is None  # new: recorded, render it
        assert j.offer(first.job_id) == first
        assert offer_hash_of(tmp_path / "j.db", first.job_id) == OFFER_HASH

        image = PNG + b"one"
        j.keep_result(rendered(1, image), SIG, image)
        again = msgspec.structs.replace(first, deadline=first.deadline + 60)
        kept = j.take_offer(again, b"\x0b" * 32, b"\x02" * 65)  # a re-offer: the kept result
        assert kept is not None and kept.image == image and kept.entry.accepted is None
        assert offer_hash_of(tmp_path / "j.db", first.job_id) == OFFER_HASH  # not overwritten

        j.mark_acked(first.job_id, False, "bad image")  # refused: the next offer renders
        assert j.take_offer(again, b"\x0b" * 32, b"\x02" * 65) is None
        assert offer_hash_of(tmp_path / "j.db", first.job_id) == b"\x0b" * 32


def test_only_what_is_sent_waits_for_a_fsync(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        assert not j.sync()  # nothing pending
        j.take_offer(offer(1), OFFER_HASH, SIG)
        j.record_signed_offer(offer(2), OFFER_HASH, SIG)
        assert j.unsynced == 2  # committed, not yet fsync'd
        image = PNG + b"one"
        j.keep_result(rendered(1, image), SIG, image)
        assert j.unsynced == 0  # the receipt's fsync'd commit covers the offers before it
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        j.mark_acked(offer(1).job_id, True)
        assert j.unsynced == 1 and j.counts()["accepted"] == 1
        assert j.sync() and j.unsynced == 0 and not j.sync()


def test_a_leftover_file_without_a_receipt_is_replaced(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    stem = (bytes([1]) * 32).hex()
    (results / f"{stem}.png").write_bytes(b"torn")  # a crash while writing, no receipt
    (results / f"{stem}.jpg").write_bytes(b"older")  # a crash before an earlier receipt
    image = PNG + b"one"
    with Journal(tmp_path / "j.db", results, inline_max=0) as j:  # images as files
        j.keep_result(rendered(1, image), SIG, image)
        [path] = results.iterdir()
        assert path.name == f"{stem}.png" and path.read_bytes() == image
        assert path.stat().st_mode & 0o777 == 0o600
        kept = j.stored_result(bytes([1]) * 32)
        assert kept is not None and kept.image == image
        j.mark_acked(bytes([1]) * 32, True)
        assert list(results.iterdir()) == []


def test_an_image_kept_as_a_row_costs_one_fsync_and_outlives_leftover_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    stem = (bytes([1]) * 32).hex()
    (results / f"{stem}.png").write_bytes(b"torn")  # a crash while writing an earlier file
    image = PNG + b"one"
    with Journal(tmp_path / "j.db", results) as j:
        fsyncs: list[int] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
        j.keep_result(rendered(1, image), SIG, image)
        assert fsyncs == []  # no file, no folder: only SQLite's own fsync of the commit
        assert j.unsynced == 0 and (results / f"{stem}.png").read_bytes() == b"torn"
        kept = j.stored_result(bytes([1]) * 32)
        assert kept is not None and kept.image == image  # the row, not the torn file
        j.mark_acked(bytes([1]) * 32, True)
        assert j.kept_results() == {bytes([1]) * 32}  # the torn file: prune's job
        assert j.prune_results(max_age=3600) == 1 and j.kept_results() == set()


async def test_the_daemon_syncs_within_the_interval(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.take_offer(offer(1), OFFER_HASH, SIG)
        assert j.unsynced == 1
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sync_journal, j, 0.05)
                while j.unsynced:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
