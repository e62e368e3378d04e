"""Whole re-render: the check for a receipt the step checks cannot cover.

Why: a step check needs a tolerance measured for the worker's declared numeric mode
(`verifiers.TOLERANCES`) and a committed trajectory. The mode string is the node's own word,
so without this a node declaring a mode nobody measured (CUDA float16, fp8, a CPU path never
run here) or committing no trajectory would escape every check (docs/VERIFICATION.md, "Whole
re-render"). Such a receipt is sampled as any other; a node of another wallet and payout
account, serving the model, running the reference mode float32 and naming
`RERENDER_FEATURE`, renders the whole job again from its seed (`VerifyRender` ->
`DecodeVerified`, a lossless PNG), and the coordinator compares the delivered image with it:
the image check's block distance (`image_verify.check_distance`: the verifier's PNG through
the job's encoder, the largest mean absolute difference over any 8x8 block and channel).

The bound (`RERENDER_TOLERANCES`) must hold for an honest render in a mode no one measured, so
it is set over the widest honest spread `python -m bench rerender` measured between float32
and every mode this CPU runs (bf16 drifts most over a whole trajectory). It catches what
changes the picture: another model, noise, another seed, a replayed image, most steps
skipped; not a near model or a few skipped steps, which the step checks of a measured mode
do catch (BENCHMARKS.md, "Whole re-render check"). Cost: one render per checked job.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Mapping
from typing import Protocol

import trio

from sogni_coordinator.image_verify import check_distance, delivered_image
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verifiers import PendingVerifications, StepVerdict, choose_verifier
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    RERENDER_FEATURE,
    DecodeVerified,
    JobParams,
    VerifyRender,
    encode,
)

__all__ = [
    "REFERENCE_MODE",
    "RERENDER_RULE",
    "RERENDER_TOLERANCES",
    "can_rerender",
    "rerender_covers",
    "verify_rerender",
]

log = get_logger(__name__)

REFERENCE_MODE = "float32"
"""The mode a re-render runs in: the one every honest mode's drift was measured against."""
RERENDER_RULE = "rerender"
"""The verdict's rule (`StepVerdict.rule`, the log's `imageRule`)."""
RERENDER_TOLERANCES: Mapping[str, float] = {"png": 64.0, "jpeg": 64.0, "webp": 64.0}
"""Output format -> the largest block distance (0..255 levels) an honest render in a covered
mode may show against a float32 re-render of the same job. `python -m bench rerender`
(BENCHMARKS.md, "Whole re-render check", 62 jobs per provider): 2x the largest calibration
distance is 57-58 levels (bf16, whose rounding compounds over the trajectory, is the widest;
CPU float16 reaches 6, the int8 modes 23); 64 is 1.46x the largest of all 496 covered honest
renders (43.9), 0 of 912 held-out honest checks over it."""
UNCOVERED_QUANTIZATIONS = ("+quanto-int4", "+fp8")
"""Declared-mode parts the re-render bound does not cover, since honest renders in them were
measured beyond it: a 4-bit render is another picture on some jobs (up to 178 levels from
float32's, beyond pure noise's 117), so a bound passing it would pass every cheat; fp8
weights (CUDA only; simulated on the CPU by rounding the UNet's weights through float8 e4m3
with a per-tensor scale) reached 70-78 levels on 24 jobs. Such a mode is step-checked where
measured (`float32+quanto-int4` on the CPU) and released unchecked elsewhere: a hole a cheat
can choose (docs/VERIFICATION.md, "Whole re-render")."""


def rerender_covers(dtype: str) -> bool:
    """A receipt declaring `dtype` can be checked by a whole re-render."""
    return not any(q in dtype for q in UNCOVERED_QUANTIZATIONS)


class _Dispatcher(Protocol):
    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...


def can_rerender(link: NodeLink, model_id: str) -> bool:
    """`link` can render `model_id` again for a check: it serves it, in `REFERENCE_MODE`, and
    names `RERENDER_FEATURE`."""
    return (
        RERENDER_FEATURE in link.features
        and link.mode == REFERENCE_MODE
        and model_id in link.models
    )


async def verify_rerender(
    dispatcher: _Dispatcher,
    *,
    params: JobParams,
    worker: str,
    worker_payout: str,
    image: bytes,
    step: int,
    timeout: float,
    rng: random.Random | None = None,
    exclude: frozenset[str] = frozenset(),
) -> StepVerdict:
    """Have a node none of whose accounts is `worker`, `worker_payout` (the receipt's payee)
    or in `exclude` render `params` again in `REFERENCE_MODE`, and compare its image with
    `image` (the delivered one, or the stored `JobImage` frame holding it). A verdict with
    `distance` None is inconclusive (no such node, no answer, a refusal: never the worker's
    doing); over tolerance, evidence against the worker. `step` labels the verdict (the
    receipt's steps)."""
    fmt = params.output_format
    tol = RERENDER_TOLERANCES.get(fmt, min(RERENDER_TOLERANCES.values()))

    def fail(reason: str, verifier: str | None = None, code: str | None = None) -> StepVerdict:
        log.info("rerender_not_verified", verifier=verifier, reason=reason)
        return StepVerdict(verifier, step, None, tol, False, reason, code, rule=RERENDER_RULE)

    able = {p: n for p, n in dispatcher.nodes.items() if can_rerender(n, params.model_id)}
    peer = choose_verifier(able, params.model_id, worker, rng, exclude, worker_payout=worker_payout)
    if peer is None:
        return fail(
            f"no verifier: no other wallet's node renders {params.model_id} in {REFERENCE_MODE}"
        )
    request = VerifyRender(
        check_id=secrets.token_bytes(32),
        model_id=params.model_id,
        params=params,
        dtype=REFERENCE_MODE,
        deadline=int(time.time() + timeout) + 1,
    )
    if len(encode(request)) > RESULT_FRAME_LIMIT:
        return fail("re-render: the job's parameters are too large to send")
    reply = await dispatcher.verifications.ask_image(
        peer, dispatcher.nodes[peer].outbox, request, timeout
    )
    if not isinstance(reply, DecodeVerified):  # no code blames the worker: nothing of its
        return fail(f"re-render: {reply[0]}", peer)  # was sent
    delivered = delivered_image(image)
    try:
        d = await trio.to_thread.run_sync(
            check_distance, delivered, reply.image, fmt, params.width, params.height
        )
    except ValueError as exc:  # the verifier's PNG is not an image of the job's size
        return fail(f"re-render: {exc}", peer)
    passed = d.block <= tol
    word = "within" if passed else "over"
    shown = "not an image of the job's size" if d.block == float("inf") else f"{d.block:.3g}"
    reason = (
        f"re-render: block distance {shown} {word} {tol:g} levels (mean {d.mean:.3g}; "
        f"{fmt}, reference {REFERENCE_MODE})"
    )
    log.info("rerender_verified", verifier=peer, distance=d.block, passed=passed)
    return StepVerdict(peer, step, d.block, tol, passed, reason, rule=RERENDER_RULE)
