"""bfloat16 renders are re-checked only on the worker's own code path (issue #12's floors,
docs/VERIFICATION.md "Same-path re-checks"): who may verify, which (mode, path) has a
tolerance, and what a check does when no node of that path is online (in-process, with the
fake nodes of `test_checks`)."""

from __future__ import annotations

import random

import msgspec
import pytest

from sogni_coordinator.image_verify import image_tolerance
from sogni_coordinator.verifiers import (
    TOLERANCES,
    can_verify,
    choose_verifier,
    path_bound,
    tolerance_for,
)
from sogni_node.hardware import _onednn_isa, compute_path
from sogni_protocol.messages import Capabilities, JobImage, VerifyStep
from tests.coordinator._helpers import mode_link

from .conftest import Harness
from .test_checks import (
    Trajectory,
    _paid_request,
    answer_challenge,
    answer_verify,
    committed,
    events,
    log_lines,
    until,
)
from .test_checks import (
    checked as checked,  # the fixture
)

MEASURED = "bfloat16@cpu-x86_64-avx512-avx512_core_bf16-torch2.13"
"""The one (mode, path) whose same-path tolerance was measured (BENCHMARKS.md)."""
AVX2 = "bfloat16@cpu-x86_64-avx2-avx2-torch2.13"
WORKER, OTHER, THIRD, FOURTH = ("0x" + c * 40 for c in "abcd")


def test_a_path_bound_mode_is_verified_only_by_the_same_mode_and_path() -> None:
    nodes = {
        "same": mode_link("same", OTHER, MEASURED),
        "avx2": mode_link("avx2", THIRD, AVX2),
        "old": mode_link("old", FOURTH, ""),  # an older node: says no mode
        "fp32": mode_link("fp32", FOURTH, "float32"),
        "mine": mode_link("mine", WORKER, MEASURED),  # the worker's own wallet: never
    }
    rng = random.Random(3)
    assert path_bound(MEASURED) and not path_bound("float32")
    drawn = {choose_verifier(nodes, "m", WORKER, rng, dtype=MEASURED) for _ in range(100)}
    assert drawn == {"same"}  # required, as a different wallet is
    assert choose_verifier(nodes, "m", WORKER, rng, dtype=AVX2) == "avx2"
    gone = {k: v for k, v in nodes.items() if k != "same"}
    assert choose_verifier(gone, "m", WORKER, rng, dtype=MEASURED) is None
    # float32: a node that says float32 or says nothing, never one rendering bf16
    drawn = {choose_verifier(nodes, "m", WORKER, rng, dtype="float32") for _ in range(100)}
    assert drawn == {"old", "fp32"}
    assert not can_verify(nodes["same"], "other-model", MEASURED)


def test_only_the_measured_path_has_a_tolerance_the_rest_fails_closed() -> None:
    assert tolerance_for(MEASURED) == 5e-5  # same-path honest max 0: float32's floor
    assert TOLERANCES[MEASURED] == tolerance_for("float32")
    for unmeasured in ("bfloat16", AVX2, MEASURED.replace("torch2.13", "torch2.14")):
        assert tolerance_for(unmeasured) is None  # never sampled
    for unmeasured in (AVX2, MEASURED.replace("torch2.13", "torch2.14")):
        assert image_tolerance(unmeasured, "png") is None
    # the image check keeps bf16's cross-path tolerance (a looser bound on one path)
    assert image_tolerance(MEASURED, "png") == 3.6
    assert image_tolerance(MEASURED, "webp") == image_tolerance("bfloat16", "webp")


def test_the_advertised_path_names_the_kernels_a_cpu_would_take() -> None:
    bf16 = frozenset({"avx", "avx2", "fma", "sse4_1", "avx512f", "avx512bw", "avx512vl",
                      "avx512dq", "avx512_bf16"})  # fmt: skip
    assert _onednn_isa(bf16, {}) == "avx512_core_bf16"
    assert _onednn_isa(bf16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "avx2"
    assert _onednn_isa(bf16, {"DNNL_MAX_CPU_ISA": "avx512_core"}) == "avx512_core"
    assert _onednn_isa(frozenset({"avx", "avx2", "fma", "sse4_1"}), {}) == "avx2"
    assert _onednn_isa(frozenset(), {}) == "none"
    here = compute_path("cpu")
    assert here.startswith("cpu-") and "-torch" in here
    capped = compute_path("cpu", env={"ONEDNN_MAX_CPU_ISA": "SSE41"})
    assert capped == here or "-sse41-" in capped  # lowered, or this CPU had nothing above


async def test_the_advert_carries_the_mode_onto_themode_link(checked: Harness) -> None:
    h = checked
    node = h.node(0)
    assert node.link.mode == ""
    caps = Capabilities(
        peer_id=node.link.peer_id, wallet=node.wallet, expiry=0, models=["m"], slots=1,
        backend="test", device="cpu", max_pixels=0, mode=MEASURED,
    )  # fmt: skip
    h.dispatcher.capabilities_changed(node.link, caps)
    assert node.link.mode == MEASURED
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(caps), type=Capabilities) == caps


async def test_no_same_path_verifier_releases_at_once_unstruck(checked: Harness) -> None:
    """A bf16 worker whose path no other wallet's node shares: the check is skipped as soon
    as the challenge is answered (never held for a verifier to come), the image delivered
    and paid, the worker not struck; the other-path node is never asked."""
    h = checked
    sub, _ = await _paid_request(h)
    worker, other = h.node(0), h.node(1, ready=False)
    worker.link.mode, other.link.mode = MEASURED, AVX2
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t, MEASURED))
    assert h.store.check_state(offer.offer.job_id) == "pending"  # sampled: its mode is measured
    await answer_challenge(h, worker, t)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    assert h.store.check_state(offer.offer.job_id) == "skipped"
    images = [m for m in await events(sub) if isinstance(m, JobImage)]  # type: ignore[arg-type]
    assert [m.job_id for m in images] == [offer.offer.job_id]
    (line,) = log_lines(h)
    assert line["verdict"] == "skipped" and MEASURED in str(line["reason"])
    assert line["verifier"] is None
    assert h.reputation.get(worker.wallet).strikes == []
    assert not [m for m in other.drain() if isinstance(m, VerifyStep)]


async def test_a_same_path_verifier_checks_and_another_path_is_never_asked(
    checked: Harness,
) -> None:
    h = checked
    await _paid_request(h)
    worker, avx2, same = h.node(0), h.node(1, ready=False), h.node(2, ready=False)
    worker.link.mode, avx2.link.mode, same.link.mode = MEASURED, AVX2, MEASURED
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t, MEASURED))
    await answer_challenge(h, worker, t)
    assert await answer_verify(h, same, t, honest=True)  # the steps went to `same`
    await until(lambda: h.store.check_state(offer.offer.job_id) == "passed")
    (line,) = log_lines(h)
    assert line["verdict"] == "pass" and line["verifier"] == same.wallet
    assert not [m for m in avx2.drain() if isinstance(m, VerifyStep)]


def test_a_verifier_is_never_a_node_too_small_for_the_job() -> None:
    """A node advertising a smaller `max_pixels` refuses the check (`too_large`), which
    counted as skipped: a cheater's large job passed unchecked whenever one was drawn."""
    small = mode_link("small", OTHER, "float32")
    small.max_pixels = 512 * 512
    large = mode_link("large", THIRD, "float32")
    large.max_pixels = 2048 * 2048
    nodes = {"small": small, "large": large}
    rng = random.Random(5)
    drawn = {
        choose_verifier(nodes, "m", WORKER, rng, dtype="float32", pixels=1024 * 1024)
        for _ in range(50)
    }
    assert drawn == {"large"}
    assert choose_verifier({"small": small}, "m", WORKER, rng, pixels=1024 * 1024) is None
    assert choose_verifier({"small": small}, "m", WORKER, rng, pixels=512 * 512) == "small"


async def test_a_re_render_is_never_sent_to_a_seed_checker_too_small_for_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a seed-capable node too small for the job, the draw fell to it alone and found
    nobody: the large job's check was inconclusive though a large enough node was there."""
    from typing import Any

    from sogni_coordinator import rerender_verify
    from sogni_coordinator.rerender_verify import (
        RERENDER_FEATURE,
        RERENDER_SEED_FEATURE,
        verify_rerender,
    )
    from sogni_protocol.messages import JobParams

    small = mode_link("small", OTHER, "float32")
    small.max_pixels = 512 * 512
    small.features = frozenset({RERENDER_FEATURE, RERENDER_SEED_FEATURE})
    large = mode_link("large", THIRD, "float32")
    large.max_pixels = 2048 * 2048
    large.features = frozenset({RERENDER_FEATURE})
    asked: list[str] = []

    async def rerender_on(_dispatcher: Any, peer: str, **_kw: Any) -> str:
        asked.append(peer)
        return "asked"

    monkeypatch.setattr(rerender_verify, "rerender_on", rerender_on)

    class Nodes:
        def __init__(self) -> None:
            self.nodes = {"small": small, "large": large}

    params = JobParams(
        model_id="m", positive_prompt="x", guidance=5.0, width=1024, height=1024, steps=4, seed=1
    )
    await verify_rerender(
        Nodes(),  # type: ignore[arg-type]
        params=params,
        dtype="float32",
        worker=WORKER,
        worker_payout=WORKER,
        image=b"",
        step=4,
        timeout=1,
        rng=random.Random(1),
        start=object(),  # type: ignore[arg-type]
    )
    assert asked == ["large"]
