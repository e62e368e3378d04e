"""CPU float16 is path-bound like bfloat16 (issue #12 item 6, BENCHMARKS.md "Trajectory
commitments"): a `float16@<path>` job is re-run only by a node declaring that very string,
never by a bf16 node of the same path nor a float32 one, and only the measured path has a
tolerance; CUDA float16 and the rest fail closed."""

from __future__ import annotations

import random

from sogni_coordinator.verifiers import (
    TOLERANCES,
    can_verify,
    choose_verifier,
    path_bound,
    tolerance_for,
)
from tests.coordinator._helpers import mode_link

PATH = "cpu-x86_64-avx512-avx512_core_bf16-torch2.13"
FP16 = f"float16@{PATH}"
WORKER, A, B, C, D = ("0x" + c * 40 for c in "abcde")


def test_float16_is_verified_only_by_the_same_mode_and_path() -> None:
    nodes = {
        "fp16": mode_link("fp16", A, FP16),
        "bf16": mode_link("bf16", B, f"bfloat16@{PATH}"),  # same path, other mode: never
        "fp16-avx2": mode_link("fp16-avx2", C, "float16@cpu-x86_64-avx2-avx2-torch2.13"),
        "fp32": mode_link("fp32", D, "float32"),
        "old": mode_link("old", D, ""),
        "mine": mode_link("mine", WORKER, FP16),
    }
    assert path_bound(FP16)
    assert can_verify(nodes["fp16"], "m", FP16)
    assert not any(can_verify(nodes[k], "m", FP16) for k in ("bf16", "fp16-avx2", "fp32", "old"))
    rng = random.Random(5)
    drawn = {choose_verifier(nodes, "m", WORKER, rng, dtype=FP16) for _ in range(50)}
    assert drawn == {"fp16"}
    gone = {k: v for k, v in nodes.items() if k != "fp16"}
    assert choose_verifier(gone, "m", WORKER, rng, dtype=FP16) is None  # no one else may


def test_only_the_measured_float16_path_has_a_tolerance() -> None:
    assert tolerance_for(FP16) == 5e-5 == TOLERANCES["float32"]  # same-path max 0: the floor
    for unmeasured in (
        "float16",  # an older node: path unknown
        "float16@cpu-x86_64-avx2-avx2-torch2.13",
        "float16@cuda-sm90-torch2.13",  # no GPU was lent: CUDA float16 unmeasured
        "float8_e4m3fn@cuda-sm90-torch2.13",
        f"float16+compiled@{PATH}",
    ):
        assert tolerance_for(unmeasured) is None
