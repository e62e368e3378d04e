"""The node's SQLite journal: offers, receipts, acks, hand-backs; durable across reopen."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from sogni_node.journal import INLINE_MAX, SCHEMA_VERSION, Journal, JournalError
from sogni_protocol.messages import JobOffer, Receipt, RenderMeta

COORD = "0x" + "c0" * 20
WORKER = "0x" + "a1" * 20


def offer(n: int) -> JobOffer:
    return JobOffer(
        job_id=bytes([n]) * 32,
        coordinator=COORD,
        model_id="sogni-tiny-sd",
        params_hash=b"\x07" * 32,
        steps=4,
        width=64,
        height=64,
        seed=n,
        work_units=1000 + n,
        deadline=2_000_000_000,
    )


def receipt(n: int, completed_at: int = 1_700_000_000) -> Receipt:
    return Receipt(
        job_id=bytes([n]) * 32,
        offer_hash=b"\x0f" * 32,
        worker=WORKER,
        coordinator=COORD,
        model_id="sogni-tiny-sd",
        result_hash=bytes([n + 100]) * 32,
        steps_done=4,
        work_units=1000 + n,
        completed_at=completed_at + n,
    )


SIG = b"\x01" * 65


def test_roundtrip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node" / "journal.db"
    meta = RenderMeta(backend="diffusers", device="cpu", dtype="float32", threads=2)
    with Journal(path) as j:
        o = offer(1)
        j.record_offer(
            o.job_id, o.coordinator, o.model_id, b"\x0f" * 32, o.work_units, o.deadline,
            msgspec.json.encode(o),
        )  # fmt: skip
        j.record_receipt(receipt(1), SIG, b"\x09" * 32, chain_id=5, verifying_contract=COORD,
                         meta=meta)  # fmt: skip
        j.record_signed_offer(offer(2), b"\x0e" * 32, b"\x02" * 65)
        j.record_receipt(receipt(2), SIG)
        assert j.mark_acked(offer(1).job_id, True)
        assert j.mark_acked(offer(2).job_id, False, "bad result")
        j.record_offer(offer(3).job_id, COORD, "sogni-tiny-sd", b"\x0d" * 32, 5, 6)
        assert j.mark_handed_back(offer(3).job_id, 2, "node shutting down")
    with Journal(path) as j:  # everything survives a reopen
        rs = j.receipts()
        assert [r.receipt for r in rs] == [receipt(1), receipt(2)]
        first = rs[0]
        assert first.signature == SIG and first.image_sha256 == b"\x09" * 32
        assert (first.chain_id, first.verifying_contract, first.meta) == (5, COORD, meta)
        assert first.accepted is True
        assert rs[1].accepted is False and rs[1].ack_reason == "bad result"
        assert rs[1].image_sha256 == receipt(2).result_hash  # defaults to the result hash
        assert j.offer(offer(1).job_id) == offer(1)
        assert j.offer(offer(3).job_id) is None  # recorded without its JSON
        assert j.counts() == {
            "offers": 3,
            "receipts": 2,
            "accepted": 1,
            "rejected": 1,
            "unacked": 0,
            "handed_back": 1,
            "work_units_accepted": 1001,
        }


def test_unacked_and_filters(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        for n in (1, 2, 3):
            j.record_receipt(receipt(n), SIG)
        j.mark_acked(bytes([2]) * 32, True)
        assert [r.receipt.job_id[0] for r in j.unacked()] == [1, 3]
        assert len(j.receipts(coordinator=COORD.upper().replace("0X", "0x"))) == 3
        assert j.receipts(coordinator="0x" + "00" * 20) == []
        assert [r.receipt.job_id[0] for r in j.receipts(since=1_700_000_002)] == [2, 3]


def test_acks_in_one_batch(tmp_path: Path) -> None:
    """A session journals the acks that arrived together in one commit; an ack naming no
    receipt (another node's job, a forged id) changes nothing and is not counted."""
    with Journal(tmp_path / "j.db") as j:
        for n in (1, 2, 3):
            j.record_receipt(receipt(n), SIG)
        acks = [
            (bytes([1]) * 32, True, ""),
            (bytes([9]) * 32, True, ""),
            (bytes([3]) * 32, False, "image check failed"),
        ]
        assert j.mark_acked_many(acks) == 2
        assert j.mark_acked_many([]) == 0
        by_id = {r.receipt.job_id[0]: r for r in j.receipts()}
        assert by_id[1].accepted is True
        assert by_id[2].accepted is None  # not in the batch: still un-acked, resent later
        assert by_id[3].accepted is False and by_id[3].ack_reason == "image check failed"
        assert [r.receipt.job_id[0] for r in j.unacked()] == [2]


def test_receipt_is_idempotent_but_never_replaced(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.record_receipt(receipt(1), SIG)
        j.record_receipt(receipt(1), SIG)  # retry after a crash: no-op
        with pytest.raises(JournalError, match="already has a different receipt"):
            j.record_receipt(receipt(1), b"\x02" * 65)
        assert j.counts()["receipts"] == 1


def test_unknown_jobs(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        assert j.mark_acked(b"\x00" * 32, True) is False
        assert j.mark_handed_back(b"\x00" * 32, 0, "x") is False


def test_prompts_cannot_be_journalled(tmp_path: Path) -> None:
    smuggled = b'{"jobId": "AA==", "params": {"positivePrompt": "SENTINEL"}}'
    with Journal(tmp_path / "j.db") as j, pytest.raises(JournalError, match="not a JobOffer"):
        j.record_offer(b"\x01" * 32, COORD, "m", b"\x00" * 32, 1, 1, smuggled)
    assert b"SENTINEL" not in (tmp_path / "j.db").read_bytes()


def test_reoffer_resets_hand_back(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.record_signed_offer(offer(1), b"\x0f" * 32, SIG)
        j.mark_handed_back(offer(1).job_id, 1, "failed")
        j.record_signed_offer(offer(1), b"\x0e" * 32, SIG)
        assert j.counts()["handed_back"] == 0 and j.counts()["offers"] == 1


def test_pragmas_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    newer = SCHEMA_VERSION + 1
    with pytest.raises(
        JournalError,
        match=f"schema version {newer}, newer than this node's {SCHEMA_VERSION}; upgrade",
    ):
        Journal(path)


def test_a_version_1_journal_migrates_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sogni_node.journal import _MIGRATIONS
    from sogni_protocol.migrations import migrate

    path = tmp_path / "j.db"  # a journal as sogni-node wrote it before migrations existed
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, _MIGRATIONS[:1], what="v1 journal")  # migration 1 is that schema, verbatim
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    r = receipt(1)
    db.execute(
        "INSERT INTO receipts (job_id, offer_hash, worker, coordinator, model_id, result_hash,"
        " steps_done, work_units, completed_at, signature, image_sha256, recorded_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1.0)",
        (r.job_id, r.offer_hash, r.worker, r.coordinator, r.model_id, r.result_hash,
         r.steps_done, r.work_units, r.completed_at, SIG, r.result_hash),
    )  # fmt: skip
    db.close()

    from sogni_protocol import eip712

    monkeypatch.setattr(eip712, "DOMAIN_VERSION", "2")  # receipts signed from now on
    with Journal(path) as j:
        assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        [old] = j.receipts()
        assert old.receipt == r and old.signature == SIG
        assert old.domain_version == "1"  # everything before the migration was signed so
        j.record_receipt(receipt(2), SIG)
        assert [x.domain_version for x in j.receipts()] == ["1", "2"]
    with Journal(path) as j:  # reopening an up-to-date journal changes nothing
        assert len(j.receipts()) == 2


def test_migrations_are_ordered_and_atomic(tmp_path: Path) -> None:
    from sogni_protocol.migrations import Migration, migrate, split_statements

    assert split_statements("CREATE TABLE a (x TEXT DEFAULT ';'); ;\nSELECT 1") == [
        "CREATE TABLE a (x TEXT DEFAULT ';');",
        "SELECT 1;",
    ]
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    one = Migration(1, "a", "CREATE TABLE a (x INTEGER); INSERT INTO a VALUES (1)")

    def fail(conn: sqlite3.Connection) -> None:
        raise RuntimeError("half-way")

    two = Migration(2, "b", "CREATE TABLE b (y INTEGER)", apply=fail)
    with pytest.raises(ValueError, match=r"numbered 1\.\.n"):
        migrate(db, [two], what="db")
    with pytest.raises(RuntimeError, match="half-way"):
        migrate(db, [one, two], what="db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # nothing of it stayed
    assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    assert migrate(db, [one], what="db") == 0
    assert migrate(db, [one], what="db") == 1
    assert db.execute("SELECT x FROM a").fetchall() == [(1,)]


def test_synchronous_full(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_usable_from_trio_worker_threads(tmp_path: Path) -> None:
    import trio

    with Journal(tmp_path / "j.db") as j:
        async with trio.open_nursery() as nursery:
            for n in range(1, 9):
                nursery.start_soon(trio.to_thread.run_sync, j.record_receipt, receipt(n), SIG)
        assert j.counts()["receipts"] == 8


PNG = b"\x89PNG\r\n\x1a\n"


def rendered(n: int, image: bytes) -> Receipt:
    """`receipt(n)` for a real image: its resultHash is the image's sha256."""
    return msgspec.structs.replace(receipt(n), result_hash=hashlib.sha256(image).digest())


INLINE_OR_FILE = pytest.mark.parametrize("inline", [True, False], ids=["row", "file"])


def journal(tmp_path: Path, inline: bool) -> Journal:
    """Kept images as journal rows (the default for small images) or as files."""
    return Journal(tmp_path / "j.db", tmp_path / "results", inline_max=1 << 20 if inline else 0)


@INLINE_OR_FILE
def test_a_kept_result_stays_until_acked_and_never_changes_image(
    tmp_path: Path, inline: bool
) -> None:
    image = PNG + b"one"
    job = bytes([1]) * 32
    with journal(tmp_path, inline) as j:
        j.keep_result(rendered(1, image), SIG, image)
        assert j.kept_results() == {job}
        if inline:
            assert not (tmp_path / "results").exists()
        else:
            [path] = (tmp_path / "results").iterdir()
            assert path.name == f"{job.hex()}.png" and path.stat().st_mode & 0o777 == 0o600
        j.keep_result(rendered(1, image), SIG, image)  # a retry: no-op
        with pytest.raises(JournalError, match="already has a different receipt"):
            j.keep_result(rendered(1, PNG + b"two"), b"\x02" * 65, PNG + b"two")
        with pytest.raises(JournalError, match="resultHash is not the image's"):
            j.keep_result(rendered(2, image), SIG, PNG + b"other")
        kept = j.stored_result(job)
        assert kept is not None and kept.image == image and kept.entry.accepted is None

        assert j.resign(job, b"\x0e" * 32, b"\x03" * 65)  # a new offer, same image
        kept = j.stored_result(job)
        assert kept is not None and kept.image == image
        assert (kept.entry.receipt.offer_hash, kept.entry.signature) == (b"\x0e" * 32, b"\x03" * 65)
        assert kept.entry.receipt.result_hash == hashlib.sha256(image).digest()
        payee = "0x" + "ab" * 20  # signed now with a payout, under this version: both kept
        assert j.resign(job, b"\x0f" * 32, b"\x04" * 65, payout=payee, domain_version="4")
        kept = j.stored_result(job)
        assert kept is not None and kept.entry.receipt.payout == payee
        assert (kept.entry.domain_version, kept.entry.receipt.offer_hash) == ("4", b"\x0f" * 32)

        assert j.mark_acked(job, True)
        assert j.kept_results() == set()
        assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())
        assert not j.resign(job, b"\x0d" * 32, SIG)  # acked: never re-signed
        assert j.stored_result(bytes([2]) * 32) is None


def test_small_images_are_rows_and_large_ones_files(tmp_path: Path) -> None:
    small, large = PNG + b"s", PNG + bytes(100)
    with Journal(tmp_path / "j.db", tmp_path / "results", inline_max=len(small)) as j:
        j.keep_result(rendered(1, small), SIG, small)
        j.keep_result(rendered(2, large), SIG, large)
        assert [p.name for p in (tmp_path / "results").iterdir()] == [
            f"{(bytes([2]) * 32).hex()}.png"
        ]
        assert j.kept_results() == {bytes([1]) * 32, bytes([2]) * 32}
        for n, image in ((1, small), (2, large)):
            kept = j.stored_result(bytes([n]) * 32)
            assert kept is not None and kept.image == image
    with Journal(tmp_path / "j.db", tmp_path / "results") as j:  # reopened: both still there
        assert {n: j.stored_result(bytes([n]) * 32).image for n in (1, 2)} == {1: small, 2: large}  # type: ignore[union-attr]


@INLINE_OR_FILE
def test_a_lost_or_changed_image_is_reported_not_sent(tmp_path: Path, inline: bool) -> None:
    image = PNG + b"one"
    with journal(tmp_path, inline) as j:
        j.keep_result(rendered(1, image), SIG, image)
        if inline:
            j._db.execute("UPDATE kept_images SET image = ?", (PNG + b"bit rot",))
        else:
            [path] = (tmp_path / "results").iterdir()
            path.write_bytes(PNG + b"bit rot")
        kept = j.stored_result(bytes([1]) * 32)
        assert kept is not None and kept.image is None


def test_results_are_next_to_the_journal_by_default(tmp_path: Path) -> None:
    large = PNG + bytes(INLINE_MAX)
    with Journal(tmp_path / "j.db") as j:
        j.keep_result(rendered(1, large), SIG, large)
        assert [p.stem for p in (tmp_path / "results").iterdir()] == [(bytes([1]) * 32).hex()]


@INLINE_OR_FILE
def test_a_refused_receipt_is_replaced_by_the_next_render(tmp_path: Path, inline: bool) -> None:
    with journal(tmp_path, inline) as j:
        j.keep_result(rendered(1, PNG + b"a"), SIG, PNG + b"a")
        j.mark_acked(bytes([1]) * 32, False, "bad image")  # the refused image is dropped
        assert j.kept_results() == set()
        j.keep_result(rendered(1, PNG + b"b"), b"\x02" * 65, PNG + b"b")
        kept = j.stored_result(bytes([1]) * 32)
        assert kept is not None and kept.image == PNG + b"b" and kept.entry.accepted is None
        assert j.counts()["receipts"] == 1


@INLINE_OR_FILE
def test_prune_keeps_only_recent_unacked_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    with journal(tmp_path, inline) as j:
        for n in (1, 2, 3):
            j.keep_result(rendered(n, PNG + bytes([n])), SIG, PNG + bytes([n]))
        j.mark_acked(bytes([2]) * 32, True)
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / "orphan.png").write_bytes(PNG)  # a crash before its receipt
        assert j.prune_results(max_age=3600) == 1
        assert j.kept_results() == {bytes([1]) * 32, bytes([3]) * 32}
        monkeypatch.setattr(time, "time", lambda: 2e10)  # much later: nobody re-offered them
        assert j.prune_results(max_age=3600) == 2
        assert j.kept_results() == set() and list((tmp_path / "results").iterdir()) == []


def test_a_prune_while_the_node_runs_spares_a_result_being_written(tmp_path: Path) -> None:
    """The daemon now prunes every hour, not only at start: a render's image file exists a
    moment before its receipt commits, and must not be taken for a crash's leftover."""
    with journal(tmp_path, False) as j:
        results = tmp_path / "results"
        results.mkdir(exist_ok=True)
        writing = results / f"{(bytes([7]) * 32).hex()}.png"
        writing.write_bytes(PNG)  # its receipt is about to commit
        old = results / "leftover.png"
        old.write_bytes(PNG)
        os.utime(old, (1.0, 1.0))  # a crash's leftover, long ago
        assert j.prune_results(max_age=3600, unknown_after=3600) == 1
        assert writing.exists() and not old.exists()
        j.keep_result(rendered(7, PNG), SIG, PNG)  # the receipt commits: kept until its ack
        assert j.prune_results(max_age=3600, unknown_after=3600) == 0
        assert j.unacked(since=time.time() + 60) == [] and len(j.unacked()) == 1


def test_the_payout_address_is_journalled_with_the_receipt(tmp_path: Path) -> None:
    """A v4 receipt comes back from the journal exactly as signed, payout included, so a
    re-sent result and the rewards audit verify without the node's current config."""
    payout = "0x" + "b2" * 20
    with Journal(tmp_path / "j.db") as j:
        j.record_receipt(msgspec.structs.replace(receipt(3), payout=payout), SIG)
        j.record_receipt(receipt(4), SIG)
    with Journal(tmp_path / "j.db") as j:
        by_job = {r.receipt.job_id[0]: r.receipt for r in j.receipts()}
    assert by_job[3].payout == payout and by_job[4].payout is None


def test_a_void_never_overwrites_an_acceptance(tmp_path: Path) -> None:
    """A result re-signed for another coordinator key voided the old receipt
    unconditionally: an acceptance journaled a moment before was overwritten as refused,
    and a second receipt signed for the same job."""
    with journal(tmp_path, False) as j:
        job = bytes([1]) * 32
        j.keep_result(rendered(1, PNG + b"a"), SIG, PNG + b"a")
        assert j.mark_acked(job, True)  # the old key's coordinator accepted it meanwhile
        assert not j.void(job, "void: re-signed")
        kept = j.stored_result(job)
        assert kept is not None and kept.entry.accepted is True
        other = bytes([2]) * 32
        j.keep_result(rendered(2, PNG + b"b"), SIG, PNG + b"b")
        assert j.void(other, "void: re-signed") and j.kept_results() == set()
        gone = j.stored_result(other)
        assert gone is not None and gone.entry.accepted is False
