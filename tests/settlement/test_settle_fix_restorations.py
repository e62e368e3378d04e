"""A won dispute's restored pay is paid once per case and only for a case its worker won:
the folder audit refuses a case restored twice (in a batch or across epochs) or spelled
another way; with a Disputes contract the chain check refuses a case that is unknown, a
slash, or not won; and a node's own audit counts its restored pay in its leaf."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eth_utils import to_checksum_address

from sogni_chain.disputes import Case, CaseState
from sogni_coordinator.audit_cli import check_chain
from sogni_coordinator.disputes import DisputeBook, Restorations
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_node.rewards import audit, load_published
from sogni_protocol.epoch_audit import audit_folder, iter_published

from . import forge
from .settle_env import Net, settler, signed_receipt, store_receipts, won_case, worker

SPARK = 43_200
CASE = b"\x0c" * 32
CASE_HEX = "0x" + CASE.hex()


def _won(net: Net, store: Store, tmp: Path) -> tuple[Settler, str]:
    """A settler owing one won dispute (1 Spark) to worker 1, and worker 1's address."""
    book = DisputeBook(store.path)
    honest = worker(1).address
    won_case(book, honest, CASE, SPARK)
    s = settler(store, net, tmp)
    s.restorations = Restorations(book)
    return s, honest


def _closed(net: Net, store: Store, tmp: Path) -> tuple[Settler, str, Path]:
    s, honest = _won(net, store, tmp)
    store_receipts(store, [signed_receipt(worker(2), net.domain, work_units=SPARK)])
    assert s.close_epoch() is not None
    folder = tmp / "epochs"
    assert audit_folder(folder).ok
    return s, honest, folder


def test_a_case_restored_twice_in_one_batch_is_refused(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _s, _honest, folder = _closed(net, store, tmp_path)
    batch = forge.batch_of(folder, 1)
    (restored,) = batch.restorations
    forge.publish_batch(folder, 1, forge.replace(batch, restorations=[restored, restored]))
    report = audit_folder(folder)
    assert report.first_problem is not None
    assert f"case {CASE_HEX} is restored twice in this batch" in report.first_problem


def test_a_case_restored_again_in_a_later_epoch_is_refused(
    net: Net, store: Store, tmp_path: Path
) -> None:
    s, honest, folder = _closed(net, store, tmp_path)
    store_receipts(store, [signed_receipt(worker(2), net.domain, work_units=SPARK)])
    assert s.close_epoch() is not None
    assert audit_folder(folder).ok
    (restored,) = forge.batch_of(folder, 1).restorations
    two = forge.batch_of(folder, 2)
    stakes = {**two.stakes, honest: forge.batch_of(folder, 1).stakes[honest]}
    forge.publish_batch(folder, 2, forge.replace(two, restorations=[restored], stakes=stakes))
    report = audit_folder(folder)
    assert report.epochs[0].problem is None
    assert report.first_problem is not None and report.first_problem.startswith("epoch 2: ")
    assert f"case {CASE_HEX} was already restored in epoch 1" in report.first_problem


def test_a_case_id_in_another_spelling_is_refused(net: Net, store: Store, tmp_path: Path) -> None:
    _s, _honest, folder = _closed(net, store, tmp_path)
    batch = forge.batch_of(folder, 1)
    (restored,) = batch.restorations
    upper = forge.replace(restored, case_id="0x" + CASE.hex().upper())
    forge.publish_batch(folder, 1, forge.replace(batch, restorations=[restored, upper]))
    problem = audit_folder(folder).first_problem
    assert problem is not None and "is not 0x and 64 lower-case hex digits" in problem


@dataclass
class _Disputes:
    """A Disputes contract's `caseOf`, as the chain check reads it."""

    cases: dict[bytes, Case] = field(default_factory=dict)
    address: str = to_checksum_address("0x" + "d1" * 20)

    def case(self, case_id: bytes) -> Case:
        none = _case(case_id, "0x" + "00" * 20, "none", CaseState.NONE)
        return self.cases.get(case_id, none)


def _case(case_id: bytes, who: str, kind: str, state: CaseState) -> Case:
    return Case(case_id, to_checksum_address(who), kind, state, *([0] * 5), b"", b"", *([0] * 5))


@dataclass
class _Contracts:
    distributor: object
    staking: object
    disputes: _Disputes | None


def test_the_chain_check_reads_each_restored_case_on_disputes(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _s, honest, folder = _closed(net, store, tmp_path)
    audited = list(iter_published(folder))
    d = net.d

    def check(cases: dict[bytes, Case] | None) -> tuple[list[str], list[str], int]:
        disputes = None if cases is None else _Disputes(cases)
        result = check_chain(audited, _Contracts(d.distributor, d.staking, disputes))  # type: ignore[arg-type]
        return result.problems, result.notes, result.cases

    won = _case(CASE, honest, "refusal", CaseState.WORKER_WON)
    assert check({CASE: won}) == ([], [], 1)
    problems, _notes, _n = check({})  # an invented case id
    assert len(problems) == 1 and "it is no case on Disputes" in problems[0]
    assert f"restoration of case {CASE_HEX} pays {honest}" in problems[0]
    lost = _case(CASE, honest, "refusal", CaseState.WORKER_LOST)
    problems, _notes, _n = check({CASE: lost})
    assert len(problems) == 1 and "the case is worker lost" in problems[0]
    voting = _case(CASE, honest, "refusal", CaseState.VOTING)
    assert "not won by its worker" in check({CASE: voting})[0][0]
    slash = _case(CASE, honest, "slash", CaseState.WORKER_WON)
    assert "a slash case" in check({CASE: slash})[0][0]
    # won by another worker, with nothing published tying the payee to it: a note
    other = _case(CASE, worker(3).address, "refusal", CaseState.WORKER_WON)
    problems, notes, _n = check({CASE: other})
    assert problems == [] and any("cannot tie them" in n for n in notes)
    # no Disputes contract named: said, not silently passed
    problems, notes, n = check(None)
    assert problems == [] and n == 0 and any("restorations (won disputes) not" in x for x in notes)


def test_a_nodes_own_audit_counts_its_restored_pay(net: Net, store: Store, tmp_path: Path) -> None:
    s, honest, folder = _closed(net, store, tmp_path)
    store_receipts(store, [signed_receipt(worker(2), net.domain, work_units=SPARK)])
    assert s.close_epoch() is not None  # the epoch after the won dispute, too
    batch = forge.batch_of(folder, 1)
    (restored,) = batch.restorations
    report = audit(honest, [], load_published(folder))
    assert report.ok, report.problems
    amount = int(restored.amount)
    assert restored.payee == honest and amount > 0
    assert [(e.epoch, e.earned, e.cumulative) for e in report.epochs] == [
        (1, amount, amount),
        (2, 0, amount),
    ]
