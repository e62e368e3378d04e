"""Property-based fuzzing of the contracts' accounting invariants (hypothesis).

Random sequences of operations run against the deployed contracts and a small Python model
of what each should do. Every operation's outcome (success or the exact custom error) must
match the model, and after every step:

- Staking: ``totalActive == sum(active)``, ``totalPending == sum(pending)`` and the contract's
  SOGNI balance is ``totalActive + totalPending`` (stake, stakeFor, requestUnstake, withdraw,
  slash, waiting);
- RewardDistributor: ``totalClaimed <= totalOf(latestEpoch)``, ``totalClaimed`` is the sum of
  the accounts' claims, each account's claimed amount is at most its cumulative amount in the
  matured root, the epoch claims use is the newest matured one, and the balance is the
  funding minus what was claimed (postRoot with good and bad totals, claims against the
  matured and the latest tree, claimAndStake, waiting across the claim delay).

Runs on the embedded chain only (always there, deterministic), each example between a
snapshot and a revert. Examples are few and derandomized so CI is reproducible; set
``SOGNI_CHAIN_FUZZ_EXAMPLES`` for a longer run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_hash.auto import keccak
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sogni_chain import ChainRevert, Tx
from sogni_protocol.merkle import MerkleTree

from .chain_env import DISTRIBUTOR_FUNDING, SOGNI, WORKER_FUNDING, Env

EXAMPLES = int(os.environ.get("SOGNI_CHAIN_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DAY = 24 * 3600
COOLDOWN = 7 * DAY
N = 3  # accounts in play
UINT_MAX = 2**256 - 1

embedded_only = pytest.mark.parametrize("env", ["embedded"], indirect=True)


def _expect(error: str | None, fn: Callable[..., Tx], *args: Any, **kwargs: Any) -> Tx | None:
    """Call ``fn``; it must succeed (``error`` None) or revert with exactly ``error``."""
    if error is None:
        return fn(*args, **kwargs)
    with pytest.raises(ChainRevert) as err:
        fn(*args, **kwargs)
    assert err.value.error == error, err.value.reason
    return None


def _examples(env: Env, body: Callable[[], None]) -> None:
    """Run one example between a snapshot and a revert, in a fresh thread.

    The thread is for speed: CPython 3.11 grows a thread's frame stack in chunks allocated
    with mmap, and py-evm's deep calls, started from inside hypothesis's stack, can sit on a
    chunk boundary and map/unmap one per call (over half the run time went to the kernel).
    A new thread starts with an empty stack.
    """
    failure: list[BaseException] = []

    def guarded() -> None:
        snap = env.chain.snapshot()
        try:
            body()
        except BaseException as exc:  # re-raised in the test's thread, for hypothesis
            failure.append(exc)
        finally:
            env.chain.revert(snap)

    thread = threading.Thread(target=guarded, name="chain-fuzz-example")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


# -- Staking -------------------------------------------------------------------------------

_amount = st.one_of(
    st.integers(1, 4_000).map(lambda n: n * SOGNI),
    st.integers(1, 10**18),
    st.just(0),
)
# unstake and slash amounts are picked relative to what the account has (see `_part`)
# (hypothesis prefers the first choices of `sampled_from`/`one_of`: the useful ones go first)
_part_of = st.sampled_from(["half", "all", "one", "all+1", "zero", "lots"])
_who = st.integers(0, N - 1)
_staking_op = st.one_of(
    st.tuples(st.just("unstake"), _who, _who, _part_of),
    st.tuples(st.just("wait"), _who, _who, st.sampled_from([8 * DAY, DAY, 3 * DAY])),
    st.tuples(st.just("withdraw"), _who, _who, st.sampled_from(["after cooldown", "now"])),
    st.tuples(st.just("slash"), _who, _who, _part_of),
    st.tuples(st.just("stake_for"), _who, _who, _amount),
    st.tuples(st.just("stake"), _who, _who, _amount),
)
INITIAL_STAKE = 1_000 * SOGNI


def _part(which: object, of: int) -> int:
    return {"zero": 0, "one": 1, "half": of // 2, "all": of, "all+1": of + 1}.get(
        str(which), 10**6 * SOGNI
    )


@dataclass
class _StakeModel:
    balance: list[int] = field(default_factory=lambda: [WORKER_FUNDING] * N)
    active: list[int] = field(default_factory=lambda: [0] * N)
    pending: list[int] = field(default_factory=lambda: [0] * N)
    unlock_at: list[int] = field(default_factory=lambda: [0] * N)


@embedded_only
def test_staking_totals_stay_exact(env: Env) -> None:
    d, chain = env.d, env.chain
    staking, token = d.staking, d.token
    workers = env.workers[:N]
    for w in workers:  # before the snapshot: every example starts approved
        token.approve(staking.address, UINT_MAX, sender=w)

    @FUZZ
    @given(st.lists(_staking_op, min_size=3, max_size=8))
    def run(ops: list[tuple[str, int, int, object]]) -> None:
        def body() -> None:
            m = _StakeModel()
            for k, w in enumerate(workers):  # everyone starts with some stake
                staking.stake(INITIAL_STAKE, sender=w)
                m.balance[k] -= INITIAL_STAKE
                m.active[k] += INITIAL_STAKE
            for kind, i, j, arg in ops:
                if kind == "unstake":
                    amount = _part(arg, m.active[i])
                elif kind == "slash":
                    amount = _part(arg, m.active[j] + m.pending[j])
                elif kind == "withdraw":
                    amount = 0
                    if arg == "after cooldown":
                        chain.advance_time(COOLDOWN + 60)
                else:
                    assert isinstance(arg, int)
                    amount = arg
                changed: int | None = None  # the account whose position changed
                if kind in ("stake", "stake_for"):
                    to = i if kind == "stake" else j
                    if amount == 0:
                        error: str | None = "ZeroAmount"
                    elif amount > m.balance[i]:
                        error = "ERC20InsufficientBalance"
                    else:
                        error = None
                        m.balance[i] -= amount
                        m.active[to] += amount
                        changed = to
                    if kind == "stake":
                        _expect(error, staking.stake, amount, sender=workers[i])
                    else:
                        _expect(error, staking.stake_for, workers[to], amount, sender=workers[i])
                elif kind == "unstake":
                    if amount == 0:
                        error = "ZeroAmount"
                    elif amount > m.active[i]:
                        error = "InsufficientActiveStake"
                    else:
                        error = None
                    tx = _expect(error, staking.request_unstake, amount, sender=workers[i])
                    if tx is not None:
                        m.active[i] -= amount
                        m.pending[i] += amount
                        m.unlock_at[i] = int(tx.event("UnstakeRequested")["unlockAt"])
                        changed = i
                elif kind == "withdraw":
                    now = chain.timestamp()
                    if m.pending[i] == 0:
                        _expect("NothingToWithdraw", staking.withdraw, sender=workers[i])
                    elif m.unlock_at[i] > now + 60:
                        _expect("CooldownActive", staking.withdraw, sender=workers[i])
                    else:  # unlocked, or within a minute of it: then either outcome
                        try:
                            tx = staking.withdraw(sender=workers[i])
                        except ChainRevert as exc:
                            assert exc.error == "CooldownActive" and m.unlock_at[i] > now
                        else:
                            assert tx.event("Withdrawn")["amount"] == m.pending[i]
                            m.balance[i] += m.pending[i]
                            m.pending[i], m.unlock_at[i] = 0, 0
                            changed = i
                elif kind == "slash":
                    if amount == 0:
                        error = "ZeroAmount"
                    elif m.active[j] + m.pending[j] == 0:
                        error = "NothingToSlash"
                    else:
                        error = None
                    tx = _expect(error, staking.slash, workers[j], amount, "f", sender=env.slasher)
                    if tx is not None:
                        from_active = min(amount, m.active[j])
                        from_pending = min(amount - from_active, m.pending[j])
                        ev = tx.event("Slashed")
                        assert (ev["fromActive"], ev["fromPending"]) == (from_active, from_pending)
                        m.active[j] -= from_active
                        m.pending[j] -= from_pending
                        changed = j
                else:  # wait
                    chain.advance_time(amount)

                # the invariants, after every step
                total_active, total_pending = staking.total_active(), staking.total_pending()
                assert total_active == sum(m.active)
                assert total_pending == sum(m.pending)
                assert token.balance_of(staking.address) == total_active + total_pending
                if changed is not None:
                    assert staking.active_stake(workers[changed]) == m.active[changed]
                    assert staking.pending_stake(workers[changed])[0] == m.pending[changed]
            # and every account, at the end: sum(active) and sum(pending) read from the chain
            active = [staking.active_stake(w) for w in workers]
            pending = [staking.pending_stake(w)[0] for w in workers]
            assert (active, pending) == (m.active, m.pending)
            assert (sum(active), sum(pending)) == (staking.total_active(), staking.total_pending())
            assert [token.balance_of(w) for w in workers] == m.balance

        _examples(env, body)

    run()


# -- RewardDistributor ---------------------------------------------------------------------

WAIT_SHORT = 7 * 3600 + 1000  # no sum of these lands near the one-day delay
WAIT_LONG = 2 * DAY + 1000
CAP = 500 * SOGNI

_increments = st.lists(
    st.one_of(st.integers(1, 300).map(lambda n: n * SOGNI), st.just(0)), min_size=N, max_size=N
)
_first = st.lists(st.integers(1, 150).map(lambda n: n * SOGNI), min_size=N, max_size=N)
_dist_op = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, N - 1), st.sampled_from(["matured", "latest"])),
    st.tuples(st.just("wait"), st.sampled_from([WAIT_LONG, WAIT_SHORT]), st.just(0)),
    st.tuples(st.just("post"), _increments, st.sampled_from(["ok", "shift", "lower", "jump"])),
    st.tuples(st.just("claim_all"), st.just(0), st.just("matured")),
    st.tuples(st.just("stake"), st.integers(0, N - 1), st.sampled_from([3_333, 10_000, 0])),
)


@dataclass
class _Epoch:
    tree: MerkleTree
    amounts: list[int]
    age: int = 0  # seconds waited since it was posted (give or take a few per block)


_SHIFTED = [
    ("claim_all", 0, "matured"),
    ("post", [0, 0, 0], "shift"),
    ("wait", WAIT_LONG, 0),
    ("claim_all", 0, "matured"),
]


@embedded_only
def test_distributor_never_pays_more_than_the_matured_root(env: Env) -> None:
    d, chain = env.d, env.chain
    dist, token, staking = d.distributor, d.token, d.staking
    accounts = [w.address for w in env.workers[:N]]
    dist.set_max_total_growth(CAP, sender=env.treasury)

    @FUZZ
    @example(0, [100 * SOGNI, 50 * SOGNI, 20 * SOGNI], _SHIFTED)  # a root that moves earnings
    @example(DAY, [100 * SOGNI, 50 * SOGNI, 20 * SOGNI], _SHIFTED)
    @given(st.sampled_from([0, DAY]), _first, st.lists(_dist_op, min_size=3, max_size=8))
    def run(delay: int, first: list[int], ops: list[tuple[Any, ...]]) -> None:
        def body() -> None:
            dist.set_claim_delay(delay, sender=env.treasury)
            epochs: list[_Epoch] = []
            claimed = [0] * N
            staked = [0] * N
            honest = True  # no root has moved earnings between accounts (yet)

            def matured() -> int:  # the model's newest matured epoch (1-based; 0: none)
                for e in range(len(epochs), 0, -1):
                    if delay == 0 or epochs[e - 1].age >= delay:
                        return e
                return 0

            def claim_error(account: int, cumulative: int, root: bytes) -> str | None:
                """The contract's checks, in its order."""
                if not epochs:
                    return "NoRoot"
                e = matured()
                if e == 0:
                    return "NotMatured"
                if root != epochs[e - 1].tree.root:
                    return "InvalidProof"  # a proof against a root not yet matured
                if cumulative <= claimed[account]:
                    return "NothingToClaim"
                if sum(claimed) + cumulative - claimed[account] > sum(epochs[e - 1].amounts):
                    return "ClaimExceedsRootTotal"
                return None

            def post(increments: list[int], mode: str) -> None:
                nonlocal honest
                before = epochs[-1].amounts if epochs else [0] * N
                amounts = [b + inc for b, inc in zip(before, increments, strict=True)]
                epoch = len(epochs) + 1
                error: str | None = None
                if mode == "lower" and sum(before) > 0:
                    k = next(i for i, b in enumerate(before) if b > 0)
                    amounts = list(before)
                    amounts[k] -= 1
                    error = "TotalDecreased"
                elif mode == "jump":
                    epoch += 1
                    error = "EpochNotNext"
                elif mode == "shift":  # a dishonest root: the total holds, the leaves move
                    amounts = amounts[1:] + amounts[:1]
                if error is None and sum(amounts) - sum(before) > CAP:
                    error = "GrowthCapExceeded"
                tree = MerkleTree(list(zip(accounts, amounts, strict=True)))
                _expect(
                    error,
                    dist.post_root,
                    epoch,
                    tree.root,
                    sum(amounts),
                    keccak(b"r"),
                    sender=env.coordinator,
                )
                if error is None:
                    epochs.append(_Epoch(tree, amounts))
                    honest = honest and all(x >= y for x, y in zip(amounts, before, strict=True))

            def claim(account: int, against: str, stake_bps: int | None = None) -> None:
                e = matured()
                use = len(epochs) if against == "latest" else e
                tree = epochs[use - 1].tree if use else MerkleTree([(accounts[account], 1)])
                cumulative, proof = tree.proof_for(accounts[account])
                error = claim_error(account, cumulative, tree.root)
                if stake_bps is None:  # a relayer submits it
                    tx = _expect(
                        error, dist.claim, accounts[account], cumulative, proof, sender=env.relayer
                    )
                else:  # the worker itself, auto-staking a part
                    worker = env.workers[account]
                    deadline = chain.timestamp() + 3600
                    tx = _expect(
                        error,
                        dist.claim_and_stake,
                        worker,
                        cumulative,
                        proof,
                        stake_bps,
                        deadline,
                        sender=worker,
                    )
                if tx is not None:
                    ev = tx.event("Claimed")
                    assert ev["epoch"] == e and ev["amount"] == cumulative - claimed[account]
                    if stake_bps is not None:
                        part = ev["amount"] * stake_bps // 10_000
                        assert tx.event("AutoStaked")["staked"] == part
                        staked[account] += part
                    claimed[account] = cumulative
                if e:
                    assert dist.claimed(accounts[account]) == claimed[account]
                    if honest:
                        assert claimed[account] <= epochs[e - 1].amounts[account]

            for kind, a, b in [("post", first, "ok"), *ops]:  # every example starts with a root
                if kind == "post":
                    post(a, b)
                elif kind == "claim":
                    claim(a, b)
                elif kind == "claim_all":
                    for k in range(N):
                        claim(k, b)
                elif kind == "stake":
                    claim(a, "matured", stake_bps=b)
                else:  # wait
                    chain.advance_time(a)
                    for ep in epochs:
                        ep.age += a

                # the invariants, after every step
                latest = dist.latest_epoch()
                total_claimed = dist.total_claimed()
                assert latest == len(epochs)
                e = dist.matured_epoch()
                assert e == matured()
                assert total_claimed == sum(claimed)
                assert total_claimed <= dist.total_of(e) <= dist.total_of(latest)
                assert token.balance_of(dist.address) == DISTRIBUTOR_FUNDING - total_claimed
            # every account, at the end: claimed never beyond its cumulative amount in the
            # matured root (with honest roots), or in some matured root (with any roots)
            e = matured()
            on_chain = [dist.claimed(a) for a in accounts]
            assert on_chain == claimed and sum(on_chain) == dist.total_claimed()
            for k in range(N):
                best = max((ep.amounts[k] for ep in epochs[:e]), default=0)
                assert on_chain[k] <= best
                if honest:
                    assert on_chain[k] <= (epochs[e - 1].amounts[k] if e else 0)
            assert [staking.active_stake(a) for a in accounts] == staked

        _examples(env, body)

    run()
