"""sogni_protocol.merkle against OpenZeppelin's JS StandardMerkleTree and a node-by-node model.

(Its on-chain counterpart, OpenZeppelin's MerkleProof, is exercised by the claim tests.)
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from sogni_protocol.merkle import MerkleTree, hash_pair, leaf_hash, process_proof, verify

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
OZ_TREE = CONTRACTS / "node_modules" / "@openzeppelin" / "merkle-tree"

JS = r"""
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');
let input = '';
process.stdin.on('data', (c) => (input += c));
process.stdin.on('end', () => {
  const req = JSON.parse(input);
  const tree = StandardMerkleTree.of(req.values, ['address', 'uint256']);
  const ours = StandardMerkleTree.load(req.ours);  // load() validates the whole tree
  const oursVerified = req.values.every((v, i) =>
    StandardMerkleTree.verify(ours.root, ['address', 'uint256'], v, req.ourProofs[i]));
  process.stdout.write(JSON.stringify({
    root: tree.root,
    dump: tree.dump(),
    proofs: req.values.map((_, i) => tree.getProof(i)),
    oursRoot: ours.root,
    oursVerified,
  }));
});
"""


def _random_leaves(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    leaves = []
    for _ in range(n):
        addr = "0x" + rng.randbytes(20).hex()
        amount = rng.choice([0, 1, rng.randrange(10**18), rng.randrange(2**256)])
        leaves.append((addr, amount))
    return leaves


def _reference_heap(leaves: list[tuple[str, int]]) -> list[bytes]:
    """OZ's makeMerkleTree loop, node by node, with eth_hash: the slow obvious version."""
    hashes = sorted(keccak(keccak(abi_encode(["address", "uint256"], [a, v]))) for a, v in leaves)
    n = len(hashes)
    tree = [b""] * (2 * n - 1)
    for j, h in enumerate(hashes):
        tree[2 * n - 2 - j] = h
    for i in range(n - 2, -1, -1):
        left, right = tree[2 * i + 1], tree[2 * i + 2]
        tree[i] = keccak(min(left, right) + max(left, right))
    return tree


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 33, 100, 257])
def test_matches_reference_heap_and_proofs_verify(n: int) -> None:
    leaves = _random_leaves(n, seed=n)
    tree = MerkleTree(leaves)
    ref = _reference_heap(leaves)
    dumped = tree.dump()["tree"]
    assert dumped == ["0x" + h.hex() for h in ref]
    assert tree.root == ref[0]
    for i, (addr, amount) in enumerate(leaves):
        proof = tree.proof(i)
        assert verify(tree.root, (addr, amount), proof)
        assert verify(tree.root_hex, tree.leaf_hash(i), ["0x" + p.hex() for p in proof])
        assert not verify(tree.root, (addr, amount + 1), proof)
        assert tree.proof_for(addr.upper().replace("0X", "0x")) == (amount, proof)


def test_leaf_encoding_is_double_keccak_of_abi_encode() -> None:
    addr, amount = "0x" + "ab" * 20, 123456789
    inner = keccak(abi_encode(["address", "uint256"], [addr, amount]))
    assert leaf_hash(addr, amount) == keccak(inner)
    assert hash_pair(b"\x01" * 32, b"\x00" * 32) == keccak(b"\x00" * 32 + b"\x01" * 32)
    assert process_proof(leaf_hash(addr, amount), []) == leaf_hash(addr, amount)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        MerkleTree([])
    with pytest.raises(ValueError, match="duplicate"):
        MerkleTree([("0x" + "11" * 20, 1), ("0x" + "11" * 20, 2)])
    with pytest.raises(ValueError):
        MerkleTree([("0x1234", 1)])
    with pytest.raises(ValueError):
        MerkleTree([("0x" + "11" * 20, 2**256)])
    with pytest.raises(ValueError):
        MerkleTree([("0x" + "11" * 20, -1)])
    tree = MerkleTree([("0x" + "11" * 20, 1)])
    with pytest.raises(KeyError):
        tree.proof_for("0x" + "22" * 20)


def test_dump_load_roundtrip() -> None:
    leaves = _random_leaves(50, seed=7)
    tree = MerkleTree(leaves)
    again = MerkleTree.load(json.loads(json.dumps(tree.dump())))
    assert again.root == tree.root
    assert [again.proof(i) for i in range(50)] == [tree.proof(i) for i in range(50)]
    assert again.leaf(3) == tree.leaf(3)
    broken = tree.dump()
    broken["values"][0]["value"][1] = str(int(broken["values"][0]["value"][1]) + 1)
    with pytest.raises(ValueError):
        MerkleTree.load(broken)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000])
def test_matches_openzeppelin_js(n: int) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot compare with @openzeppelin/merkle-tree")
    assert OZ_TREE.is_dir(), "run `npm ci --prefix contracts` (@openzeppelin/merkle-tree)"
    leaves = _random_leaves(n, seed=1000 + n)
    tree = MerkleTree(leaves)
    values = [[a, str(v)] for a, v in leaves]
    request = {
        "values": values,
        "ours": tree.dump(),
        "ourProofs": [["0x" + p.hex() for p in tree.proof(i)] for i in range(n)],
    }
    out = subprocess.run(
        [node, "-e", JS],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=CONTRACTS,
        check=True,
        timeout=120,
    )
    js = json.loads(out.stdout)
    assert js["root"] == tree.root_hex
    assert js["dump"]["tree"] == tree.dump()["tree"]
    assert [v["treeIndex"] for v in js["dump"]["values"]] == [
        v["treeIndex"] for v in tree.dump()["values"]
    ]
    assert js["proofs"] == [["0x" + p.hex() for p in tree.proof(i)] for i in range(n)]
    assert js["oursRoot"] == tree.root_hex and js["oursVerified"] is True
    # and a tree dumped by the JS library loads here
    assert MerkleTree.load(js["dump"]).root == tree.root


def test_build_one_million_leaves(capsys: pytest.CaptureFixture[str]) -> None:
    leaves = _random_leaves(1_000_000, seed=99)
    start = time.perf_counter()
    tree = MerkleTree(leaves)
    elapsed = time.perf_counter() - start
    i = 123_456
    assert verify(tree.root, leaves[i], tree.proof(i))
    assert len(tree.proof(i)) in (19, 20)
    with capsys.disabled():
        print(f"\n[merkle] built 1,000,000 leaves in {elapsed:.1f} s")
    assert elapsed < 120
