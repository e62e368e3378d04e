"""The trajectory commitment format (sogni_protocol.trajectory), pure Python: step encoding,
tree shape (checked against an independent RFC 6962-style definition), proofs."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from eth_hash.auto import keccak

from sogni_protocol.trajectory import (
    STEP_DOMAIN,
    StepValue,
    TensorBytes,
    TrajectoryTree,
    encode_step,
    leaf,
    root_of,
    step_digest,
    verify_step,
)


def _digests(n: int) -> list[bytes]:
    return [keccak(b"step %d" % k) for k in range(n)]


def _reference_top(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash: split at the largest power of two below n."""
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return keccak(b"\x01" + _reference_top(leaves[:split]) + _reference_top(leaves[split:]))


@pytest.mark.parametrize("n", [*range(1, 18), 31, 32, 33, 100])
def test_root_matches_the_reference_and_every_proof_verifies(n: int) -> None:
    digests = _digests(n)
    tree = TrajectoryTree(digests)
    top = _reference_top(
        [keccak(b"\x00" + struct.pack(">I", k) + d) for k, d in enumerate(digests)]
    )
    assert tree.root == keccak(b"\x02" + struct.pack(">I", n) + top)
    assert tree.root == root_of(digests) and tree.n_leaves == n
    assert tree.root_hex == "0x" + tree.root.hex()
    for k in range(n):
        proof = tree.proof(k)
        assert len(proof) <= max(1, (n - 1).bit_length())
        assert verify_step(tree.root, k, digests[k], proof, n)


def test_bad_proofs_fail() -> None:
    n = 7
    digests = _digests(n)
    tree = TrajectoryTree(digests)
    proof = tree.proof(3)
    assert verify_step(tree.root, 3, digests[3], proof, n)
    assert not verify_step(tree.root, 4, digests[3], proof, n)  # wrong step
    assert not verify_step(tree.root, 2, digests[3], proof, n)
    assert not verify_step(tree.root, 3, digests[4], proof, n)  # wrong digest
    assert not verify_step(tree.root, 3, digests[3], proof, n + 1)  # wrong size
    assert not verify_step(tree.root, 3, digests[3], proof, n - 1)
    assert not verify_step(tree.root, 3, digests[3], proof[:-1], n)  # short
    assert not verify_step(tree.root, 3, digests[3], [*proof, proof[0]], n)  # long
    assert not verify_step(tree.root, 3, digests[3], proof[::-1], n)  # reordered
    assert not verify_step(root_of(digests[:-1]), 3, digests[3], proof, n)  # other root
    # malformed input is False, not an exception
    assert not verify_step(tree.root, 3, digests[3], [b"short"], n)
    assert not verify_step(tree.root, 3, b"\x00" * 31, proof, n)
    assert not verify_step(tree.root[:31], 3, digests[3], proof, n)
    assert not verify_step(tree.root, -1, digests[3], proof, n)
    assert not verify_step(tree.root, n, digests[3], proof, n)


def test_root_binds_the_leaf_count_and_order() -> None:
    d = _digests(4)
    assert root_of(d) != root_of(d[:3])
    assert root_of(d) != root_of([d[1], d[0], d[2], d[3]])
    # a promoted last leaf is not the same as a duplicated one
    assert root_of(d[:3]) != root_of([*d[:3], d[2]])


def test_leaf_and_tree_inputs_are_checked() -> None:
    with pytest.raises(ValueError):
        leaf(0, b"\x00" * 31)
    with pytest.raises(ValueError):
        leaf(-1, b"\x00" * 32)
    with pytest.raises(ValueError):
        TrajectoryTree([])
    with pytest.raises(IndexError):
        TrajectoryTree(_digests(3)).proof(3)


def _tensor(values: list[float], shape: tuple[int, ...], dtype: str = "float32") -> TensorBytes:
    return TensorBytes(dtype, shape, struct.pack(f"<{len(values)}f", *values))


def test_step_encoding_layout() -> None:
    latents = _tensor([1.0, -2.0], (1, 2))
    entries: dict[str, StepValue] = {
        "timestep": 999.0,
        "latents": latents,
        "lower_order_nums": 1,
        "sample": None,
    }
    expected = (
        STEP_DOMAIN
        + struct.pack(">I", 4)
        # sorted by name: latents, lower_order_nums, sample, timestep
        + struct.pack(">H", 7) + b"latents" + bytes([3, 7]) + b"float32"
        + bytes([2]) + struct.pack(">II", 1, 2) + struct.pack("<2f", 1.0, -2.0)
        + struct.pack(">H", 16) + b"lower_order_nums" + bytes([1]) + struct.pack(">q", 1)
        + struct.pack(">H", 6) + b"sample" + bytes([0])
        + struct.pack(">H", 8) + b"timestep" + bytes([2]) + struct.pack(">d", 999.0)
    )  # fmt: skip
    assert encode_step(entries) == expected
    assert step_digest(entries) == keccak(expected)
    # pinned known answers: a change here is a new format and must bump STEP_DOMAIN
    assert STEP_DOMAIN == b"sogni-trajectory-step-v1"
    assert step_digest(entries).hex() == (
        "6d9c31614ffc124575c2836ba71d9505fba59832ceafa8c8fb1eecb77b6690cd"
    )
    assert root_of(_digests(5)).hex() == (
        "f068bdb5d59578b0d10459d1a0b643f0c31dcf60f41d066d8039b8714c03629c"
    )


def test_step_digest_distinguishes_what_matters() -> None:
    base = {"latents": _tensor([1.0, 2.0], (2,)), "timestep": None}
    d = step_digest(base)
    assert step_digest({**base, "latents": _tensor([1.0, 2.0], (1, 2))}) != d  # shape
    assert step_digest({**base, "latents": _tensor([1.0, 2.0], (2,), "float16")}) != d  # dtype
    assert step_digest({**base, "latents": _tensor([1.0, 2.5], (2,))}) != d  # values
    assert step_digest({**base, "timestep": 0.0}) != d  # None vs 0.0
    assert step_digest({**base, "timestep": 0}) != step_digest({**base, "timestep": 0.0})
    assert step_digest({**base, "extra": None}) != d  # an added entry
    assert step_digest(dict(reversed(base.items()))) == d  # insertion order does not matter


def test_step_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="latents"):
        encode_step({"timestep": 1.0})
    with pytest.raises(ValueError, match="bytes"):
        _tensor([1.0], (2,))
    with pytest.raises(ValueError, match="dtype"):
        _tensor([1.0], (1,), "float64")
    with pytest.raises(TypeError):
        encode_step({"latents": _tensor([1.0], (1,)), "flag": True})
    with pytest.raises(TypeError):
        encode_step({"latents": _tensor([1.0], (1,)), "name": "text"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        encode_step({"latents": _tensor([1.0], (1,)), "big": 2**63})


def test_importable_without_torch_or_numpy() -> None:
    code = (
        "import sys, sogni_protocol.trajectory;"
        "bad = {'torch', 'numpy'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
