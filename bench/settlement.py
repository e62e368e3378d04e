"""Settlement costs: gas of postRoot and claim, Merkle build time, receipts verified per second.

- Gas at 1,000 and 100,000 leaves, on the embedded EVM (py-evm, Cancun: the same gas as anvil
  and the compiler target). ``postRoot`` first (epoch 0 -> 1 writes fresh storage) and next
  (median of 3 later epochs); ``claim`` by an address that never held SOGNI (cold: median of 5
  leaves; it pays for the token's new slot, balance and claimed, too), a first claim by an
  address that already holds SOGNI (median of 3), and a worker's repeat claim of a later
  epoch's increment (warm: median of 3).
- Merkle build time (`sogni_protocol.merkle.MerkleTree`) for 100,000 leaves, and 1,000,000 without
  `--quick`.
- Receipts verified per second on one core with `recover_receipt_signer` (the coordinator's
  and the settlement's check), against a floor of 2,000/s.
- One epoch close end to end (verify, split, tree, files, SQLite, postRoot), and the audit
  of its published folder, each against verifying the receipts alone.

Every figure is the median of its runs (gas is deterministic; its median is over different
leaves and epochs). Run: ``.venv/bin/python -m bench.settlement [--quick]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_hash.auto import keccak

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.messages import Receipt

SOGNI = 10**18
VERIFY_FLOOR = 2_000
GAS_GOALS = {"post_first": 70_000, "post_next": 50_000, "claim_cold": 90_000, "claim_warm": 65_000}
"""Issue 16's goals at 100,000 leaves (gas)."""


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _leaves(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [("0x" + rng.randbytes(20).hex(), rng.randrange(1, 10**18)) for _ in range(n)]


# --- gas -----------------------------------------------------------------------------------
def gas(n_leaves: int) -> dict[str, float]:
    """Gas of postRoot (first, next) and claim (cold, warm) with ``n_leaves`` in the tree."""
    from sogni_chain import Deployment, connect, deploy_all

    chain = connect()
    treasury, settler, worker = chain.accounts[0], chain.accounts[1], chain.accounts[2]
    addrs = deploy_all(chain, treasury, coordinator=settler, distributor_funding=10**9 * SOGNI)
    deployment = Deployment(chain, addrs, sender=treasury)
    dist = deployment.distributor
    others = _leaves(n_leaves - 1, n_leaves)
    posts: list[int] = []
    warm: list[int] = []
    cold: list[int] = []
    tree = None
    for epoch in range(1, 5):
        leaves = [(worker.address, epoch * SOGNI), *others]
        tree = MerkleTree(leaves)
        total = sum(v for _, v in leaves)
        posts.append(dist.post_root(epoch, tree.root, total, keccak(bytes([epoch])),
                                    sender=settler).gas_used)  # fmt: skip
        claim = dist.claim(worker.address, *tree.proof_for(worker.address), sender=worker)
        if epoch > 1:
            warm.append(claim.gas_used)
    assert tree is not None
    for i in range(1, 6):  # addresses that never held SOGNI, claimed by a relayer
        account, amount = others[i * (len(others) // 6)]
        cold.append(dist.claim(account, amount, tree.proof_for(account)[1],
                               sender=treasury).gas_used)  # fmt: skip
    holder: list[int] = []
    for i in range(1, 4):  # first claims by addresses that already hold some SOGNI
        account, amount = others[i * (len(others) // 6) + 1]
        deployment.token.transfer(account, 1, sender=treasury)
        holder.append(dist.claim(account, amount, tree.proof_for(account)[1],
                                 sender=treasury).gas_used)  # fmt: skip
    return {
        "post_first": posts[0],
        "claim_first_holder": _median([float(g) for g in holder]),
        "post_next": _median([float(g) for g in posts[1:]]),
        "claim_cold": _median([float(g) for g in cold]),
        "claim_warm": _median([float(g) for g in warm]),
        "proof": len(tree.proof(0)),
    }


def gas_under_delay(n_leaves: int, maturing: int = 23) -> dict[str, float]:
    """A worker's repeat claim under a 1-day claim delay with hourly epochs (production
    defaults, unlike `gas`, which runs with the dev chains' zero delay): with nothing newer
    maturing, and with ``maturing`` newer roots still maturing (the binary search over the
    ring reads more slots)."""
    from sogni_chain import Deployment, connect, deploy_all

    day, hour = 86_400, 3_600
    chain = connect()
    treasury, settler, worker = chain.accounts[0], chain.accounts[1], chain.accounts[2]
    addrs = deploy_all(chain, treasury, coordinator=settler, distributor_funding=10**9 * SOGNI,
                       claim_delay=day)  # fmt: skip
    dist = Deployment(chain, addrs, sender=treasury).distributor
    others = _leaves(n_leaves - 1, n_leaves)
    posted = 0
    out: dict[str, float] = {}
    for run, backlog in enumerate((0, 0, maturing), start=1):
        leaves = [(worker.address, run * SOGNI), *others]
        tree = MerkleTree(leaves)
        total = sum(v for _, v in leaves)
        for _ in range(backlog + 1):  # the root claimed against, then `backlog` newer ones
            posted += 1
            dist.post_root(posted, tree.root, total, keccak(posted.to_bytes(4, "big")),
                           sender=settler)  # fmt: skip
            chain.advance_time(hour)
        chain.advance_time(day - hour * (backlog + 1) + hour // 2)
        assert dist.matured_epoch() == posted - backlog
        claim = dist.claim(worker.address, *tree.proof_for(worker.address), sender=worker)
        if run > 1:
            out[f"claim_warm_delay_{backlog}"] = claim.gas_used
        else:
            out["claim_first_delay"] = claim.gas_used
    return out


@contextmanager
def _opcode_gas(record: Callable[[int, int, str, int], None]) -> Iterator[None]:
    """While inside, call ``record(execution, depth, opcode, gas)`` for every opcode the
    embedded EVM (py-evm, Cancun) runs; ``execution`` changes with each new top-level
    execution (gas estimation runs a transaction several times before it is mined)."""
    from eth.vm.forks.cancun.computation import CancunComputation

    original = CancunComputation.opcodes
    top: dict[str, int] = {"id": 0, "n": 0}

    def counted(fn: Any) -> Any:
        name = str(getattr(fn, "mnemonic", getattr(fn, "__name__", "?")))

        def run(computation: Any) -> Any:
            depth = computation.msg.depth
            if depth == 0 and id(computation) != top["id"]:
                top["id"], top["n"] = id(computation), top["n"] + 1
            before = computation.get_gas_remaining()
            try:
                return fn(computation)
            finally:
                record(top["n"], depth, name, before - computation.get_gas_remaining())

        return run

    CancunComputation.opcodes = {op: counted(fn) for op, fn in original.items()}
    try:
        yield
    finally:
        CancunComputation.opcodes = original


def claim_profile(n_leaves: int) -> dict[str, dict[str, int]]:
    """Where a claim's gas goes, from a per-opcode trace of the mined transaction: cold (an
    address that never held SOGNI, by a relayer) and warm (a worker's repeat claim)."""
    from sogni_chain import Deployment, connect, deploy_all

    chain = connect()
    treasury, settler, worker = chain.accounts[0], chain.accounts[1], chain.accounts[2]
    addrs = deploy_all(chain, treasury, coordinator=settler, distributor_funding=10**9 * SOGNI)
    dist = Deployment(chain, addrs, sender=treasury).distributor
    others = _leaves(n_leaves - 1, n_leaves)
    rows: list[tuple[int, int, str, int]] = []
    out: dict[str, dict[str, int]] = {}

    def traced(what: str, send: Callable[[], Any]) -> None:
        rows.clear()
        with _opcode_gas(lambda n, depth, op, g: rows.append((n, depth, op, g))):
            tx = send()
        last = max(n for n, *_ in rows)  # the mined execution comes after the estimates
        mined = [(d, op, g) for n, d, op, g in rows if n == last]
        data = bytes(chain.w3.eth.get_transaction(tx.hash)["input"])
        calldata = sum(16 if b else 4 for b in data)
        child = sum(g for d, _, g in mined if d == 1)

        def part(depth: int, ops: tuple[str, ...] | None) -> int:
            return sum(g for d, op, g in mined
                       if d == depth and (op in ops if ops else op not in _NAMED))  # fmt: skip

        prof = {
            "base transaction": 21_000,
            "calldata": calldata,
            "distributor: storage reads": part(0, ("SLOAD",)),
            "distributor: storage writes": part(0, ("SSTORE",)),
            "distributor: `Claimed` log": part(0, ("LOG3",)),
            "distributor: execution (proof hashing, checks, ABI)": part(0, None),
            "token: call (cold account)": part(0, ("CALL",)) - child,
            "token: storage reads": part(1, ("SLOAD",)),
            "token: storage writes": part(1, ("SSTORE",)),
            "token: `Transfer` log": part(1, ("LOG3",)),
            "token: execution": part(1, None),
        }
        prof["unattributed"] = tx.gas_used - sum(prof.values())
        prof["total (gasUsed)"] = tx.gas_used
        prof["calldata bytes"] = len(data)  # not gas: shown in the calldata row
        out[what] = prof

    tree = None
    for epoch in (1, 2):
        leaves = [(worker.address, epoch * SOGNI), *others]
        tree = MerkleTree(leaves)
        dist.post_root(epoch, tree.root, sum(v for _, v in leaves), keccak(bytes([epoch])),
                       sender=settler)  # fmt: skip
        if epoch == 1:
            dist.claim(worker.address, *tree.proof_for(worker.address), sender=worker)
    assert tree is not None
    final = tree
    traced("warm", lambda: dist.claim(worker.address, *final.proof_for(worker.address),
                                      sender=worker))  # fmt: skip
    account, amount = others[len(others) // 6]
    traced("cold", lambda: dist.claim(account, amount, final.proof_for(account)[1],
                                      sender=treasury))  # fmt: skip
    return out


_NAMED = ("SLOAD", "SSTORE", "LOG3", "CALL")
"""Opcodes `claim_profile` reports on their own lines (the rest is execution)."""


# --- Merkle build --------------------------------------------------------------------------
def build_seconds(n: int, runs: int) -> list[float]:
    leaves = _leaves(n, n)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        MerkleTree(leaves)
        times.append(time.perf_counter() - start)
    return times


# --- receipt verification ------------------------------------------------------------------
def _signed(n: int, domain: Domain) -> list[tuple[Receipt, bytes]]:
    keys = [Account.from_key(keccak(f"bench worker {i}".encode())) for i in range(16)]
    out = []
    for i in range(n):
        key = keys[i % len(keys)]
        job = keccak(i.to_bytes(8, "big"))
        receipt = Receipt(
            job_id=job,
            offer_hash=keccak(b"o" + job),
            worker=key.address,
            coordinator="0x" + "c0" * 20,
            model_id="sogni-tiny-sd",
            result_hash=keccak(b"r" + job),
            steps_done=20,
            work_units=43_200,
            completed_at=1_700_000_000 + i,
        )
        out.append((receipt, eip712.sign_receipt(key.key, domain, receipt)))
    return out


def verify_rate(n: int, runs: int) -> list[float]:
    """Receipts per second through `recover_receipt_signer` (and the worker comparison)."""
    domain = Domain(31337, "0x" + "d1" * 20)
    signed = _signed(n, domain)
    recover: Callable[[Domain, Receipt, bytes], str] = eip712.recover_receipt_signer
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for receipt, signature in signed:
            if recover(domain, receipt, signature) != receipt.worker:
                raise AssertionError("a receipt did not verify")
        rates.append(n / (time.perf_counter() - start))
    return rates


# --- one close, end to end, and its audit ----------------------------------------------------
def close_and_audit_seconds(n_receipts: int) -> tuple[float, float, float]:
    """Seconds to close an epoch of ``n_receipts`` paid receipts (verify receipt and offer,
    look up each payer settlement, split, tree, files, SQLite, postRoot), to audit the
    published folder from the files alone (also the payer authorizations), and, as the
    baseline, to verify the receipts' signatures only."""
    from sogni_chain import Deployment, connect, deploy_all
    from sogni_coordinator.settlement.epochs import Settler
    from sogni_coordinator.store import Store
    from sogni_devnet.paid_work import signed_receipt, store_receipts, worker
    from sogni_protocol.epoch_audit import audit_folder
    from sogni_protocol.payout_rules import SettlementConfig

    chain = connect()
    treasury, settler = chain.accounts[0], chain.accounts[1]
    addrs = deploy_all(chain, treasury, coordinator=settler, distributor_funding=10**9 * SOGNI)
    d = Deployment(chain, addrs, sender=treasury)
    domain = Domain(addrs.chain_id, addrs.distributor)
    workers = [worker(i) for i in range(16)]
    signed = [signed_receipt(workers[i % 16], domain) for i in range(n_receipts)]
    with tempfile.TemporaryDirectory(prefix="bench-settlement-") as tmp:
        store = Store(Path(tmp) / "c.db")
        store._db.execute("PRAGMA synchronous=OFF")  # set-up only: not what is measured
        store_receipts(store, signed)
        s = Settler(store, d, sender=settler, rules=SettlementConfig().rules(local=True),
                    publish_dir=Path(tmp) / "epochs")  # fmt: skip
        start = time.perf_counter()
        result = s.close_epoch()
        close = time.perf_counter() - start
        store.close()
        start = time.perf_counter()
        report = audit_folder(Path(tmp) / "epochs")
        audit = time.perf_counter() - start
    assert result is not None and result.paid_receipts == n_receipts, result
    assert report.ok, report.first_problem
    start = time.perf_counter()
    for r in signed:
        eip712.recover_receipt_signer(domain, r.receipt, r.signature)
    verify = time.perf_counter() - start
    return close, audit, verify


def _step_row(what: str, seconds: float, n: int, baseline: float) -> str:
    return f"| {what} | {seconds:.2f} | {n / seconds:,.0f} | {seconds / baseline:.1f} |"


def run(quick: bool) -> str:
    """Measure and return the markdown section."""
    return run_with_metrics(quick)[0]


def run_with_metrics(quick: bool) -> tuple[str, dict[str, float | None]]:
    """Measure; return the markdown section and its figures for the JSON line."""
    from bench import _metrics

    small_runs, big_runs = (3, 1) if quick else (5, 3)
    n_verify, verify_runs = (2_000, 3) if quick else (10_000, 5)
    n_close = 2_000 if quick else 20_000
    g = {n: gas(n) for n in (1_000, 100_000)}
    g[100_000].update(gas_under_delay(100_000))
    profile = claim_profile(100_000)
    builds = {100_000: build_seconds(100_000, small_runs)}
    if not quick:  # 15-30 s for one build here: not in the 10-minute `--quick` budget
        builds[1_000_000] = build_seconds(1_000_000, big_runs)
    rates = verify_rate(n_verify, verify_runs)
    close, audit, verify = close_and_audit_seconds(n_close)
    figures = _metrics.from_settlement(g[100_000], builds[100_000], rates)
    text = _markdown(g, builds, rates, n_verify, verify_runs, n_close, close, audit, verify,
                     profile)  # fmt: skip
    return text, figures


def _markdown(
    g: dict[int, dict[str, float]],
    builds: dict[int, list[float]],
    rates: list[float],
    n_verify: int,
    verify_runs: int,
    n_close: int,
    close: float,
    audit: float,
    verify: float,
    profile: dict[str, dict[str, int]] | None = None,
) -> str:
    rate = _median(rates)
    prof = profile or {}
    cold, warm = prof.get("cold", {}), prof.get("warm", {})
    profile_rows = "\n".join(
        f"| {what} | {cold.get(what, 0):,} | {warm.get(what, 0):,} |"
        if what != "calldata"
        else f"| calldata ({cold.get('calldata bytes', 0)} / {warm.get('calldata bytes', 0)} "
        f"bytes) | {cold.get(what, 0):,} | {warm.get(what, 0):,} |"
        for what in dict.fromkeys([*cold, *warm])
        if what != "calldata bytes"
    )
    verdict = "meets" if rate >= VERIFY_FLOOR else "**below**"
    gas_rows = "\n".join(
        f"| {n:,} | {v['proof']} | {v['post_first']:,.0f} | {v['post_next']:,.0f} | "
        f"{v['claim_cold']:,.0f} | {v['claim_first_holder']:,.0f} | {v['claim_warm']:,.0f} |"
        for n, v in g.items()
    )
    build_rows = "\n".join(
        f"| {n:,} | {_median(t):.2f} | {min(t):.2f}-{max(t):.2f} | {len(t)} |"
        for n, t in builds.items()
    )
    big = g.get(100_000, {})
    delay_first, delay_0, delay_23 = (
        f"{big[k]:,.0f}" if k in big else "n/a"
        for k in ("claim_first_delay", "claim_warm_delay_0", "claim_warm_delay_23")
    )
    goals = "; ".join(
        f"{what} {big[key]:,.0f} <= {goal:,} {'met' if big[key] <= goal else '**not met**'}"
        for key, what, goal in (
            ("post_first", "postRoot first", GAS_GOALS["post_first"]),
            ("post_next", "postRoot next", GAS_GOALS["post_next"]),
            ("claim_cold", "claim cold", GAS_GOALS["claim_cold"]),
            ("claim_warm", "claim warm", GAS_GOALS["claim_warm"]),
        )
        if key in big
    )
    return f"""## Settlement

Gas on the embedded EVM (Cancun rules, same as anvil). `postRoot` first = epoch 1 (fresh
storage), next = median of epochs 2-4; claim cold = median of 5 first claims by addresses that
never held SOGNI (sent by a relayer: the figure includes the token creating the account's
slot, 22,100 gas), first, holder = median of 3 first claims by addresses already holding
SOGNI, warm = median of 3 repeat claims by one worker.

| leaves | proof | postRoot first | postRoot next | claim cold | claim first, holder | claim warm |
|---|---|---|---|---|---|---|
{gas_rows}

Goals at 100,000 leaves: {goals}. The distributor's per-account `claimed` amount lives in
the token, in the same storage slot as the account's balance (balance in the low 128 bits,
claimed in the high 128), so a first claim creates one storage slot, not two (docs/CONTRACTS.md,
"Storage layout (gas)", has the design, its safety argument and the breakdown; proof = proof
hashes).

Under the production claim delay (1 day, hourly epochs; the rows above use the dev chains'
zero delay) a claim also reads the ring's `postedAt` to find the newest matured root, at
100,000 leaves: first claim {delay_first}, repeat claim {delay_0} with no newer root maturing
and {delay_23} with 23 newer roots maturing (binary search over the ring).

Where a claim's gas goes at 100,000 leaves (per-opcode trace of the mined transaction on the
embedded EVM, `bench.settlement.claim_profile`):

| part | claim cold | claim warm |
|---|---|---|
{profile_rows}

Merkle tree build (OpenZeppelin StandardMerkleTree layout, one core):

| leaves | median s | min-max s | runs |
|---|---|---|---|
{build_rows}

Receipts verified per second on one core (`recover_receipt_signer`, {n_verify:,} receipts,
median of {verify_runs} runs): **{rate:,.0f}/s** (min {min(rates):,.0f}, max
{max(rates):,.0f}); {verdict} the {VERIFY_FLOOR:,}/s floor.

One epoch of {n_close:,} paid receipts, against the baseline of verifying their receipt
signatures only ({verify:.2f} s, measured in the same run):

| step | seconds | receipts/s | x baseline |
|---|---|---|---|
{
        _step_row(
            "close (verify receipt + offer, payer settlement, split, tree, files, SQLite, "
            "`postRoot`)",
            close,
            n_close,
            verify,
        )
    }
{
        _step_row(
            "audit from the published files (also payer authorizations, leaves, root)",
            audit,
            n_close,
            verify,
        )
    }
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))
