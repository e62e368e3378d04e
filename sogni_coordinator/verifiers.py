"""Verifier nodes: re-run one committed step of a job on a node of ANOTHER wallet.

Why: a challenge (`challenges.py`) proves the revealed latents are the ones the worker
committed to; it does not prove they are honest steps of the model. Here the coordinator
hands leaf k of a challenged job (its latents and committed scheduler state) to another
node serving the same model, whose wallet and payout account both differ from the worker's
wallet and payout account (`choose_verifier`; or a worker, or another container paid to the
same account, could vouch for itself) and from the accounts that paid for the job (the payer
and the accounts referral-linked to it, `Billing.payer_accounts`: a payer checking its own
jobs would be paid from their take, free Daily Boost work included). That node re-runs step k
(`sogni_node.verify.step_check.recompute_step`) in the worker's declared numeric mode and
sends back x'_{k+1} (`StepVerified`). The coordinator then measures the committed x_{k+1}
against it (docs/VERIFICATION.md):

    d = |x_{k+1} - x'_{k+1}| / |x_{k+1} - x_k|      (L2, float64)

and passes the step when d is below the tolerance measured for the declared mode
(`TOLERANCES`, BENCHMARKS.md "Trajectory commitments"); an unmeasured mode fails closed.
A reduced-precision mode names its code path (`bfloat16@<path>`, `float16@<path>`,
`sogni_node.hardware.compute_path`): only a node advertising that very mode re-runs its steps
(`choose_verifier`).

The verifier learns the job's parameters, the prompt included (re-running a step needs
them), but not the job id (`check_id` is random) nor whose job it is. The coordinator imports
no torch: the distance is computed here in pure Python over the float32 bytes.

Not decided here: which jobs and steps to verify, holding a result until verified, what a
failed verdict costs the worker, whom to believe when verifiers disagree (`checks.py`).
`probe_step` sends a step whose answer is already known (`known_answers.py`) to one chosen
verifier, exactly as `verify_step` sends a real one.
"""

from __future__ import annotations

import math
import random
import secrets
import sys
import time
from array import array
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import trio

from sogni_coordinator.delivery import short
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.pending_replies import PendingReplies
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    DecodeVerified,
    JobParams,
    Message,
    StepOpeningWire,
    StepVerified,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
    VerifyRender,
    VerifyStep,
    encode,
)

__all__ = [
    "SEED_TOLERANCE",
    "TOLERANCES",
    "PendingVerifications",
    "StepVerdict",
    "can_verify",
    "choose_verifier",
    "normalised_distance",
    "path_bound",
    "probe_step",
    "tolerance_for",
    "verify_step",
]

log = get_logger(__name__)

TOLERANCES: Mapping[str, float] = {
    "float32": 5e-5,
    "float32+int8": 6e-5,
    "float32+quanto-int8": 4e-5,
    "float32+quanto-int4": 4e-5,
    "float32+int8-dynamic": 2e-1,
    "bfloat16@cpu-x86_64-avx512-avx512_core_bf16-torch2.13": 5e-5,
    "float16@cpu-x86_64-avx512-avx512_core_bf16-torch2.13": 5e-5,
}
"""Declared numeric mode (`RenderMeta.dtype`, the backend's `dtype_name`) -> largest distance
an honest step may show when the verifier runs the same mode: 10x the largest honest distance
measured (BENCHMARKS.md, "Trajectory commitments"; 0 false rejections in 1000 held-out honest
checks). Retrained sogni-shapes-64 (1682ff6): the full run proposes these or tighter ones
(int8 4e-5), again 0 of 1000 over. Retrained again (session 19): a quick run proposes float32
4e-5, int8 2e-5, 0 of 112 held-out over (docs/MODEL.md, "Limits"). Retrained again (session
23): the full run's largest honest float32 distance is 6.1e-6 (CPU baseline path), so 10x
would be 7e-5; 5e-5 is kept (8x that tail, 0 of 1000 held-out over, every cheat caught).

bfloat16 is path-bound (`path_bound`): it differs by up to 0.085 between the AVX-512-BF16 and
AVX2 code paths but is bit-exact across thread counts (1, 2, 4) and batches on one path, so a
bf16 node declares `bfloat16@<compute_path>` and is re-checked only on that path, with that
path's tolerance (same-path honest max 0; the floor is float32's 5e-5). CPU float16 likewise
(`float16@<compute_path>`): bit-exact across threads (1, 2, 4) and batches on one path, but
up to 4.2e-3 from the AVX2 path and 6.8e-3 from the baseline one (whose x_0 cast differs too),
and CPUs with native fp16 kernels (AVX512-FP16, AMX-FP16, Arm) take paths never run here;
every cheat caught at the policy's 7 of 8 steps. Measured on one path only, the
AVX-512-BF16 one of this tree's machine; a bare `bfloat16`/`float16` (an older node: path
unknown), either on any other path, CUDA float16 (`float16@cuda-...`), fp8 and compiled
pipelines are not measured (no GPU was lent): never step-checked (a sampled receipt gets
the whole re-render, `rerender_verify`), and a step verdict asked for anyway fails closed."""


SEED_TOLERANCE = 1e-6
"""Largest |leaf 0 - noise| / |noise| a seed check passes (`StepVerified.start_distance`).
The noise is drawn on the CPU in float32 and cast to the compute dtype on every device (the
verifier casts to the same declared mode), and leaf 0 stores those values exactly as float32,
so an honest leaf 0 regenerates bit for bit: measured 0.0 (tests/e2e/test_seed_check.py,
float32 on the CPU). Another seed's noise is independent: measured 1.37 to 1.39, about
sqrt(2). 1e-6 leaves room for a float32 rounding of a few values, none for another draw."""


def tolerance_for(dtype: str) -> float | None:
    """The tolerance for a declared mode, or None if that mode was never measured."""
    return TOLERANCES.get(dtype)


def path_bound(dtype: str) -> bool:
    """A declared mode that names its code path (`bfloat16@cpu-...`, `float16@cpu-...`): only
    a verifier on the same path may re-run it, since its numbers differ between paths beyond
    any useful tolerance."""
    return "@" in dtype


def can_verify(link: NodeLink, model_id: str, dtype: str | None) -> bool:
    """`link` serves `model_id` and can re-run a render declared in `dtype` (None: any mode).
    A path-bound mode needs a node advertising exactly that mode (`NodeLink.mode`); other
    modes need the same mode when the node advertises one (an older node advertises none and
    refuses a mode it does not run itself: `VerifyRefused` `mode`)."""
    if model_id not in link.models:
        return False
    if dtype is None:
        return True
    if path_bound(dtype):
        return link.mode == dtype
    return link.mode in ("", dtype)


def choose_verifier(
    nodes: Mapping[str, NodeLink],
    model_id: str,
    worker_wallet: str,
    rng: random.Random | None = None,
    exclude: Collection[str] = (),
    *,
    worker_payout: str | None = None,
    payer_accounts: Collection[str] = (),
    dtype: str | None = None,
    pixels: int = 0,
) -> str | None:
    """A connected node (peer id) that serves `model_id`, drawn at random, none of whose
    accounts (its wallet, its advertised payout address) is barred; None if there is none.
    `pixels`: the job's size; a node advertising a smaller `max_pixels` refuses the check
    (`too_large`), which counted as skipped, so a large job passed unchecked.
    With `dtype` (the worker's declared mode) only nodes that can re-run that mode
    (`can_verify`): for a path-bound mode, nodes declaring the very same mode and code path,
    required as a different wallet is, never merely preferred.

    Barred (any case): `worker_wallet`, `worker_payout` (the worker's payout account: an
    operator's containers share one and must not vouch for each other), `payer_accounts`
    (the job's payer and the accounts referral-linked to it, `Billing.payer_accounts`: a
    verifier is paid from the checked job's take, so a payer checking its own free Daily
    Boost jobs would turn the grant into its own earnings, and one checking its paid jobs
    could fail honest renders of them) and `exclude` (accounts: verifiers without standing,
    the first verifier's wallet and payout when a third node re-runs its step). The caller
    passes the payee its worker SIGNED into the receipt, never the payout the worker's node
    advertises: an advert costs nothing, so a cheater naming an honest operator's account
    there could bar that operator's nodes from checking it, while a receipt naming it pays
    that operator."""
    barred = {worker_wallet.lower(), *(a.lower() for a in exclude)}
    barred |= {a.lower() for a in payer_accounts}
    if worker_payout is not None:
        barred.add(worker_payout.lower())
    candidates = sorted(
        peer
        for peer, link in nodes.items()
        if can_verify(link, model_id, dtype)
        and link.accounts.isdisjoint(barred)
        and not (link.max_pixels and pixels > link.max_pixels)
    )
    if not candidates:
        return None
    return (rng or random.SystemRandom()).choice(candidates)


# --- the distance, without torch ---------------------------------------------------------
def _floats(tensor: TensorEntry) -> array[float]:
    """The entry's float32 little-endian bytes as floats."""
    values = array("f")
    values.frombytes(tensor.data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def normalised_distance(
    x_next: Iterable[float], x_pred: Iterable[float], x_k: Iterable[float], k_scale: float = 1.0
) -> float:
    """|x_next - x_pred| / |x_next - k_scale * x_k| in float64 (what
    `sogni_node.verify.step_check.normalised_distance` computes, over flat sequences of the
    same length). 0.0 when both norms are zero; inf when only the step is."""
    num = 0.0
    den = 0.0
    for a, p, b in zip(x_next, x_pred, x_k, strict=True):
        d = a - p
        num += d * d
        s = a - k_scale * b
        den += s * s
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num) / math.sqrt(den)


# --- the exchange ------------------------------------------------------------------------
@dataclass(frozen=True)
class StepVerdict:
    """The outcome of one re-run step: `passed` only when a verifier answered and the
    committed x_{k+1} lies within `tolerance` of its x'_{k+1}. A failure with `distance`
    None is inconclusive (no verifier, no answer, refused, malformed): `reason` says which."""

    verifier: str | None
    step: int
    distance: float | None
    tolerance: float
    passed: bool
    reason: str
    code: str | None = None
    """The verifier's refusal code (`VerifyRefused.code`; `bad_leaf` blames the worker's
    leaf), None when it did not refuse."""
    latents: TensorEntry | None = None
    """The verifier's x'_{k+1}, when it answered (kept as evidence of a failed check)."""
    rule: str | None = None
    """The image check's rule that decided (`image_verify.PIXELS_RULE`, `CODEC_RULE` or
    `BLOCK_RULE`); None for a step."""
    image: bytes | None = None
    """A re-render's PNG, when the verifier answered one (kept as a known render)."""
    seed_checked: bool = False
    """A re-render whose verifier also measured the worker's leaf 0 against the seed
    (`rerender_verify.rerender_on` with `start`): its pass vouches for that leaf."""


class PendingVerifications:
    """`VerifyStep`s sent and not yet answered, keyed by (verifier peer id, check id)
    (`pending_replies.PendingReplies`); the node session feeds it the verifiers' replies."""

    def __init__(self) -> None:
        answers = (StepVerified, DecodeVerified)
        self._pending: PendingReplies[StepVerified | DecodeVerified, VerifyRefused] = (
            PendingReplies(answers, VerifyRefused, "verifier", exclusive=False)
        )

    def __len__(self) -> int:
        return len(self._pending)

    async def ask(
        self,
        peer_id: str,
        outbox: trio.MemorySendChannel[Message],
        request: VerifyStep | VerifyDecode | VerifyRender,
        timeout: float,
    ) -> StepVerified | DecodeVerified | str:
        """Queue `request` on the verifier's stream and wait at most `timeout` seconds: its
        answer, or why there is none."""
        return await self._pending.ask(peer_id, request.check_id, outbox, request, timeout)

    async def ask_reply(
        self,
        peer_id: str,
        outbox: trio.MemorySendChannel[Message],
        request: VerifyStep | VerifyDecode | VerifyRender,
        timeout: float,
    ) -> StepVerified | DecodeVerified | VerifyRefused | str:
        """As `ask`, but a refusal comes back as the `VerifyRefused` (its `code` matters)."""
        return await self._pending.ask_reply(peer_id, request.check_id, outbox, request, timeout)

    async def ask_image(
        self,
        peer_id: str,
        outbox: trio.MemorySendChannel[Message],
        request: VerifyDecode | VerifyRender,
        timeout: float,
    ) -> DecodeVerified | tuple[str, str | None]:
        """`ask_reply` for a request answered by an image: the `DecodeVerified`, or why there
        is none and the refusal's code (None when the verifier did not refuse)."""
        reply = await self.ask_reply(peer_id, outbox, request, timeout)
        if isinstance(reply, str):
            return reply, None
        if isinstance(reply, VerifyRefused):
            return f"verifier refused: {reply.reason}", reply.code
        if not isinstance(reply, DecodeVerified):
            return "the verifier answered with a step", None
        return reply

    def answered(self, peer_id: str, reply: StepVerified | DecodeVerified | VerifyRefused) -> bool:
        """A verifier's reply; False (and ignored) if nothing of that node waits for it."""
        return self._pending.answered(peer_id, reply.check_id, reply)

    def node_left(self, peer_id: str, reason: str) -> None:
        """The verifier's stream ended: its open checks fail now, not at their deadline."""
        self._pending.node_left(peer_id, reason)


class _Dispatcher(Protocol):
    """What `verify_step` uses of `sogni_coordinator.dispatch.Dispatcher` (named here, not
    imported: the dispatcher imports this module)."""

    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...


async def verify_step(
    dispatcher: _Dispatcher,
    *,
    params: JobParams,
    scheduler: str,
    worker: str,
    opening_k: StepOpeningWire,
    opening_next: StepOpeningWire,
    dtype: str,
    timeout: float,
    rng: random.Random | None = None,
    exclude: Collection[str] = (),
    worker_payout: str | None = None,
    payer_accounts: Collection[str] = (),
    job: bytes | None = None,
) -> StepVerdict:
    """Re-run step k = `opening_k.step` (x_k -> x_{k+1}) on a node none of whose accounts is
    `worker` (the worker's wallet address), `worker_payout` (the receipt's payee), in
    `payer_accounts` (the job's payer and its referral links) or in `exclude`
    (`choose_verifier`), and compare with `opening_next` (leaf k + 1).

    Both openings must already have passed `challenges.check_answer` against the worker's
    receipt; `dtype` is the mode the worker declared (`RenderMeta.dtype`). `job`: the
    checked job's id, for the log lines (`step_verified`, `step_not_verified`)."""
    k = opening_k.step
    bad = _unfit(opening_k, opening_next, dtype)
    if bad is not None:
        return _not_verified(k, dtype, bad, job=job)
    peer = choose_verifier(
        dispatcher.nodes,
        params.model_id,
        worker,
        rng,
        exclude,
        worker_payout=worker_payout,
        payer_accounts=payer_accounts,
        dtype=dtype,
        pixels=params.width * params.height,
    )
    if peer is None:
        where = f" in {dtype}" if path_bound(dtype) else ""
        why = f"no verifier: no other wallet's node serves {params.model_id}{where}"
        return _not_verified(k, dtype, why, job=job)
    return await probe_step(
        dispatcher,
        peer,
        params=params,
        scheduler=scheduler,
        opening_k=opening_k,
        opening_next=opening_next,
        dtype=dtype,
        timeout=timeout,
        job=job,
    )


def _unfit(opening_k: StepOpeningWire, opening_next: StepOpeningWire, dtype: str) -> str | None:
    """Why these two leaves cannot be checked as a step at all (the worker's doing), or None."""
    k = opening_k.step
    if tolerance_for(dtype) is None:
        return f"no tolerance measured for the declared mode {dtype!r}"
    if opening_next.step != k + 1:
        return f"leaf {opening_next.step} does not follow leaf {k}"
    if opening_k.latents.shape != opening_next.latents.shape:
        return f"leaves {k} and {k + 1} differ in shape"
    return None


def _not_verified(
    k: int,
    dtype: str,
    reason: str,
    verifier: str | None = None,
    d: float | None = None,
    code: str | None = None,
    *,
    job: bytes | None = None,
    check: bytes | None = None,
) -> StepVerdict:
    tol = tolerance_for(dtype)
    log.info(
        "step_not_verified",
        job=None if job is None else short(job),
        check=None if check is None else short(check),
        step=k,
        verifier=verifier,
        reason=reason,
    )
    return StepVerdict(verifier, k, d, tol if tol is not None else 0.0, False, reason, code)


async def probe_step(
    dispatcher: _Dispatcher,
    peer: str,
    *,
    params: JobParams,
    scheduler: str,
    opening_k: StepOpeningWire,
    opening_next: StepOpeningWire,
    dtype: str,
    timeout: float,
    job: bytes | None = None,
) -> StepVerdict:
    """Ask verifier `peer` to re-run step k and measure its answer against `opening_next`.
    The request is the same for a real check and a known-answer probe (a fresh random
    `check_id` each time): the verifier cannot tell them apart. `job`: the checked job's
    id for the log lines (None: a known-answer probe); the check id is logged too, as the
    verifier node logs it."""
    k = opening_k.step
    tol = tolerance_for(dtype)
    bad = _unfit(opening_k, opening_next, dtype)
    if bad is not None or tol is None:
        return _not_verified(k, dtype, bad or "no tolerance", job=job)
    link = dispatcher.nodes.get(peer)
    if link is None:
        return _not_verified(k, dtype, "verifier not connected", peer, job=job)
    check_id = secrets.token_bytes(32)

    def fail(
        reason: str, verifier: str | None = None, d: float | None = None, code: str | None = None
    ) -> StepVerdict:
        return _not_verified(k, dtype, reason, verifier, d, code, job=job, check=check_id)

    x_k, x_next = opening_k.latents, opening_next.latents
    try:
        request = VerifyStep(
            check_id=check_id,
            model_id=params.model_id,
            params=params,
            scheduler=scheduler,
            dtype=dtype,
            k=k,
            opening=opening_k,
            deadline=int(time.time() + timeout) + 1,
        )
    except ValueError as exc:
        return fail(f"cannot ask for step {k}: {exc}")
    if len(encode(request)) > RESULT_FRAME_LIMIT:
        return fail("leaf k is too large to send")
    reply = await dispatcher.verifications.ask_reply(peer, link.outbox, request, timeout)
    if isinstance(reply, str):
        return fail(reply, peer)
    if isinstance(reply, VerifyRefused):
        return fail(f"verifier refused: {reply.reason}", peer, code=reply.code)
    if not isinstance(reply, StepVerified):
        return fail("the verifier answered a step with a decoded image", peer)
    if reply.latents.shape != x_next.shape:
        return fail(f"the verifier returned latents of shape {reply.latents.shape}", peer)
    scale = reply.x_k_scale if k == 0 else 1.0
    d = normalised_distance(_floats(x_next), _floats(reply.latents), _floats(x_k), scale)
    passed = d <= tol
    reason = (
        f"step {k}: d = {d:.3g} within {tol:g} ({dtype})"
        if passed
        else f"step {k}: d = {d:.3g} over {tol:g} ({dtype})"
    )
    log.info(
        "step_verified",
        job=None if job is None else short(job),
        check=short(request.check_id),
        step=k,
        verifier=peer,
        distance=d,
        passed=passed,
    )
    mine = reply.latents
    if passed and k == 0:  # the seed check (docs/VERIFICATION.md, "Seed check")
        d0 = reply.start_distance
        if d0 is None:
            return fail("the verifier did not compare leaf 0 with the seed's noise", peer)
        if d0 > SEED_TOLERANCE:
            reason = f"seed: leaf 0 is d0 = {d0:.3g} from the seed's noise, over {SEED_TOLERANCE:g}"
            log.info("seed_not_verified", verifier=peer, distance=d0)
            return StepVerdict(peer, k, d0, SEED_TOLERANCE, False, reason, latents=mine)
        reason += f"; seed: leaf 0 is the seed's noise (d0 = {d0:.3g})"
    return StepVerdict(peer, k, d, tol, passed, reason, latents=mine)
