"""`epoch audit`: a published epochs folder recomputed from its files (and the chain).

A clean two-epoch folder (staked and unstaked workers, a creator share, Spark, SOGNI and a
partial job paid, a receipt nobody paid refused) is built once on the embedded chain; every
forgery edits a copy of it, as consistently as a coordinator holding its own keys could, and
must be named. The chain checks (roots, receipts hashes, totals, stake snapshots) run on the
embedded chain directly and through the CLI with `--chain-url` on anvil (skipped without it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from typer.testing import CliRunner

from sogni_chain import connect
from sogni_coordinator.audit_cli import check_chain
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_protocol.epoch_audit import (
    AuditReport,
    PublishedFolderError,
    audit_folder,
    iter_published,
)
from sogni_protocol.epoch_files import encode
from sogni_protocol.payout_rules import SOGNI

from . import forge
from .settle_env import MODEL, Net, make_net, rules, settler, signed_receipt, store_receipts, worker

SPARK = 43_200  # work units of one Spark
STAKED, PLAIN, CREATOR = worker(1), worker(2), worker(9)
RULES = rules(model_creators={MODEL: CREATOR.address}, creator_share_bps=1000)
runner = CliRunner()


def _stake(net: Net, who: LocalAccount, amount: int) -> None:
    net.chain.send_eth(who.address, 10**18, sender=net.treasury)
    net.d.token.transfer(who.address, amount, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, amount, sender=who)
    net.d.staking.stake(amount, sender=who)


def publish_two_epochs(net: Net, store: Store, tmp: Path) -> tuple[Settler, Path]:
    """Two honest epochs on `net`; returns the settler and the publish folder."""
    _stake(net, STAKED, 10_000 * SOGNI)  # tier 2: 20% take instead of 30%
    s = settler(store, net, tmp, rules=RULES)
    d = net.domain
    store_receipts(
        store,
        [
            signed_receipt(STAKED, d),
            signed_receipt(STAKED, d, work_units=2 * SPARK),
            signed_receipt(PLAIN, d),
        ],
    )
    store_receipts(store, [signed_receipt(PLAIN, d)], paid="none")  # refused: nobody paid
    assert s.close_epoch() is not None
    store_receipts(store, [signed_receipt(STAKED, d)], paid="sogni")
    store_receipts(store, [signed_receipt(PLAIN, d, steps_done=4)])  # cancelled halfway
    second = s.close_epoch()
    assert second is not None and second.epoch == 2
    return s, tmp / "epochs"


@dataclass
class Clean:
    net: Net
    folder: Path


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, _nets: dict[str, Net]) -> Iterator[Clean]:
    """The clean folder, built once; the embedded chain keeps its roots for the module."""
    if "embedded" not in _nets:
        _nets["embedded"] = make_net("embedded", connect())
    net = _nets["embedded"]
    snap = net.chain.snapshot()
    tmp = tmp_path_factory.mktemp("audit")
    store = Store(tmp / "coordinator.db")
    try:
        _, folder = publish_two_epochs(net, store, tmp)
        yield Clean(net, folder)
    finally:
        store.close()
        net.chain.revert(snap)


@pytest.fixture
def copy(clean: Clean, tmp_path: Path) -> Path:
    """A copy of the clean folder to forge."""
    return Path(shutil.copytree(clean.folder, tmp_path / "epochs"))


def _audit_cli(folder: Path, *extra: str, code: int) -> dict[str, object]:
    result = runner.invoke(
        coordinator_app, ["epoch", "audit", "--published", str(folder), "--json", *extra]
    )
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    out: dict[str, object] = json.loads(result.stdout)
    return out


def _first(report: AuditReport) -> str:
    assert not report.ok and report.first_problem is not None
    return report.first_problem


# --- clean ----------------------------------------------------------------------------------
def test_clean_folder_recomputes(clean: Clean) -> None:
    report = audit_folder(clean.folder)
    assert report.ok, report.problems
    assert [(e.epoch, e.receipts, e.problem) for e in report.epochs] == [(1, 3, None), (2, 2, None)]
    two = forge.epoch_file(clean.folder, 2)
    assert report.epochs[1].total == int(two.total) and report.epochs[1].root == two.root
    assert {a for a, _ in two.leaves} == {STAKED.address, PLAIN.address, CREATOR.address}
    assert len(forge.batch_of(clean.folder, 1).refused) == 1  # a refusal is no problem
    assert audit_folder(clean.folder, through=1).epochs[-1].epoch == 1

    out = _audit_cli(clean.folder, code=0)
    assert out["ok"] is True and out["firstProblem"] is None and out["chain"] is None
    assert [e["epoch"] for e in out["epochs"]] == [1, 2]  # type: ignore[attr-defined]
    table = runner.invoke(coordinator_app, ["epoch", "audit", "--published", str(clean.folder)])
    assert table.exit_code == 0 and "audit ok: 2 epochs" in table.stdout

    # against the chain the roots were posted on: roots, hashes, totals and stakes agree
    chain = check_chain(list(iter_published(clean.folder)), clean.net.d)
    assert chain.ok, chain.problems
    assert (chain.epochs, chain.stakes) == (2, 4)


def test_unreadable_folder_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PublishedFolderError, match="does not exist"):
        audit_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishedFolderError, match="no epoch files"):
        audit_folder(tmp_path / "empty")
    result = runner.invoke(
        coordinator_app, ["epoch", "audit", "--published", str(tmp_path / "nowhere")]
    )
    assert result.exit_code == 4 and "does not exist" in result.output
    assert "Traceback" not in result.output


# --- forgeries ------------------------------------------------------------------------------
def test_receipts_file_edited_in_place(copy: Path) -> None:
    path = copy / forge.epoch_file(copy, 2).receipts_file
    batch = forge.batch_of(copy, 2)
    e = batch.receipts[0]
    richer = forge.replace(e, worker_amount=str(int(e.worker_amount) + SOGNI))
    path.write_bytes(encode(forge.replace(batch, receipts=[richer, *batch.receipts[1:]])))
    problem = _first(audit_folder(copy))
    assert problem.startswith(f"epoch 2: receipts file receipts/{path.name}: its bytes hash to")
    out = _audit_cli(copy, code=3)
    assert out["ok"] is False and out["firstProblem"] == problem


def test_consistent_forgery_of_a_worker_amount(clean: Clean, copy: Path) -> None:
    batch = forge.batch_of(copy, 2)
    i = next(i for i, e in enumerate(batch.receipts) if e.worker == PLAIN.address)
    e = batch.receipts[i]
    receipts = list(batch.receipts)
    receipts[i] = forge.replace(e, worker_amount=str(int(e.worker_amount) + SOGNI))
    forge.publish_batch(copy, 2, forge.replace(batch, receipts=receipts))
    forged = forge.epoch_file(copy, 2)
    assert forged.receipts_hash != forge.epoch_file(clean.folder, 2).receipts_hash
    assert int(forged.total) == int(forge.epoch_file(clean.folder, 2).total) + SOGNI

    problem = _first(audit_folder(copy))
    assert problem.startswith(f"epoch 2: receipts file {forged.receipts_file}: job {e.job_id}: ")
    assert "paid/free/worker/creator amounts are" in problem
    assert _audit_cli(copy, code=3)["firstProblem"] == problem
    # and the chain never saw that root
    chain = check_chain(list(iter_published(copy)), clean.net.d)
    assert chain.problems == [
        f"epoch 2: epoch-000002.json: root is {forged.root}, the distributor's rootOf(2) is "
        f"{forge.epoch_file(clean.folder, 2).root}"
    ]


def test_total_not_the_sum_of_the_leaves(copy: Path) -> None:
    ef = forge.epoch_file(copy, 2)
    forge.write_epoch(copy, forge.replace(ef, total=str(int(ef.total) + 1)))
    assert _first(audit_folder(copy)) == (
        f"epoch 2: epoch-000002.json: total is {int(ef.total) + 1}, the leaves sum to {ef.total}"
    )
    _audit_cli(copy, code=3)


IMPOSTOR = Account.from_key(keccak(b"not the payer"))


@pytest.mark.parametrize(
    ("evidence", "why"),
    [
        ("none", "no payer authorization is published for this job"),
        ("impostor", "the payer authorization is not signed by the payer"),
        ("other request", "the job id is not derived from the authorized request"),
        ("other network", "the payer authorized network 'elsewhere'"),
    ],
)
def test_unpaid_receipt_included(clean: Clean, copy: Path, evidence: str, why: str) -> None:
    """A real receipt (the worker signed it, answering a coordinator-signed offer) that no
    payer's authorization pays for, added with every amount, hash and root made consistent."""
    domain = clean.net.domain
    if evidence == "other request":  # job id made up: not derived from the request signed
        signed = signed_receipt(PLAIN, domain, job_id=keccak(b"a job nobody asked for"))
    else:
        signed = signed_receipt(PLAIN, domain)
    auth = {
        "none": None,
        "impostor": forge.signed_by(IMPOSTOR, domain, signed) if evidence == "impostor" else None,
        "other request": forge.authorization_of(signed),
        "other network": forge.replace(forge.authorization_of(signed), network_id="elsewhere"),
    }[evidence]
    batch = forge.batch_of(copy, 2)
    added = forge.entry_for(batch, signed, payer=signed.request.payer or "", authorization=auth)
    receipts = sorted([*batch.receipts, added], key=lambda e: e.job_id)
    forge.publish_batch(copy, 2, forge.replace(batch, receipts=receipts))

    problem = _first(audit_folder(copy))
    rfile = forge.epoch_file(copy, 2).receipts_file
    assert problem.startswith(f"epoch 2: receipts file {rfile}: job {added.job_id}: {why}")
    if evidence == "none":
        assert _audit_cli(copy, code=3)["firstProblem"] == problem


def test_take_rate_lowered_against_the_stake_snapshot(copy: Path) -> None:
    batch = forge.batch_of(copy, 2)
    i = next(i for i, e in enumerate(batch.receipts) if e.worker == PLAIN.address)
    receipts = list(batch.receipts)
    receipts[i] = forge.revalue(batch, receipts[i], take_bps=2000)  # amounts consistent
    forge.publish_batch(copy, 2, forge.replace(batch, receipts=receipts))
    problem = _first(audit_folder(copy))
    assert problem == (
        f"epoch 2: receipts file {forge.epoch_file(copy, 2).receipts_file}: job "
        f"{receipts[i].job_id}: take rate is 2000 bps, the payee's stake tier gives 3000"
    )
    _audit_cli(copy, code=3)


def test_stakes_edited_to_justify_the_take_rate_need_the_chain(clean: Clean, copy: Path) -> None:
    """Stakes and take rate edited together: the files agree with themselves; only the
    staking contract (and the root the distributor holds) can tell."""
    batch = forge.batch_of(copy, 2)
    stakes = {**batch.stakes, PLAIN.address: str(10_000 * SOGNI)}
    batch = forge.replace(batch, stakes=stakes)
    receipts = [forge.revalue(batch, e) for e in batch.receipts]
    assert {e.take_bps for e in receipts if e.worker == PLAIN.address} == {2000}
    forge.publish_batch(copy, 2, forge.replace(batch, receipts=receipts))
    assert audit_folder(copy).ok  # consistent: files alone cannot tell
    chain = check_chain(list(iter_published(copy)), clean.net.d)
    assert len(chain.problems) == 1 and "rootOf(2)" in chain.problems[0]


@pytest.mark.parametrize("spelling", [str.upper, lambda j: j[2:], lambda j: "0X" + j[2:]])
def test_one_receipt_spelled_twice_is_not_paid_twice(copy: Path, spelling: Any) -> None:
    """The same signed receipt again, its job id written another way (`AB..`, no `0x`,
    `0X`): every spelling parses to the same signed bytes, so it passed the paid-twice
    checks and doubled the worker's pay. One spelling is accepted: 0x and lower-case hex."""
    batch = forge.batch_of(copy, 1)
    first = batch.receipts[0]
    twin = forge.replace(first, job_id=spelling(first.job_id))
    assert twin.receipt() == first.receipt()  # the same signed receipt
    forge.publish_batch(copy, 1, forge.replace(batch, receipts=[*batch.receipts, twin]))
    assert "is not 0x and 64 lower-case hex digits" in _first(audit_folder(copy))


def test_a_lone_far_epoch_is_a_gap_not_a_walk(copy: Path) -> None:
    """A hostile coordinator's folder (or index) naming epoch 10^11 alone: the audit walked
    every number up to it, one problem each, uncancellable in its thread (minutes, then out
    of memory). It stops at the first missing epoch; the node refuses such an index."""
    from sogni_node.epoch_fetch import _entry_problem
    from sogni_protocol.epoch_files import epoch_filename
    from sogni_protocol.relay_messages import EpochSummary

    far = 100_000_000_000
    (copy / "epoch-000002.json").rename(copy / epoch_filename(far))
    (copy / "epoch-000001.json").unlink()
    report = audit_folder(copy)  # at once
    assert [a.epoch for a in report.epochs] == [1]
    assert "epoch-000001.json is missing" in _first(report)
    entry = EpochSummary(
        epoch=far, root="0x" + "11" * 32, total="1", receipts_hash="0x" + "22" * 32,
        file=epoch_filename(far), digest="0x" + "33" * 32,
        receipts_file="receipts/0x" + "22" * 32 + ".json",
    )  # fmt: skip
    assert "listed after epoch 0" in (_entry_problem(entry, 0) or "")


@pytest.mark.parametrize("kind", ["missing epoch", "paid twice", "tree dump", "previous total"])
def test_other_inconsistencies(copy: Path, kind: str) -> None:
    if kind == "missing epoch":
        (copy / "epoch-000001.json").unlink()
        want = "epoch 1: epoch-000001.json is missing"
    elif kind == "paid twice":  # epoch 1's first receipt paid again in epoch 2
        again = forge.batch_of(copy, 1).receipts[0]
        batch = forge.batch_of(copy, 2)
        receipts = sorted([*batch.receipts, again], key=lambda e: e.job_id)
        forge.publish_batch(copy, 2, forge.replace(batch, receipts=receipts))
        want = f"job {again.job_id} was already paid in epoch 1"
    elif kind == "tree dump":
        one = forge.epoch_file(copy, 1)
        (copy / "epoch-000002.tree.json").write_bytes(
            (copy / "epoch-000001.tree.json").read_bytes()
        )
        assert one.root != forge.epoch_file(copy, 2).root
        want = "epoch 2: epoch-000002.tree.json is not the tree of the epoch file's leaves"
    else:
        ef = forge.epoch_file(copy, 2)
        forge.write_epoch(copy, forge.replace(ef, previous_total="0"))
        want = "epoch 2: epoch-000002.json: previousTotal is 0, epoch 1's total is"
    assert want in _first(audit_folder(copy))


# --- the chain: a coordinator that lies about stakes, and posts what it lied ----------------
def _inflated(s: Settler, who: str, stake: int) -> None:
    real = s._stake_snapshot

    def lying(workers: set[str]) -> tuple[int | None, dict[str, int]]:
        block, stakes = real(workers)
        return block, {w: (stake if w == who else v) for w, v in stakes.items()}

    s._stake_snapshot = lying  # type: ignore[method-assign]


@pytest.fixture(params=["embedded", "anvil"])
def chain_net(request: pytest.FixtureRequest, _nets: dict[str, Net]) -> Iterator[Net]:
    """Embedded: a chain of its own (the module's keeps the clean folder's roots); anvil: the
    session's, reverted after the test (skipped when anvil is not installed)."""
    if request.param == "embedded":
        yield make_net("embedded", connect())
        return
    node = request.getfixturevalue("_anvil")
    if "anvil" not in _nets:
        _nets["anvil"] = make_net("anvil", connect(node.url))
    net = _nets["anvil"]
    snap = net.chain.snapshot()
    try:
        yield net
    finally:
        net.chain.revert(snap)


def test_stake_snapshot_checked_on_chain(chain_net: Net, store: Store, tmp_path: Path) -> None:
    """Epoch 3 is settled with a worker's stake inflated (a lower take rate) and its root
    posted: the files are consistent, the distributor agrees, the staking contract does not.
    On anvil the same goes through the CLI with --chain-url and with a config."""
    net = chain_net
    s, folder = publish_two_epochs(net, store, tmp_path)
    url = net.chain.url if net.kind == "anvil" else None
    if url is not None:
        out = _audit_cli(folder, "--chain-url", url, code=0)
        assert out["chain"] == {
            "ok": True,
            "epochs": 2,
            "stakes": 4,
            "cases": 0,
            "problems": [],
            "notes": [],
        }

    _inflated(s, PLAIN.address, 10_000 * SOGNI)
    store_receipts(store, [signed_receipt(PLAIN, net.domain)])
    assert s.close_epoch() is not None
    assert audit_folder(folder).ok  # the files cannot tell
    check = check_chain(list(iter_published(folder)), net.d)
    three = forge.batch_of(folder, 3)
    assert check.problems == [
        f"epoch 3: receipts file {forge.epoch_file(folder, 3).receipts_file}: worker "
        f"{PLAIN.address}: stake at block {three.stake_block} is {10_000 * SOGNI} in the batch, "
        "0 on chain (its take rate rests on it)"
    ]
    if url is None:
        return
    out = _audit_cli(folder, "--chain-url", url, code=3)
    assert out["firstProblem"] == check.problems[0] and out["ok"] is False
    # with the coordinator's config: its addresses file and chain_url
    addresses = tmp_path / "addresses.json"
    net.d.addresses.save(addresses)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\naddresses_file = "{addresses}"\nchain_url = "{url}"\n'
        'log_level = "error"\n'
    )
    assert _audit_cli(folder, "--config", str(cfg), code=3)["firstProblem"] == check.problems[0]
    # nothing answering: unavailable, one line
    down = runner.invoke(
        coordinator_app,
        ["epoch", "audit", "--published", str(folder), "--chain-url", "http://127.0.0.1:9"],
    )
    assert down.exit_code == 4 and "Traceback" not in down.output
