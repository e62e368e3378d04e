"""Sampling, holding and consequences: a sampled receipt is paid only once it is verified.

Policy (`VerificationConfig`, the `[verification]` table): a full receipt is sampled with
probability `rate`, and always among its wallet's `first_jobs` receipts. Never sampled: a
partial receipt, a receipt committing to no trajectory (zero root), a scheduler or declared
numeric mode no verifier can re-run (`SUPPORTED_SCHEDULERS`, `verifiers.TOLERANCES`), and a
receipt for a job that was not plainly running on that node (a late receipt after a deadline,
a cancelled job): those are released as before.

Holding: the dispatcher stores a sampled receipt with a `pending` check (same transaction,
`Store.store_held_receipt`), writes the image to disk as always, but does not settle billing,
credit reputation, put the image in the client's mailbox, nor end the job (the client still
sees it rendering); the epoch settler skips pending receipts (`Store.unsettled_receipts`).
`Checks.run` (in the dispatcher's nursery) then runs one `_check` task per held receipt:

1. challenge the worker for `pairs` random step pairs (`challenges.choose_steps`), plus the
   pair (0, 1) when it was not drawn, and prove the answer against the receipt's root
   (`ChallengeResult.fault`);
2. re-run each drawn step on a node of another wallet (`verifiers.verify_step`); step 1's
   verifier also compares leaf 0 with the noise of the job's seed (the seed check), so a
   render of another seed, or an older job's trajectory replayed, fails.

Verdicts: `pass` (every step within tolerance): the check is marked passed, billing settles,
the image is delivered. `fail` (no or bad answer to the challenge, a step over tolerance): the
receipt moves to `failed_receipts` with the reason (evidence; the job may be receipted again),
the payer is charged nothing, the worker is struck (`Reputation.strike`; repeated strikes
blacklist), and the job is re-queued, offered to other wallets first
(`Dispatcher.excluded`). `skipped` (no other wallet's node serves the model, or the verifier
refused or did not answer: nothing the worker did): released as a pass; an honest node is
never refused for lack of verifiers. A verifier refusing because the worker's leaf cannot
be re-run (`LEAF_REJECTED`) is a fail.

Restart: a check still pending when the coordinator stopped fails closed in `restore`
("not verified before restart", no strike): the receipt becomes evidence and the job is
rendered again. Every check appends one JSON line to `data_dir/verifications.jsonl`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import trio

from sogni_coordinator.challenges import ChallengeResult, choose_steps
from sogni_coordinator.image_verify import verify_image
from sogni_coordinator.jobs import Job, NodeLink
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifiers import PendingVerifications, tolerance_for, verify_step
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import NO_TRAJECTORY, Receipt, RenderMeta

__all__ = ["SUPPORTED_SCHEDULERS", "Checks", "Held", "Outcome"]

log = get_logger(__name__)

SUPPORTED_SCHEDULERS = frozenset({"", "euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm"})
"""Schedulers a verifier can re-run a step of (docs/VERIFICATION.md; "" is the model's
default, which the verifier node rebuilds or refuses, a refusal counting as skipped)."""
RESTART_REASON = "not verified before restart"
LEAF_REJECTED = "could not re-run the step (ValueError)"
"""A verifier's refusal that blames the worker's leaf (`sogni_node.pull`: re-running it
raised ValueError: a latent of the wrong size, a multistep scheduler's committed state
missing, ...): a fail, as a step over tolerance. Other refusals (another numeric mode, the
model not loaded, a deadline) and silence say nothing about the worker: skipped."""


@dataclass(frozen=True)
class Held:
    """A receipt stored with a pending check, and what releasing it needs."""

    job: Job
    peer_id: str
    worker: str
    receipt: Receipt
    dtype: str
    path: Path
    elapsed: float
    budget: float


@dataclass(frozen=True)
class Outcome:
    """One check's verdict, as logged: `verdict` is `pass`, `fail` or `skipped`; `strike`
    whether the failure is the worker's doing."""

    verdict: str
    reason: str
    step: int | None = None
    verifier: str | None = None
    distance: float | None = None
    tolerance: float | None = None
    strike: bool = True
    evidence: bytes | None = None
    """For a fail: what the check saw (`Store.failed_evidence` keeps it for a dispute)."""


class _Dispatcher(Protocol):
    """What the checks use of `sogni_coordinator.dispatch.Dispatcher` (named here, not
    imported: the dispatcher imports this module)."""

    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...

    @property
    def store(self) -> Store: ...

    async def challenge(
        self, peer_id: str, job_id: bytes, steps: list[int], timeout: float
    ) -> ChallengeResult: ...

    async def check_passed(self, held: Held, verdict: str) -> None: ...

    async def check_failed(
        self, held: Held, reason: str, *, strike: bool, evidence: bytes | None = None
    ) -> None: ...


class Checks:
    """The policy, the held receipts' check tasks, and the verification log."""

    def __init__(
        self,
        dispatcher: _Dispatcher,
        policy: VerificationConfig | None = None,
        log_path: Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.policy = policy or VerificationConfig()
        self.log_path = log_path
        self._rng = rng or random.SystemRandom()
        self._send, self._recv = trio.open_memory_channel[Held](math.inf)
        self.pending: dict[bytes, Held] = {}
        """Held receipts by job id, until their check ends."""

    # --- policy --------------------------------------------------------------------------
    def sampled(self, job: Job, receipt: Receipt, meta: RenderMeta | None) -> bool:
        """Check this (verified, not yet stored) full receipt before releasing it?"""
        p = self.policy
        if not p.enabled or receipt.steps_done < job.params.steps:
            return False
        if receipt.trajectory_root == NO_TRAJECTORY:
            return False
        if job.params.scheduler not in SUPPORTED_SCHEDULERS:
            return False
        if meta is None or tolerance_for(meta.dtype) is None:
            return False  # an unmeasured mode would fail every honest check: not sampled
        if p.first_jobs and self.dispatcher.store.receipt_count(receipt.worker) < p.first_jobs:
            return True
        return p.rate >= 1.0 or self._rng.random() < p.rate

    # --- the tasks -----------------------------------------------------------------------
    def hold(self, held: Held) -> None:
        """Start checking a receipt the dispatcher just stored as pending."""
        self.pending[held.job.job_id] = held
        self._send.send_nowait(held)

    async def run(self) -> None:
        """One task per held receipt, in this nursery (the dispatcher's `run`)."""
        async with trio.open_nursery() as nursery:
            async for held in self._recv:
                nursery.start_soon(self._check, held)

    async def _check(self, held: Held) -> None:
        try:
            outcome = await self.verify(held)
        except Exception as exc:  # a bug here must not take the dispatcher down: fail closed
            log.exception("check_crashed", job=held.job.job_id.hex()[:16])
            outcome = Outcome("fail", f"check crashed: {exc}", strike=False)
        self.pending.pop(held.job.job_id, None)
        self.write_log(held.job.job_id, held.worker, outcome)
        if outcome.verdict == "fail":
            await self.dispatcher.check_failed(
                held, outcome.reason, strike=outcome.strike, evidence=outcome.evidence
            )
        else:
            await self.dispatcher.check_passed(held, outcome.verdict)

    async def verify(self, held: Held) -> Outcome:
        """Challenge the worker, prove its answer, re-run each drawn step elsewhere."""
        d, p, receipt = self.dispatcher, self.policy, held.receipt
        leaves = choose_steps(receipt.steps_done, p.pairs, self._rng, start=True, end=p.image_check)
        result = await d.challenge(held.peer_id, receipt.job_id, leaves, p.challenge_timeout)
        fault = result.fault(receipt)
        if fault is not None:
            gone = result.answer is None and fault == "node not connected"
            return Outcome("fail", f"challenge: {fault}", strike=not gone)
        assert result.answer is not None
        by_step = {o.step: o for o in result.answer.openings}
        drawn = [s for s in leaves if s >= 1 and s - 1 in by_step]
        last: Outcome | None = None
        for s in drawn:
            v = await verify_step(
                d,
                params=held.job.params,
                scheduler=held.job.params.scheduler,
                worker=held.worker,
                opening_k=by_step[s - 1],
                opening_next=by_step[s],
                dtype=held.dtype,
                timeout=p.verify_timeout,
                rng=self._rng,
            )
            link = d.nodes.get(v.verifier) if v.verifier is not None else None
            wallet = link.wallet if link is not None else v.verifier
            v = replace(v, verifier=wallet)  # the log names wallets: never the worker's
            if v.passed:
                last = Outcome("pass", v.reason, v.step, v.verifier, v.distance, v.tolerance)
            elif (
                v.distance is not None
                or (v.verifier is None and not v.reason.startswith("no verifier"))
                or LEAF_REJECTED in v.reason
            ):  # over tolerance, or the worker's own leaves do not make a step
                return Outcome("fail", v.reason, v.step, v.verifier, v.distance, v.tolerance)
            else:  # no other wallet, or the verifier refused or did not answer
                return Outcome(
                    "skipped", v.reason, v.step, v.verifier, v.distance, v.tolerance, False
                )
        if p.image_check and receipt.steps_done in by_step:
            image = await trio.to_thread.run_sync(held.path.read_bytes)
            v = await verify_image(
                d,
                params=held.job.params,
                worker=held.worker,
                final=by_step[receipt.steps_done],
                image=image,
                dtype=held.dtype,
                timeout=p.verify_timeout,
                rng=self._rng,
            )
            link = d.nodes.get(v.verifier) if v.verifier is not None else None
            v = replace(v, verifier=link.wallet if link is not None else v.verifier)
            if v.passed:
                last = last or Outcome(
                    "pass", v.reason, v.step, v.verifier, v.distance, v.tolerance
                )
            elif v.distance is not None or LEAF_REJECTED in v.reason:
                return Outcome("fail", v.reason, v.step, v.verifier, v.distance, v.tolerance)
        return last or Outcome("skipped", "no step pair drawn", strike=False)

    # --- the log -------------------------------------------------------------------------
    def write_log(self, job_id: bytes, worker: str, outcome: Outcome) -> None:
        """One JSON line per check (no prompt) in `verifications.jsonl`."""
        log.info(
            "receipt_checked",
            job=job_id.hex()[:16],
            worker=worker,
            verdict=outcome.verdict,
            reason=outcome.reason,
        )
        if self.log_path is None:
            return
        line = {
            "time": time.time(),
            "jobId": "0x" + job_id.hex(),
            "worker": worker,
            "verifier": outcome.verifier,
            "step": outcome.step,
            "distance": None
            if outcome.distance is None or math.isinf(outcome.distance)
            else outcome.distance,
            "tolerance": outcome.tolerance,
            "verdict": outcome.verdict,
            "reason": outcome.reason,
        }
        try:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("verification_log_failed", error=str(exc))
