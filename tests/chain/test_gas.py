"""Gas of postRoot and claim at 1,000 and 100,000 leaves (printed; the bench records it)."""

from __future__ import annotations

import random
import time

import pytest
from eth_hash.auto import keccak

from sogni_protocol.merkle import MerkleTree

from .chain_env import SOGNI, Env


@pytest.mark.parametrize("n_leaves", [1_000, 100_000])
def test_gas_post_root_and_claim(
    env: Env, n_leaves: int, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(n_leaves)
    a, b = env.workers[0], env.workers[1]
    others = [
        ("0x" + rng.randbytes(20).hex(), rng.randrange(1, 10**18)) for _ in range(n_leaves - 2)
    ]
    e1 = [(a.address, 5 * SOGNI), (b.address, 3 * SOGNI), *others]
    start = time.perf_counter()
    tree1 = MerkleTree(e1)
    build_s = time.perf_counter() - start
    total1 = sum(v for _, v in e1)
    dist = env.d.distributor

    post1 = dist.post_root(1, tree1.root, total1, keccak(b"e1"), sender=env.coordinator)
    # first claim by an address that never held SOGNI (cold storage everywhere)
    stranger, s_amount = others[0]
    first = dist.claim(stranger, s_amount, tree1.proof(2), sender=env.relayer)
    # a worker's claim, then its claim of the next epoch's increment
    claim1 = dist.claim(a, *tree1.proof_for(a.address), sender=a)
    e2 = [(a.address, 9 * SOGNI), (b.address, 3 * SOGNI), *others]
    tree2 = MerkleTree(e2)
    post2 = dist.post_root(
        2, tree2.root, sum(v for _, v in e2), keccak(b"e2"), sender=env.coordinator
    )
    claim2 = dist.claim(a, *tree2.proof_for(a.address), sender=a)
    assert claim2.event("Claimed")["amount"] == 4 * SOGNI

    proof_len = len(tree1.proof(0))
    with capsys.disabled():
        print(
            f"\n[gas:{env.kind}] leaves={n_leaves} proof={proof_len} hashes "
            f"build={build_s:.2f}s | postRoot first={post1.gas_used} next={post2.gas_used} | "
            f"claim new-holder={first.gas_used} worker={claim1.gas_used} "
            f"worker-again={claim2.gas_used}"
        )
    assert post2.gas_used < 120_000
    assert claim1.gas_used < 150_000
