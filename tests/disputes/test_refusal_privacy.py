"""A signed refusal keeps the job's parameters (the prompt too: a dispute's re-checks re-run
its steps) sealed, and only until no re-check can need them. They were plain msgpack in the
coordinator's database, kept forever and copied into every backup."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sogni_coordinator.disputes import DisputeBook, RefusalRecord
from sogni_protocol.messages import JobParams, Receipt

PROMPT = "a private prompt"


def _record(case: bytes, refused_at: int) -> RefusalRecord:
    receipt = Receipt(
        job_id=case,
        offer_hash=b"\x02" * 32,
        worker="0x" + "11" * 20,
        coordinator="0x" + "22" * 20,
        model_id="sogni-test",
        result_hash=b"\x03" * 32,
        steps_done=4,
        work_units=100,
        completed_at=1,
    )
    params = JobParams(
        model_id="sogni-test",
        positive_prompt=PROMPT,
        steps=4,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )
    worker = receipt.worker
    return RefusalRecord(
        case, case, worker, worker, receipt, params, "float32", "r", b"\x01" * 32, refused_at, b"s"
    )


def _raw(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT params FROM dispute_refusals")]


def test_a_refusals_prompt_is_sealed_and_forgotten_once_undisputed(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    book = DisputeBook(db)
    old, new = b"\x0a" * 32, b"\x0b" * 32
    book.add(_record(old, refused_at=1_000))
    book.add(_record(new, refused_at=5_000))
    assert all(PROMPT.encode() not in raw for raw in _raw(db))
    found = book.by_case(old)
    assert found is not None and found.params is not None
    assert found.params.positive_prompt == PROMPT
    assert book.shred(undisputed_before=2_000) == 1  # its dispute window closed undisputed
    gone, kept = book.by_case(old), book.by_case(new)
    assert gone is not None and gone.params is None and gone.reason == "r"  # the rest stays
    assert kept is not None and kept.params is not None
    assert book.shred(new) == 1 and book.shred(new) == 0  # e.g. its vote opened
    assert _raw(db) == [b"", b""]
    book.close()


def test_rows_written_in_plain_text_are_sealed_when_the_book_opens(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    book = DisputeBook(db)
    book.add(_record(b"\x0a" * 32, refused_at=1_000))
    book.close()
    import msgspec

    plain = msgspec.msgpack.encode(_record(b"\x0a" * 32, 1_000).params)
    with sqlite3.connect(db) as conn:  # as a coordinator before this change wrote it
        conn.execute("UPDATE dispute_refusals SET params=?, params_key=NULL", (plain,))
    assert PROMPT.encode() in _raw(db)[0]
    book = DisputeBook(db)
    assert PROMPT.encode() not in _raw(db)[0]
    found = book.by_case(b"\x0a" * 32)
    assert found is not None and found.params is not None
    assert found.params.positive_prompt == PROMPT
    book.close()


def test_an_older_row_whose_vote_opened_is_forgotten_not_sealed(tmp_path: Path) -> None:
    """Sealing kept the key in the same row: an older case already voted on (nothing will
    re-check it) kept its prompt readable for good."""
    import msgspec

    db = tmp_path / "coordinator.db"
    book = DisputeBook(db)
    book.add(_record(b"\x0a" * 32, refused_at=1_000))
    book.set_bundle(b"\x0a" * 32, b"\x01" * 32, "bundle.json")
    book.close()
    plain = msgspec.msgpack.encode(_record(b"\x0a" * 32, 1_000).params)
    with sqlite3.connect(db) as conn:  # as a coordinator before this change wrote it
        conn.execute("UPDATE dispute_refusals SET params=?, params_key=NULL", (plain,))
    book = DisputeBook(db)
    assert _raw(db) == [b""]
    found = book.by_case(b"\x0a" * 32)
    assert found is not None and found.params is None
    book.close()
