"""Trajectory commitments: a Merkle root over every latent of one denoising run.

Why: a worker is paid per signed receipt, so the network must be able to check a result
instead of trusting it. Re-rendering a whole job to check it costs as much as rendering it;
re-running ONE denoising step costs 1/N of it. So a worker commits, per job, to the latent
after every step (plus the initial noise), and a verifier later asks it to open step k-1 and
step k, re-runs step k from the first and compares with the second. This module is the
commitment format only: pure Python (no torch, no numpy), so a coordinator, a verifier or a
contract can rebuild and check it. Recording it from diffusers lives in
``sogni_node.render.trajectory``; docs/TRAJECTORY.md explains the whole scheme.

Leaves. A run of N denoising steps has N + 1 leaves, in order: leaf 0 is the initial latent
(the noise drawn from the job's seed, before any scheduler scaling), leaf k (1 <= k <= N) is the
latent after denoising step k, so leaf N is the final latent that the VAE decodes. Each leaf
commits to ``(k, digest_k)`` where ``digest_k = keccak256(encode_step(entries_k))`` and
``entries_k`` maps names to values: ``"latents"`` (always) and whatever scheduler state a
verifier needs to run step k + 1 from leaf k (e.g. DPM++ 2M's earlier model outputs, as
``"model_outputs.0"``, ``"model_outputs.1"``), plus ``"timestep"`` (the timestep of the step that
produced this latent; ``None`` for leaf 0).

Canonical step encoding (``encode_step``); integers in headers are big-endian, tensor payloads
are little-endian float32 (what every CPU and GPU stores natively)::

    b"sogni-trajectory-step-v1"                       24-byte domain tag
    u32 number of entries
    per entry, sorted by the UTF-8 bytes of its name:
        u16 len(name) | name (UTF-8)
        u8 kind: 0 = None, 1 = int (i64), 2 = float (f64, IEEE 754), 3 = tensor
        int / float: 8 bytes big-endian
        tensor: u8 len(dtype) | dtype (ASCII, e.g. "float16": the dtype it was computed in)
                u8 ndim | ndim x u32 dims | prod(dims) x float32 little-endian (C order)

Storing float16 or bfloat16 values as float32 is exact, so the payload is canonical whatever
the compute dtype, and the dtype tag still binds which one was used.

Tree (positional, RFC 6962 style, keccak256 throughout)::

    leaf(k, d)   = keccak256(0x00 | u32 k | d)
    node(l, r)   = keccak256(0x01 | l | r)
    level above  = node() of each adjacent pair; a last odd node is promoted unchanged
    root         = keccak256(0x02 | u32 n_leaves | top)

The step index is inside the leaf, so a proof of "step k" cannot be replayed for another step;
the 0x00/0x01 prefixes keep a node from passing as a leaf; the root binds the number of leaves
(so a worker cannot claim a shorter or longer run than it committed). A proof is the list of
sibling hashes from the leaf upwards, skipping levels where the node was promoted; checking it
needs ``n_leaves`` to know where those are.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from eth_hash.auto import keccak

__all__ = [
    "DTYPES",
    "STEP_DOMAIN",
    "StepValue",
    "TensorBytes",
    "TrajectoryTree",
    "encode_step",
    "leaf",
    "root_of",
    "step_digest",
    "verify_step",
]

STEP_DOMAIN = b"sogni-trajectory-step-v1"
"""Domain tag at the start of every step encoding (version bump = new format)."""

DTYPES = frozenset({"float32", "float16", "bfloat16"})
"""Compute dtypes a committed tensor may name (all exactly representable as float32)."""

MAX_LEAVES = 2**32 - 1

_LEAF = b"\x00"
_NODE = b"\x01"
_ROOT = b"\x02"
_NONE, _INT, _FLOAT, _TENSOR = 0, 1, 2, 3
_I64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as the commitment sees it: compute dtype, shape, float32 little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported tensor dtype {self.dtype!r}; known: {sorted(DTYPES)}")
        if len(self.shape) > 255 or any(not 0 <= d < 2**32 for d in self.shape):
            raise ValueError(f"bad tensor shape {self.shape}")
        if len(self.data) != 4 * math.prod(self.shape):
            raise ValueError(
                f"tensor of shape {self.shape} needs {4 * math.prod(self.shape)} bytes "
                f"of float32, got {len(self.data)}"
            )


StepValue = TensorBytes | int | float | None
"""What a step entry may hold."""


def _header(name: str, value: StepValue) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > 0xFFFF:
        raise ValueError(f"bad entry name {name!r}")
    head = struct.pack(">H", len(raw)) + raw
    if value is None:
        return head + bytes([_NONE])
    if isinstance(value, bool):
        raise TypeError(f"entry {name!r}: bool is not a step value (use an int)")
    if isinstance(value, int):
        if not _I64[0] <= value <= _I64[1]:
            raise ValueError(f"entry {name!r}: int out of int64 range")
        return head + bytes([_INT]) + struct.pack(">q", value)
    if isinstance(value, float):
        return head + bytes([_FLOAT]) + struct.pack(">d", value)
    if isinstance(value, TensorBytes):
        dtype = value.dtype.encode()
        dims = struct.pack(f">B{len(value.shape)}I", len(value.shape), *value.shape)
        return head + bytes([_TENSOR, len(dtype)]) + dtype + dims
    raise TypeError(f"entry {name!r}: unsupported step value {type(value).__name__}")


def _parts(entries: Mapping[str, StepValue]) -> Iterable[bytes]:
    if "latents" not in entries or not isinstance(entries["latents"], TensorBytes):
        raise ValueError("a step must commit a 'latents' tensor")
    yield STEP_DOMAIN
    yield struct.pack(">I", len(entries))
    for name in sorted(entries, key=str.encode):
        value = entries[name]
        yield _header(name, value)
        if isinstance(value, TensorBytes):
            yield value.data


def encode_step(entries: Mapping[str, StepValue]) -> bytes:
    """The canonical bytes of one step (see the module docstring)."""
    return b"".join(_parts(entries))


def step_digest(entries: Mapping[str, StepValue]) -> bytes:
    """``keccak256(encode_step(entries))``, hashed in pieces (no copy of the tensors)."""
    h = keccak.new(b"")
    for part in _parts(entries):
        h.update(part)
    return h.digest()


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def leaf(step: int, digest: bytes) -> bytes:
    """Leaf hash of step ``step`` with step digest ``digest``."""
    if not 0 <= step < MAX_LEAVES:
        raise ValueError(f"step out of range: {step}")
    if len(digest) != 32:
        raise ValueError("a step digest is 32 bytes")
    return keccak(_LEAF + _u32(step) + digest)


def _node(left: bytes, right: bytes) -> bytes:
    return keccak(_NODE + left + right)


def _seal(n_leaves: int, top: bytes) -> bytes:
    return keccak(_ROOT + _u32(n_leaves) + top)


class TrajectoryTree:
    """The tree over ``digests[k]`` for k = 0..n-1 (n = steps + 1); leaves in step order."""

    __slots__ = ("_levels",)

    def __init__(self, digests: Sequence[bytes]) -> None:
        n = len(digests)
        if not 1 <= n <= MAX_LEAVES:
            raise ValueError(f"a trajectory tree needs 1..{MAX_LEAVES} leaves, got {n}")
        level = [leaf(k, d) for k, d in enumerate(digests)]
        levels = [level]
        while len(level) > 1:
            pairs = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                pairs.append(level[-1])  # promoted, not duplicated
            level = pairs
            levels.append(level)
        self._levels = levels

    @property
    def n_leaves(self) -> int:
        return len(self._levels[0])

    @property
    def root(self) -> bytes:
        return _seal(self.n_leaves, self._levels[-1][0])

    @property
    def root_hex(self) -> str:
        return "0x" + self.root.hex()

    def proof(self, step: int) -> list[bytes]:
        """Sibling hashes from leaf ``step`` up to the top (promotions contribute none)."""
        if not 0 <= step < self.n_leaves:
            raise IndexError(step)
        path: list[bytes] = []
        i = step
        for level in self._levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            i //= 2
        return path


def root_of(digests: Sequence[bytes]) -> bytes:
    """Root of the tree over ``digests`` (shorthand for ``TrajectoryTree(digests).root``)."""
    return TrajectoryTree(digests).root


def verify_step(
    root: bytes, step: int, digest: bytes, proof: Sequence[bytes], n_leaves: int
) -> bool:
    """True when ``(step, digest)`` is leaf ``step`` of an ``n_leaves``-leaf tree with ``root``.

    Never raises on bad input from a counterparty: a malformed proof is just False.
    """
    if not 0 <= step < n_leaves <= MAX_LEAVES or len(digest) != 32 or len(root) != 32:
        return False
    if any(len(p) != 32 for p in proof):
        return False
    node = leaf(step, digest)
    siblings = iter(proof)
    i, width = step, n_leaves
    while width > 1:
        if i ^ 1 < width:
            sibling = next(siblings, None)
            if sibling is None:
                return False
            node = _node(node, sibling) if i % 2 == 0 else _node(sibling, node)
        i //= 2
        width = (width + 1) // 2
    if next(siblings, None) is not None:
        return False
    return _seal(n_leaves, node) == root
