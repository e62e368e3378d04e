"""Property: 1,000 random operations never create or lose value, nor overdraw a payer."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sogni_app.quote import quote
from sogni_coordinator.ledger import (
    ASSETS,
    ISSUERS,
    BoostAlreadyClaimed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    partial_value,
)

PAYERS = ["0x" + c * 40 for c in "abc"]
WORKERS = ["0x" + c * 40 for c in "123"]
MODELS = ["sdxl-base-1.0", "flux1-schnell-fp8", "sogni-tiny-sd"]

op = st.one_of(
    st.tuples(st.just("boost"), st.sampled_from(PAYERS), st.integers(0, 5)),
    st.tuples(st.just("buy"), st.sampled_from(PAYERS), st.integers(1, 20)),
    st.tuples(st.just("deposit"), st.sampled_from(PAYERS), st.integers(1, 20_000_000)),
    st.tuples(
        st.just("request"),
        st.sampled_from(PAYERS),
        st.integers(1, 16),
        st.sampled_from(["fast", "relaxed"]),
        st.sampled_from(["spark", "sogni"]),
        st.sampled_from(MODELS),
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 50),
        st.sampled_from(WORKERS),
        st.integers(0, 20),
        st.integers(0, 3000),
        st.integers(0, 2000),
    ),
    st.tuples(st.just("fail"), st.integers(0, 50)),  # node failure: job re-queued, no pay
    st.tuples(st.just("refund"), st.integers(0, 50)),
)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(st.lists(op, min_size=1000, max_size=1000))
def test_value_is_conserved(ops: list[tuple[Any, ...]]) -> None:
    ledger = Ledger(":memory:", daily_boost_spark=5)
    issued = dict.fromkeys(ASSETS, 0)
    requests: list[tuple[str, int, int]] = []  # (request id, per-image value, steps)
    jobs = 0
    for o in ops:
        kind = o[0]
        try:
            if kind == "boost":
                issued["spark_free"] += ledger.claim_daily_boost(o[1], 1.7e9 + o[2] * 86_400)
            elif kind == "buy":
                ledger.credit_purchase(o[1], o[2])
                issued["spark_paid"] += o[2] * 1_000_000
            elif kind == "deposit":
                ledger.deposit_sogni(o[1], o[2])
                issued["sogni"] += o[2]
            elif kind == "request":
                _, payer, n, network, token, model = o
                q = quote(model, images=n, network=network, token_type=token, sogni_usd=0.004)
                rid = f"r{len(requests)}"
                res = ledger.reserve(rid, payer, q)
                requests.append((rid, res.per_image, 20))
            elif kind == "settle" and requests:
                _, i, worker, steps_done, take, creator = o
                rid, value, steps = requests[i % len(requests)]
                jobs += 1
                job_id = f"j{jobs // 2}"  # every job id is settled twice: idempotent
                ledger.settle(
                    rid,
                    partial_value(value, steps_done, steps),
                    worker,
                    take,
                    creator,
                    model_id="flux1-schnell-fp8" if creator else "",
                    job_id=job_id,
                )
            elif kind == "refund" and requests:
                ledger.refund(requests[o[1] % len(requests)][0])
        except (InsufficientFunds, BoostAlreadyClaimed):
            pass
        except LedgerError as exc:  # over-settling or a closed request: refused, no effect
            assert "exceeds" in str(exc) or "closed" in str(exc), exc
        totals = ledger.totals()
        assert totals == dict.fromkeys(ASSETS, 0)  # double entry
        balances = ledger.balances()
        for asset in ASSETS:
            held = sum(b[asset] for acc, b in balances.items() if acc not in ISSUERS)
            assert held == issued[asset]  # nothing created or lost
        for acc, b in balances.items():
            if acc not in ISSUERS:
                assert min(b.values()) >= 0, (acc, b)
    for rid, _, _ in requests:
        ledger.refund(rid)
    assert not any(acc.startswith("reserved:") for acc in ledger.balances())
