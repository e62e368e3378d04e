"""Receipts that name a payout address (EIP-712 version "4"): the worker's amount goes to the
payout account, the take tier is that account's stake, and every way of cheating with it is
refused by the settler or caught by the audit of the published files."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from sogni_coordinator.store import Store
from sogni_protocol.epoch_audit import audit_folder
from sogni_protocol.epoch_files import decode_batch
from sogni_protocol.payout_rules import SOGNI

from . import forge
from .settle_env import (
    PAYER,
    Net,
    rules,
    settler,
    signed_receipt,
    store_receipts,
    worker,
)

WORKER_SHARE = 65  # % at tier 0: take 30 %, creator share 5 %
EPHEMERAL, PAYOUT, PLAIN, FORGER = worker(11), worker(12), worker(13), worker(14)


def _stake(net: Net, amount: int) -> None:
    """PAYOUT stakes `amount` (its own wallet, not the container's key)."""
    net.chain.send_eth(PAYOUT.address, 10**18, sender=net.treasury)
    net.d.token.transfer(PAYOUT.address, amount, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, amount, sender=PAYOUT)
    net.d.staking.stake(amount, sender=PAYOUT)


def test_the_payout_account_is_paid_at_its_own_stake_tier_and_claims(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _stake(net, 10_000 * SOGNI)  # tier 2: 20 % take
    store_receipts(
        store,
        [
            signed_receipt(EPHEMERAL, net.domain, payout=PAYOUT.address),
            signed_receipt(PLAIN, net.domain),
        ],
    )
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None and result.paid_receipts == 2
    assert result.payouts == {
        PAYOUT.address: SOGNI * 75 // 100,  # at the payout account's tier
        PLAIN.address: SOGNI * WORKER_SHARE // 100,
    }
    batch = decode_batch(result.receipts_file.read_bytes())
    assert batch.format == "sogni-receipts-v5"
    by_worker = {e.worker: e for e in batch.receipts}
    assert by_worker[EPHEMERAL.address].payout == PAYOUT.address
    assert by_worker[EPHEMERAL.address].take_bps == 2000
    assert by_worker[PLAIN.address].payout is None
    assert set(batch.stakes) == {PAYOUT.address, PLAIN.address}  # the signing key has none
    assert audit_folder(tmp_path / "epochs").ok

    claim = next(
        c for c in _claims(store) if c["account"] == PAYOUT.address
    )  # anyone may send it: the tokens go to the account
    before = net.d.token.balance_of(PAYOUT.address)
    net.d.distributor.claim(
        PAYOUT.address, int(claim["cumulativeAmount"]), claim["proof"], sender=net.treasury
    )
    assert net.d.token.balance_of(PAYOUT.address) - before == SOGNI * 75 // 100
    assert net.d.token.balance_of(EPHEMERAL.address) == 0
    assert all(c["account"] != EPHEMERAL.address for c in _claims(store))


def _claims(store: Store) -> list[dict[str, str]]:
    from sogni_coordinator.settlement.epochs import epoch_claims

    record = store.epoch_record(1)
    assert record is not None
    claims: list[dict[str, str]] = epoch_claims(record)["claims"]
    return claims


def test_receipts_of_the_version_before_payouts_still_settle_to_their_worker(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """A v3 receipt (and its v3 offer), stored before the upgrade, is paid and audits."""
    store_receipts(store, [signed_receipt(PLAIN, net.domain, version="3")])
    result = settler(store, net, tmp_path).close_epoch()
    assert result is not None
    assert result.payouts == {PLAIN.address: SOGNI * WORKER_SHARE // 100}
    assert audit_folder(tmp_path / "epochs").ok


def test_a_payout_changed_after_signing_is_never_paid(
    net: Net, store: Store, tmp_path: Path
) -> None:
    honest = signed_receipt(EPHEMERAL, net.domain, payout=PAYOUT.address)
    stolen = honest._replace(receipt=msgspec.structs.replace(honest.receipt, payout=FORGER.address))
    also_stolen = signed_receipt(PLAIN, net.domain)
    unnamed = also_stolen._replace(
        receipt=msgspec.structs.replace(also_stolen.receipt, payout=FORGER.address)
    )
    store_receipts(store, [stolen, unnamed])
    assert settler(store, net, tmp_path).close_epoch() is None  # nothing payable
    for r in (stolen, unnamed):
        settled = store.receipt_settlement(r.receipt.job_id)
        assert settled is not None and settled[1] == "refused"
        assert "signature is not the worker's" in settled[2]


@pytest.mark.parametrize("as_payout", [True, False])
def test_a_payer_is_never_paid_its_own_free_spark(
    net: Net, store: Store, tmp_path: Path, as_payout: bool
) -> None:
    """Self-dealing: a worker naming the payer as payout (or the payer's own node) would turn
    the Daily Boost emission into SOGNI for the payer; refused. Paid Spark is not."""
    from .settle_env import PAYER_KEY

    key = EPHEMERAL if as_payout else PAYER_KEY
    payout = PAYER if as_payout else None
    free = signed_receipt(key, net.domain, payout=payout)
    paid = signed_receipt(key, net.domain, payout=payout)
    store_receipts(store, [free], paid="free")
    store_receipts(store, [paid], paid="spark")
    result = settler(store, net, tmp_path, rules=rules(free_emission_sogni=1000)).close_epoch()
    assert result is not None and result.paid_receipts == 1
    assert result.payouts == {PAYER: SOGNI * WORKER_SHARE // 100}  # the paid one only
    settled = store.receipt_settlement(free.receipt.job_id)
    assert settled is not None and settled[1] == "refused" and "self-dealing" in settled[2]


def test_the_audit_catches_a_forged_payout_and_a_take_by_the_wrong_stake(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _stake(net, 10_000 * SOGNI)
    store_receipts(store, [signed_receipt(EPHEMERAL, net.domain, payout=PAYOUT.address)])
    assert settler(store, net, tmp_path).close_epoch() is not None
    clean = tmp_path / "epochs"
    assert audit_folder(clean).ok

    def forged(name: str, **changes: object) -> str:
        folder = Path(shutil.copytree(clean, tmp_path / name))
        batch = forge.batch_of(folder, 1)
        entry = forge.replace(batch.receipts[0], **changes)
        forge.publish_batch(folder, 1, forge.replace(batch, receipts=[entry]))
        report = audit_folder(folder)
        assert not report.ok and report.first_problem is not None
        return report.first_problem

    # the coordinator redirects the pay to itself, every file rebuilt consistently
    assert "not signed by its worker" in forged("redirected", payout=FORGER.address)
    # it drops the payout address: the worker's signing key is paid (and stranded)
    assert "not signed by its worker" in forged("dropped", payout=None)
    # it reads the (empty) stake of the signing key instead of the payout account's
    batch = forge.batch_of(clean, 1)
    cheaper = forge.revalue(batch, batch.receipts[0], take_bps=3000)
    folder = Path(shutil.copytree(clean, tmp_path / "tier"))
    forge.publish_batch(folder, 1, forge.replace(batch, receipts=[cheaper]))
    problem = audit_folder(folder).first_problem or ""
    assert "the payee's stake tier gives 2000" in problem
