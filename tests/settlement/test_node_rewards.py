"""The node's side: audit published epochs against its journal, then claim."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from sogni_coordinator.store import Store
from sogni_node.journal import Journal
from sogni_node.rewards import (
    PublicationError,
    audit,
    claim,
    format_sogni,
    load_published,
    parse_sogni,
)
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    content_hash,
    decode_batch,
    decode_epoch,
    encode,
    epoch_filename,
    receipts_filename,
)

from .settle_env import Net, settler, signed_receipt, store_receipts, worker


def _journal(tmp_path: Path, net: Net, receipts: list, accepted: bool = True) -> Journal:  # type: ignore[type-arg]
    journal = Journal(tmp_path / "journal.db")
    for receipt, signature, *_ in receipts:
        journal.record_receipt(
            receipt,
            signature,
            chain_id=net.domain.chain_id,
            verifying_contract=net.domain.verifying_contract,
        )
        journal.mark_acked(receipt.job_id, accepted)
    return journal


def test_audit_verifies_every_receipt_and_leaf_then_claims(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me, other = worker(1), worker(2)
    mine = [signed_receipt(me, net.domain) for _ in range(2)]
    store_receipts(store, [*mine, signed_receipt(other, net.domain)])
    s = settler(store, net, tmp_path)
    assert s.close_epoch() is not None
    later = signed_receipt(me, net.domain, work_units=2 * 43_200)
    store_receipts(store, [later])
    assert s.close_epoch() is not None
    epochs = load_published(tmp_path / "epochs")
    assert [e.epoch for e in epochs] == [1, 2]

    with _journal(tmp_path, net, [*mine, later]) as journal:
        report = audit(me.address, journal.receipts(), epochs, distributor=net.d.distributor)
    assert report.ok, report.problems
    assert report.verified == 3 and report.pending == []
    assert [(e.epoch, e.receipts, e.onchain) for e in report.epochs] == [
        (1, 2, True),
        (2, 1, True),
    ]
    per_spark = 650_000_000_000_000_000
    assert [e.earned for e in report.epochs] == [2 * per_spark, 2 * per_spark]
    assert report.earned == 4 * per_spark and report.claimed == 0
    assert report.claimable == 4 * per_spark

    net.chain.send_eth(me.address, 10**17, sender=net.treasury)
    assert claim(net.d.distributor, me, epochs) == 4 * per_spark
    assert claim(net.d.distributor, me, epochs) == 0  # nothing left: no transaction
    with Journal(tmp_path / "journal.db") as journal:
        after = audit(me.address, journal.receipts(), epochs, distributor=net.d.distributor)
    assert after.claimed == after.earned and after.claimable == 0
    assert after.as_json()["epochs"][1]["claimed"] is True


def test_missing_receipt_is_a_problem_and_a_recent_one_pending(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    settled, withheld = signed_receipt(me, net.domain), signed_receipt(me, net.domain)
    store_receipts(store, [settled])  # the coordinator never settles `withheld`
    assert settler(store, net, tmp_path).close_epoch() is not None
    epochs = load_published(tmp_path / "epochs")
    with _journal(tmp_path, net, [settled, withheld]) as journal:
        fresh = audit(me.address, journal.receipts(), epochs)
        assert fresh.ok and fresh.pending == ["0x" + withheld[0].job_id.hex()]
        # the same journal, judged after an epoch that closed an hour later
        late = settler(store, net, tmp_path / "late", clock=lambda: time.time() + 3600)
        store_receipts(store, [signed_receipt(worker(2), net.domain)])
        assert late.close_epoch() is not None
        later_epochs = load_published(tmp_path / "late" / "epochs")
        report = audit(me.address, journal.receipts(), later_epochs)
    assert any("missing from every batch" in p for p in report.problems)


def test_free_work_is_listed_unpaid_not_a_problem(net: Net, store: Store, tmp_path: Path) -> None:
    """A render nobody paid for is refused at settlement ("no payer"): the node's audit lists
    it as unpaid free work and stays ok (a newcomer's first free render is not an error)."""
    me = worker(1)
    paid, free = signed_receipt(me, net.domain), signed_receipt(me, net.domain)
    store_receipts(store, [paid])
    store_receipts(store, [free], paid="none")
    assert settler(store, net, tmp_path).close_epoch() is not None
    epochs = load_published(tmp_path / "epochs")
    with _journal(tmp_path, net, [paid, free]) as journal:
        report = audit(me.address, journal.receipts(), epochs)
    assert report.ok, report.problems
    assert report.verified == 1 and report.unpaid == ["0x" + free[0].job_id.hex()]
    assert report.as_json()["unpaidReceipts"] == report.unpaid


def test_tampered_batch_file_is_rejected(net: Net, store: Store, tmp_path: Path) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    raw = result.receipts_file.read_bytes()
    result.receipts_file.write_bytes(raw.replace(b'"workUnits":43200', b'"workUnits":43201'))
    with pytest.raises(PublicationError, match="does not hash to its name"):
        load_published(tmp_path / "epochs")


def test_underpaying_split_is_caught_even_with_a_consistent_batch(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """A coordinator that publishes a self-consistent but wrong batch is caught by the node."""
    me = worker(1)
    mine = signed_receipt(me, net.domain)
    store_receipts(store, [mine])
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    epochs_dir = tmp_path / "epochs"
    batch = decode_batch(result.receipts_file.read_bytes())
    cheated = msgspec.structs.replace(
        batch,
        receipts=[msgspec.structs.replace(batch.receipts[0], worker_amount="1")],
    )
    data = encode(cheated)
    digest = content_hash(data)
    (epochs_dir / "receipts" / receipts_filename(digest)).write_bytes(data)
    ef = decode_epoch(result.epoch_file.read_bytes())
    fake = msgspec.structs.replace(ef, receipts_hash="0x" + digest.hex())
    (epochs_dir / epoch_filename(1)).write_bytes(encode(fake))

    epochs = load_published(epochs_dir)
    with _journal(tmp_path, net, [mine]) as journal:
        report = audit(me.address, journal.receipts(), epochs, distributor=net.d.distributor)
    problems = " | ".join(report.problems)
    assert "amounts are" in problems
    assert "leaf is" in problems  # the tree pays more than the batch admits: inconsistent
    assert "differ on chain" in problems  # and the batch is not the one whose hash is posted


def test_receipts_for_other_domains_or_rejected_are_ignored(
    net: Net, store: Store, tmp_path: Path
) -> None:
    me = worker(1)
    good = signed_receipt(me, net.domain)
    store_receipts(store, [good])
    assert settler(store, net, tmp_path).close_epoch() is not None
    epochs = load_published(tmp_path / "epochs")
    journal = Journal(tmp_path / "journal.db")
    with journal:
        other = signed_receipt(me, Domain(1, net.domain.verifying_contract))
        journal.record_receipt(
            *other[:2], chain_id=1, verifying_contract=net.domain.verifying_contract
        )
        rejected = signed_receipt(me, net.domain)
        journal.record_receipt(*rejected[:2], chain_id=net.domain.chain_id)
        journal.mark_acked(rejected[0].job_id, False, "bad image")
        journal.record_receipt(*good[:2], chain_id=net.domain.chain_id)
        journal.mark_acked(good[0].job_id, True)
        report = audit(me.address, journal.receipts(), epochs)
    assert report.ok and report.verified == 1 and report.pending == []


def test_sogni_amounts() -> None:
    assert parse_sogni("1") == 10**18 and parse_sogni("0.5") == 5 * 10**17
    assert parse_sogni("0.000000000000000001") == 1
    for bad in ("0", "-1", "abc", "0.0000000000000000001"):
        with pytest.raises(ValueError):
            parse_sogni(bad)
    assert format_sogni(1_500_000_000_000_000_000) == "1.5" and format_sogni(10**18) == "1"
