"""The dispute window: a receipt enters an epoch only once `[verification] dispute_window`
seconds have passed since it was stored; off a local network, with verification on, the
window must be at least an hour."""

from __future__ import annotations

from pathlib import Path

import pytest

from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_protocol.epoch_files import decode_batch

from .settle_env import Net, settler, signed_receipt, store_receipts, stored_at, worker

WINDOW = 3600.0


def test_a_receipt_waits_out_its_window_then_enters_the_next_epoch(
    net: Net, store: Store, tmp_path: Path
) -> None:
    now = [0.0]
    s = settler(store, net, tmp_path, dispute_window=WINDOW, clock=lambda: now[0])
    early, late = signed_receipt(worker(1), net.domain), signed_receipt(worker(2), net.domain)
    store_receipts(store, [early])
    t_early = stored_at(store, early.receipt.job_id)
    now[0] = t_early + 10
    assert s.close_epoch() is None  # inside its window: nothing to pay yet

    store_receipts(store, [late])
    t_late = stored_at(store, late.receipt.job_id)
    assert t_late > t_early
    now[0] = WINDOW + (t_early + t_late) / 2  # the early window closed, the late one not
    first = s.close_epoch()
    assert first is not None and first.paid_receipts == 1
    jobs = [e.job_id for e in decode_batch(first.receipts_file.read_bytes()).receipts]
    assert jobs == ["0x" + early.receipt.job_id.hex()]

    now[0] = t_late + WINDOW + 1
    second = s.close_epoch()
    assert second is not None and second.epoch == 2 and second.paid_receipts == 1
    jobs = [e.job_id for e in decode_batch(second.receipts_file.read_bytes()).receipts]
    assert jobs == ["0x" + late.receipt.job_id.hex()]


def test_off_a_local_network_checks_need_an_hour_to_dispute(tmp_path: Path) -> None:
    live = {"data_dir": tmp_path, "chain_id": 8453, "billing": "required"}
    checked = VerificationConfig(rate=0.1)
    short = VerificationConfig(rate=0.1, dispute_window=60.0)
    hour = VerificationConfig(rate=0.1, dispute_window=WINDOW)
    with pytest.raises(ValueError, match=r"verification\.dispute_window = 60 s .* at least 3600"):
        CoordinatorConfig(**live, verification=short)  # type: ignore[arg-type]
    CoordinatorConfig(**live, verification=hour)  # type: ignore[arg-type]
    CoordinatorConfig(**live)  # type: ignore[arg-type]  # verification off: no window needed
    CoordinatorConfig(data_dir=tmp_path, verification=checked)  # a local network: any window

    # from a file, the error is one line naming the key
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'data_dir = "{tmp_path}"\nchain_id = 8453\nbilling = "required"\n'
        "[verification]\nfirst_jobs = 5\n"
    )
    with pytest.raises(ValueError) as err:
        load_coordinator_config(path, env={})
    assert "verification.dispute_window" in str(err.value) and "\n" not in str(err.value)
