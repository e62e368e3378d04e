"""Record a render's trajectory (every latent plus the scheduler state) and open steps of it.

Why: see `sogni_protocol.trajectory` and docs/TRAJECTORY.md. The diffusers backend feeds a
`TrajectoryRecorder` the initial noise (leaf 0) and, from its step callback, the latent after
each denoising step together with the scheduler's carried state; each step's digest is
computed as it goes, and the tensors are kept so the node can reveal any step later. The
result is a `Trajectory`: root, digests, and `open(k)` giving leaf k's tensors with a Merkle
proof. `save`/`load` keep it in a safetensors file (no pickle) between the render and a
challenge.

Tensors are kept as float32 numpy arrays (exactly the committed bytes; float16 and bfloat16
values convert losslessly), with their compute dtype alongside. Nothing here holds the
prompt or any other user text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.trajectory import (
    StepValue,
    TensorBytes,
    TrajectoryTree,
    step_digest,
    verify_step,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "FILE_FORMAT",
    "SCHEDULER_STATE_ATTRS",
    "StepOpening",
    "StepRecord",
    "Trajectory",
    "TrajectoryRecorder",
    "restore_scheduler_state",
    "scheduler_state",
    "step_record",
]

FILE_FORMAT = "sogni-trajectory-v1"
"""The ``format`` entry of a saved trajectory's safetensors metadata."""

SCHEDULER_STATE_ATTRS = (
    "model_outputs",  # DPM-Solver (++) multistep, UniPC, DEIS: earlier model outputs reused
    "lower_order_nums",  # ... and how many of them are filled
    "timestep_list",  # UniPC
    "last_sample",  # UniPC corrector
    "this_order",  # UniPC
    "prev_derivative",  # Heun
    "dt",  # Heun
    "sample",  # Heun, KDPM2: the sample of the first half-step
    "derivatives",  # LMS
    "ets",  # PNDM
    "counter",  # PNDM
    "cur_model_output",  # PNDM
    "cur_sample",  # PNDM
)
"""Scheduler attributes that carry state from one ``step`` call to the next, committed with
each leaf when the scheduler has them. The schedulers in the backend's table (Euler, Euler
ancestral, DDIM, LCM) carry none besides their step index; DPM++ 2M carries
``model_outputs`` (its earlier converted model outputs) and ``lower_order_nums``."""

FloatArray = npt.NDArray[np.float32]
Scalar = int | float | None
_RESERVED = ("latents", "timestep")


@dataclass(frozen=True)
class StepRecord:
    """What leaf `step` commits: named tensors (float32, with their compute dtype) and
    scalars. ``"latents"`` is always there; ``"timestep"`` is the timestep of the step that
    produced it (None for step 0); other names are scheduler state (`scheduler_state`)."""

    step: int
    tensors: Mapping[str, FloatArray] = field(repr=False)
    dtypes: Mapping[str, str]
    scalars: Mapping[str, Scalar]

    def __post_init__(self) -> None:
        if set(self.tensors) != set(self.dtypes):
            raise ValueError("every tensor needs a dtype and every dtype a tensor")
        if set(self.tensors) & set(self.scalars):
            raise ValueError("a name is both a tensor and a scalar")
        if "latents" not in self.tensors:
            raise ValueError("a step record needs a 'latents' tensor")

    def entries(self) -> dict[str, StepValue]:
        """The record as `sogni_protocol.trajectory` values."""
        out: dict[str, StepValue] = dict(self.scalars)
        for name, arr in self.tensors.items():
            out[name] = TensorBytes(self.dtypes[name], tuple(arr.shape), _le_f32(arr).tobytes())
        return out

    def digest(self) -> bytes:
        """keccak256 of the canonical step encoding, recomputed from the tensors."""
        return step_digest(self.entries())

    @property
    def latents(self) -> FloatArray:
        return self.tensors["latents"]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())

    def tensor(self, name: str, device: Any = "cpu") -> torch.Tensor:
        """Tensor `name` as torch, in the dtype it was computed in, on `device`."""
        import torch

        dtype = getattr(torch, self.dtypes[name])
        return torch.from_numpy(np.array(self.tensors[name])).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class StepOpening:
    """Leaf `record.step` revealed: its tensors and the Merkle proof against the root."""

    record: StepRecord
    proof: tuple[bytes, ...] = field(repr=False)
    n_leaves: int

    @property
    def step(self) -> int:
        return self.record.step

    def verify(self, root: bytes) -> bool:
        """Recompute the digest from the revealed tensors and check the proof."""
        try:
            digest = self.record.digest()
        except (TypeError, ValueError):
            return False
        return verify_step(root, self.record.step, digest, self.proof, self.n_leaves)


class Trajectory:
    """A committed run: ``n_steps + 1`` leaves (0 = initial noise, N = final latent)."""

    __slots__ = ("_digests", "_records", "_tree")

    def __init__(self, records: Sequence[StepRecord]) -> None:
        if len(records) < 2:
            raise ValueError("a trajectory needs the initial latent and at least one step")
        for k, record in enumerate(records):
            if record.step != k:
                raise ValueError(f"record {k} is for step {record.step}")
        self._records = tuple(records)
        self._digests = tuple(r.digest() for r in records)
        self._tree = TrajectoryTree(self._digests)

    @classmethod
    def _trusted(cls, records: Sequence[StepRecord], digests: Sequence[bytes]) -> Trajectory:
        self = cls.__new__(cls)
        self._records = tuple(records)
        self._digests = tuple(digests)
        self._tree = TrajectoryTree(self._digests)
        return self

    def __repr__(self) -> str:
        return f"Trajectory(root={self.root_hex}, n_steps={self.n_steps})"

    @property
    def root(self) -> bytes:
        return self._tree.root

    @property
    def root_hex(self) -> str:
        return self._tree.root_hex

    @property
    def n_steps(self) -> int:
        return len(self._records) - 1

    @property
    def n_leaves(self) -> int:
        return len(self._records)

    @property
    def digests(self) -> tuple[bytes, ...]:
        return self._digests

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held (float32)."""
        return sum(r.nbytes for r in self._records)

    def record(self, step: int) -> StepRecord:
        return self._records[step]

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._records)

    def open(self, step: int) -> StepOpening:
        """Leaf `step`'s tensors and proof (what a node reveals for a challenge)."""
        if not 0 <= step < self.n_leaves:
            raise IndexError(step)
        return StepOpening(self._records[step], tuple(self._tree.proof(step)), self.n_leaves)

    def save(self, path: Path | str) -> None:
        """Write every leaf to a safetensors file, atomically (see `load`)."""
        from safetensors.numpy import save

        tensors = {
            f"{r.step}/{name}": _le_f32(a) for r in self._records for name, a in r.tensors.items()
        }
        steps = [{"dtypes": dict(r.dtypes), "scalars": dict(r.scalars)} for r in self._records]
        metadata = {
            "format": FILE_FORMAT,
            "root": self.root_hex,
            "n_steps": str(self.n_steps),
            "steps": json.dumps(steps, sort_keys=True),
        }
        atomic_write_bytes(path, save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Path | str) -> Trajectory:
        """Read a file written by `save`; every digest is recomputed and the root checked
        (ValueError if the file does not match the root it names)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FILE_FORMAT:
                raise ValueError(f"not a trajectory file ({metadata.get('format')!r})")
            steps = json.loads(metadata["steps"])
            names = list(f.keys())
            arrays = {key: f.get_tensor(key) for key in names}
        if len(steps) != int(metadata["n_steps"]) + 1:
            raise ValueError("trajectory file: step count does not match its records")
        records = []
        for k, meta in enumerate(steps):
            dtypes = {str(n): str(d) for n, d in meta["dtypes"].items()}
            records.append(
                StepRecord(
                    step=k,
                    tensors={n: _le_f32(arrays.pop(f"{k}/{n}")) for n in dtypes},
                    dtypes=dtypes,
                    scalars={str(n): _scalar(v) for n, v in meta["scalars"].items()},
                )
            )
        if arrays:
            raise ValueError(f"trajectory file: {len(arrays)} tensor(s) belong to no step")
        trajectory = cls(records)
        if trajectory.root_hex != metadata.get("root"):
            raise ValueError("trajectory file: its tensors do not match its root")
        return trajectory


class TrajectoryRecorder:
    """Feed it leaf 0 (the initial noise) and then the latent after each step, in order."""

    def __init__(self) -> None:
        self._records: list[StepRecord] = []
        self._digests: list[bytes] = []

    @property
    def steps_recorded(self) -> int:
        return len(self._records)

    def record(
        self,
        step: int,
        latents: torch.Tensor,
        scheduler: Any = None,
        timestep: Any = None,
    ) -> bytes:
        """Record leaf `step` and return its digest. `scheduler` (if given) is read for its
        carried state *after* the step ran: what step ``step + 1`` needs. `timestep` is the
        timestep of the step that produced `latents` (None for step 0)."""
        if step != len(self._records):
            raise ValueError(f"expected step {len(self._records)}, got {step}")
        record = step_record(step, latents, scheduler, timestep)
        digest = record.digest()
        self._records.append(record)
        self._digests.append(digest)
        return digest

    def finish(self) -> Trajectory:
        """The trajectory of everything recorded (digests are not recomputed)."""
        if len(self._records) < 2:
            raise ValueError("a trajectory needs the initial latent and at least one step")
        return Trajectory._trusted(self._records, self._digests)


def step_record(
    step: int, latents: torch.Tensor, scheduler: Any = None, timestep: Any = None
) -> StepRecord:
    """Leaf `step` from live tensors: `latents`, the carried state of `scheduler` (read as
    it is now, i.e. after the step that produced `latents`) and the `timestep` of that step
    (None for step 0). A verifier that re-ran a step builds its own leaf with this and
    compares ``.digest()`` (bit-exact) or the tensors (within a tolerance)."""
    tensors: dict[str, FloatArray] = {"latents": _to_f32(latents)}
    dtypes = {"latents": _dtype_name(latents)}
    scalars: dict[str, Scalar] = {"timestep": None if timestep is None else float(timestep)}
    if scheduler is not None:
        state_tensors, state_dtypes, state_scalars = scheduler_state(scheduler)
        tensors.update(state_tensors)
        dtypes.update(state_dtypes)
        scalars.update(state_scalars)
    return StepRecord(step, tensors, dtypes, scalars)


def scheduler_state(
    scheduler: Any,
) -> tuple[dict[str, FloatArray], dict[str, str], dict[str, Scalar]]:
    """The scheduler's carried state (`SCHEDULER_STATE_ATTRS` it has) as ``(tensors, dtypes,
    scalars)``; a list attribute ``a`` becomes entries ``a.0``, ``a.1``, ..."""
    tensors: dict[str, FloatArray] = {}
    dtypes: dict[str, str] = {}
    scalars: dict[str, Scalar] = {}

    def put(name: str, value: Any) -> None:
        if _is_tensor(value):
            tensors[name] = _to_f32(value)
            dtypes[name] = _dtype_name(value)
        elif value is None or isinstance(value, float):
            scalars[name] = value
        elif isinstance(value, int):  # bool too: stored as 0/1
            scalars[name] = int(value)
        else:
            raise TypeError(f"scheduler state {name!r}: cannot commit {type(value).__name__}")

    for attr in SCHEDULER_STATE_ATTRS:
        if not hasattr(scheduler, attr):
            continue
        value = getattr(scheduler, attr)
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                put(f"{attr}.{i}", item)
        else:
            put(attr, value)
    return tensors, dtypes, scalars


def restore_scheduler_state(scheduler: Any, record: StepRecord, device: Any = "cpu") -> None:
    """Put a fresh scheduler (``set_timesteps`` already called) in the state it had after
    step ``record.step``, ready to run step ``record.step + 1`` from ``record``'s latents.

    Restores the committed state attributes and the step index (for schedulers that keep one).
    """
    lists: dict[str, dict[int, Any]] = {}
    values: dict[str, Any] = {n: v for n, v in record.scalars.items() if n not in _RESERVED}
    values.update({n: record.tensor(n, device) for n in record.tensors if n not in _RESERVED})
    for name, value in values.items():
        attr, dot, index = name.partition(".")
        if attr not in SCHEDULER_STATE_ATTRS:
            raise ValueError(f"unknown scheduler state {name!r}")
        if dot:
            lists.setdefault(attr, {})[int(index)] = value
        else:
            setattr(scheduler, attr, value)
    for attr, items in lists.items():
        if sorted(items) != list(range(len(items))):
            raise ValueError(f"scheduler state {attr!r} has gaps")
        setattr(scheduler, attr, [items[i] for i in range(len(items))])
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = record.step


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _to_f32(t: torch.Tensor) -> FloatArray:
    """A float32 C-order copy on the CPU (a copy: the pipeline may reuse its buffers)."""
    import torch

    cpu = t.detach().to(device="cpu", dtype=torch.float32)
    return np.array(cpu.numpy(), dtype="<f4", order="C", copy=True)


def _le_f32(a: Any) -> FloatArray:
    return np.ascontiguousarray(a, dtype="<f4")


def _scalar(v: Any) -> Scalar:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise ValueError(f"trajectory file: bad scalar {v!r}")
