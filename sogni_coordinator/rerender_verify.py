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

import msgspec
import trio

from sogni_coordinator.image_verify import check_distance, delivered_image
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verifiers import (
    SEED_TOLERANCE,
    PendingVerifications,
    StepVerdict,
    choose_verifier,
)
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    RERENDER_FEATURE,
    RERENDER_SEED_FEATURE,
    RERENDER_WEIGHTS_FEATURE,
    DecodeVerified,
    JobParams,
    TensorEntry,
    VerifyRender,
    encode,
)

__all__ = [
    "REFERENCE_MODE",
    "RERENDER_RULE",
    "RERENDER_TOLERANCES",
    "SAME_WEIGHTS_QUANTIZATIONS",
    "can_rerender",
    "rerender_on",
    "rerender_weights",
    "seed_checkers",
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
renders (43.9), 0 of 912 held-out honest checks over it. On session 23's weights: largest 23.9
(bf16), 0 of 912 over."""
SAME_WEIGHTS_QUANTIZATIONS = ("quanto-int4", "fp8")
"""Declared-mode parts whose re-render reproduces the worker's rounded weights
(`VerifyRender.weights`, sent only to a node naming `RERENDER_WEIGHTS_FEATURE`): against plain
float32 weights an honest 4-bit render is another picture on some jobs (up to 177 levels,
beyond pure noise's 117), so no bound could pass it and not every cheat; bf16 with fp8
weights reached 62 against the bound's 64. With the same weights, quantized by the same
library, the only drift left is the compute dtype's: at most 41 levels over 62 jobs per mode,
0 with float32 compute (`python -m bench rerender_weights`, BENCHMARKS.md)."""
_WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def rerender_weights(dtype: str) -> str:
    """The `VerifyRender.weights` a receipt declaring `dtype` needs: `""` (plain float32
    weights) unless it names a `SAME_WEIGHTS_QUANTIZATIONS` mode; then `<dtype>+<mode>`, the
    dtype float32 when the declared one is none a node of this project declares (the rounding
    then differs from the worker's by that dtype's rounding, as any unmeasured mode's)."""
    parts = dtype.partition("@")[0].split("+")
    for mode in SAME_WEIGHTS_QUANTIZATIONS:
        if mode in parts[1:]:
            front = parts[0] if parts[0] in _WEIGHT_DTYPES else REFERENCE_MODE
            return f"{front}+{mode}"
    return ""


class _Dispatcher(Protocol):
    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...


def can_rerender(link: NodeLink, model_id: str, weights: str = "") -> bool:
    """`link` can render `model_id` again for a check: it serves it, in `REFERENCE_MODE`, and
    names `RERENDER_FEATURE` (and `RERENDER_WEIGHTS_FEATURE` where `weights` are needed)."""
    return (
        RERENDER_FEATURE in link.features
        and (not weights or RERENDER_WEIGHTS_FEATURE in link.features)
        and link.mode == REFERENCE_MODE
        and model_id in link.models
    )


def seed_checkers(
    nodes: Mapping[str, NodeLink],
    model_id: str,
    weights: str,
    worker: str,
    *,
    worker_payout: str | None,
    exclude: frozenset[str] = frozenset(),
    pixels: int = 0,
) -> dict[str, NodeLink] | None:
    """The nodes that can re-render `model_id` (with `weights`) and also measure a worker's
    leaf 0 against the seed (`RERENDER_SEED_FEATURE`), when one of them may check
    `worker`'s job (`choose_verifier`'s rules); else None."""
    able = {
        peer: link
        for peer, link in nodes.items()
        if RERENDER_SEED_FEATURE in link.features and can_rerender(link, model_id, weights)
    }
    chosen = choose_verifier(
        able, model_id, worker, None, exclude, worker_payout=worker_payout, pixels=pixels
    )
    return None if chosen is None else able


async def verify_rerender(
    dispatcher: _Dispatcher,
    *,
    params: JobParams,
    dtype: str,
    worker: str,
    worker_payout: str,
    image: bytes,
    step: int,
    timeout: float,
    rng: random.Random | None = None,
    exclude: frozenset[str] = frozenset(),
    start: TensorEntry | None = None,
) -> StepVerdict:
    """Have a node none of whose accounts is `worker`, `worker_payout` (the receipt's payee)
    or in `exclude` render `params` again in `REFERENCE_MODE` (with the weights of the
    worker's declared mode `dtype` where `rerender_weights` says so), and compare its image with
    `image` (the delivered one, or the stored `JobImage` frame holding it). A verdict with
    `distance` None is inconclusive (no such node, no answer, a refusal: never the worker's
    doing); over tolerance, evidence against the worker. `step` labels the verdict (the
    receipt's steps). `start`: the worker's proved leaf 0, for the seed check (`rerender_on`);
    a node that can measure it is then preferred."""
    weights = rerender_weights(dtype)
    seeded = None
    if start is not None:  # one of them may check: the seed check is not given up
        seeded = seed_checkers(
            dispatcher.nodes,
            params.model_id,
            weights,
            worker,
            worker_payout=worker_payout,
            exclude=exclude,
            pixels=params.width * params.height,
        )
    able = seeded or {
        p: n for p, n in dispatcher.nodes.items() if can_rerender(n, params.model_id, weights)
    }
    peer = choose_verifier(
        able, params.model_id, worker, rng, exclude, worker_payout=worker_payout,
        pixels=params.width * params.height,
    )  # fmt: skip
    if peer is None:
        tol = _tolerance(params.output_format)
        reason = f"no other wallet's node renders {params.model_id} in {_reference(weights)}"
        return _inconclusive(step, tol, f"no verifier: {reason}")
    return await rerender_on(
        dispatcher,
        peer,
        params=params,
        weights=weights,
        image=image,
        fmt=params.output_format,
        step=step,
        timeout=timeout,
        start=start,
    )


def _tolerance(fmt: str) -> float:
    return RERENDER_TOLERANCES.get(fmt, min(RERENDER_TOLERANCES.values()))


def _reference(weights: str) -> str:
    return REFERENCE_MODE + (f" with {weights} weights" if weights else "")


def _inconclusive(
    step: int, tol: float, reason: str, verifier: str | None = None, code: str | None = None
) -> StepVerdict:
    log.info("rerender_not_verified", verifier=verifier, reason=reason)
    return StepVerdict(verifier, step, None, tol, False, reason, code, rule=RERENDER_RULE)


async def rerender_on(
    dispatcher: _Dispatcher,
    peer: str,
    *,
    params: JobParams,
    weights: str,
    image: bytes,
    fmt: str,
    step: int,
    timeout: float,
    start: TensorEntry | None = None,
) -> StepVerdict:
    """Ask `peer` to render `params` again in `REFERENCE_MODE` (with `weights`) and compare
    its PNG with `image`, a `fmt` file (or the stored `JobImage` frame holding it). The
    request is the same for a real check and a known-render probe (a fresh random
    `check_id`; `fmt` png there: the known image is an earlier verifier's PNG), so the
    verifier cannot tell them apart.

    `start` (the worker's leaf 0, proved against its receipt) goes along to a peer naming
    `RERENDER_SEED_FEATURE`, and its `start_distance` over `SEED_TOLERANCE` fails the check
    whatever the pictures show: another seed's render of a model that draws much the same
    picture for every seed would pass the image bound (docs/VERIFICATION.md, "Whole
    re-render"). A peer without the word is asked the image alone."""
    tol = _tolerance(fmt)
    reference = _reference(weights)
    link = dispatcher.nodes.get(peer)
    if link is None:
        return _inconclusive(step, tol, "re-render: verifier not connected", peer)
    if weights and RERENDER_WEIGHTS_FEATURE not in link.features:  # re-advertised without
        return _inconclusive(step, tol, f"re-render: the verifier cannot use {weights}", peer)
    request = VerifyRender(
        check_id=secrets.token_bytes(32),
        model_id=params.model_id,
        params=params,
        dtype=REFERENCE_MODE,
        deadline=int(time.time() + timeout) + 1,
        weights=weights or msgspec.UNSET,
    )
    if start is not None and RERENDER_SEED_FEATURE in link.features:
        seeded = msgspec.structs.replace(request, start_latents=start)
        if len(encode(seeded)) <= RESULT_FRAME_LIMIT:  # else the image alone, as before
            request = seeded
    seed_checked = isinstance(request.start_latents, TensorEntry)
    if len(encode(request)) > RESULT_FRAME_LIMIT:
        return _inconclusive(step, tol, "re-render: the job's parameters are too large to send")
    reply = await dispatcher.verifications.ask_image(peer, link.outbox, request, timeout)
    if not isinstance(reply, DecodeVerified):  # no code blames the worker: nothing of its
        return _inconclusive(step, tol, f"re-render: {reply[0]}", peer)  # was sent
    if seed_checked:
        d0 = reply.start_distance
        if not isinstance(d0, float):  # it named the word and left the answer out
            return _inconclusive(step, tol, "re-render: no seed distance in the answer", peer)
        if d0 > SEED_TOLERANCE:
            shown = "another shape" if d0 == float("inf") else f"d0 = {d0:.3g}"
            reason = f"seed: leaf 0 is {shown} from the seed's noise, over {SEED_TOLERANCE:g}"
            log.info("rerender_verified", verifier=peer, distance=d0, passed=False, rule="seed")
            return StepVerdict(
                peer, step, d0, SEED_TOLERANCE, False, reason, rule=RERENDER_RULE, image=reply.image
            )
    delivered = delivered_image(image)
    try:
        d = await trio.to_thread.run_sync(
            check_distance, delivered, reply.image, fmt, params.width, params.height
        )
    except ValueError as exc:  # the verifier's PNG is not an image of the job's size
        return _inconclusive(step, tol, f"re-render: {exc}", peer)
    passed = d.block <= tol
    word = "within" if passed else "over"
    shown = "not an image of the job's size" if d.block == float("inf") else f"{d.block:.3g}"
    reason = (
        f"re-render: block distance {shown} {word} {tol:g} levels (mean {d.mean:.3g}; "
        f"{fmt}, reference {reference})"
    )
    log.info("rerender_verified", verifier=peer, distance=d.block, passed=passed)
    if seed_checked:
        reason += f"; seed: leaf 0 within {SEED_TOLERANCE:g} of the seed's noise"
    return StepVerdict(
        peer,
        step,
        d.block,
        tol,
        passed,
        reason,
        rule=RERENDER_RULE,
        image=reply.image,
        seed_checked=seed_checked,
    )
