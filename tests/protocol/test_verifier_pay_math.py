"""Verifier pay arithmetic (`epoch_math.verifier_pay` / `verifiers_of`) and the batch formats
that carry it: paid from the take, pro rata when capped, never to the worker itself."""

from __future__ import annotations

import msgspec
import pytest
from eth_utils import to_checksum_address

from sogni_protocol import epoch_math
from sogni_protocol.epoch_files import (
    ReceiptsBatch,
    VerifierPay,
    decode_batch,
    decode_epoch,
    encode,
)
from sogni_protocol.payout_rules import SOGNI, PayoutRules

WORKER = to_checksum_address("0x" + "11" * 20)
A = to_checksum_address("0x" + "aa" * 20)
B = to_checksum_address("0x" + "bb" * 20)


def _amounts(pays: list[VerifierPay]) -> list[tuple[str, int, int]]:
    return [(p.account, p.steps, int(p.amount)) for p in pays]


def test_each_step_is_worth_value_over_steps_within_the_take() -> None:
    # 1 SOGNI job of 8 steps, take 30%: a step is worth 0.125
    pays = epoch_math.verifier_pay(SOGNI, 3 * SOGNI // 10, 8, [(A, 1), (B, 1)])
    assert _amounts(pays) == [(A, 1, SOGNI // 8), (B, 1, SOGNI // 8)]


def test_over_the_take_is_scaled_pro_rata_and_never_exceeds_it() -> None:
    take = 3 * SOGNI // 10
    pays = epoch_math.verifier_pay(SOGNI, take, 8, [(A, 2), (B, 1)])  # owed 0.375 > 0.3
    assert _amounts(pays) == [(A, 2, 2 * SOGNI // 10), (B, 1, SOGNI // 10)]
    odd = epoch_math.verifier_pay(1001, 7, 3, [(A, 1), (B, 2)])  # rounding down, deterministic
    assert sum(int(p.amount) for p in odd) <= 7
    assert _amounts(odd) == _amounts(epoch_math.verifier_pay(1001, 7, 3, [(A, 1), (B, 2)]))
    assert epoch_math.verifier_pay(SOGNI, 0, 8, [(A, 8)])[0].amount == "0"  # no take, no pay


def test_verifiers_of_drops_the_worker_merges_caps_and_sorts() -> None:
    work = [(B.lower(), 3), (WORKER.lower(), 4), (A.lower(), 1), (A.lower(), 20)]
    pays = epoch_math.verifiers_of(work, worker=WORKER, value=SOGNI, take=SOGNI, job_steps=8)
    assert [(p.account, p.steps) for p in pays] == [(A, 8), (B, 3)]  # A capped at the job's 8
    assert epoch_math.verifiers_of([], worker=WORKER, value=SOGNI, take=SOGNI, job_steps=8) == []
    with pytest.raises(ValueError):
        epoch_math.verifier_pay(SOGNI, SOGNI, 0, [(A, 1)])


def test_verifiers_of_never_pays_the_payer_of_free_work_for_checking_it() -> None:
    work = [(A.lower(), 2), (B.lower(), 1)]
    free = epoch_math.verifiers_of(
        work, worker=WORKER, value=SOGNI, take=SOGNI, job_steps=8, free_payer=A.lower()
    )
    assert [p.account for p in free] == [B]  # A paid with the Daily Boost: no pay from it
    paid = epoch_math.verifiers_of(work, worker=WORKER, value=SOGNI, take=SOGNI, job_steps=8)
    assert [p.account for p in paid] == [A, B]


def _batch(fmt: str) -> bytes:
    rules = PayoutRules(
        wei_per_spark=SOGNI, stake_tiers_sogni=[0], take_rates_bps=[3000], creator_share_bps=0
    )
    batch = ReceiptsBatch(
        format=fmt,
        epoch=1,
        chain_id=1337,
        verifying_contract=A,
        network_id="n",
        rules=rules,
        stake_block=None,
        stakes={},
        free_requested="0",
        receipts=[],
    )
    return encode(batch)


def test_the_format_before_verifier_pay_still_reads() -> None:
    """(A v3 batch that lists verifiers is refused: tests/settlement/test_verifier_pay.py.)"""
    assert decode_batch(_batch("sogni-receipts-v4")).format == "sogni-receipts-v4"
    assert decode_batch(_batch("sogni-receipts-v3")).receipts == []
    with pytest.raises(ValueError, match="unknown receipts batch format"):
        decode_batch(_batch("sogni-receipts-v2"))
    epoch = msgspec.json.decode(_batch("x"))  # an epoch file's fields, enough to decode
    epoch.update(
        {
            "distributor": A,
            "root": "0x",
            "total": "0",
            "receiptsHash": "0x",
            "receiptsFile": "r",
            "closedAt": 0,
            "previousTotal": "0",
            "payouts": [],
            "leaves": [],
        }
    )
    for fmt in ("sogni-epoch-v3", "sogni-epoch-v2"):
        assert decode_epoch(msgspec.json.encode({**epoch, "format": fmt})).format == fmt
    with pytest.raises(ValueError, match="unknown epoch file format"):
        decode_epoch(msgspec.json.encode({**epoch, "format": "sogni-epoch-v1"}))
