"""The `[verification]` table of the coordinator config: which receipts are checked.

A sampled receipt is held (not billed, not delivered, not paid in an epoch) until a check
passes: the worker opens random step pairs of its committed trajectory (as many as
`steps_to_check` says) and a node of another wallet re-runs each step
(`sogni_coordinator.checks`, docs/VERIFICATION.md, "Sampling, holding and consequences").
`rate = 0` and `first_jobs = 0` (the defaults) turn checking off:
every receipt is released as before.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from sogni_coordinator.challenges import pairs_needed
from sogni_protocol.settings import Seconds

__all__ = ["VerificationConfig"]


class VerificationConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`[verification]`; env `SOGNI_COORDINATOR_VERIFICATION__<KEY>`."""

    rate: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    """Share of full receipts checked, drawn at random per receipt (0: none, 1: all)."""
    first_jobs: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    """Every one of a wallet's first N full receipts (as counted by this coordinator) is
    checked, whatever `rate` says."""
    catch_fraction: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.25
    """The detection floor's cheat: a worker faking at least this share of a job's steps
    (skipping them, or rendering them with another model) ..."""
    confidence: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.99
    """... is caught in at least this share of its checked jobs: each check re-runs
    `challenges.pairs_needed(catch_fraction, confidence, steps)` random steps (7 of 8 steps,
    12 of 30, for the defaults; every step of a job of 4 or fewer)."""
    pairs: Annotated[int, Meta(ge=0, le=10_000)] = 0
    """An explicit number of steps re-run per check (capped at the job's steps), overriding
    the floor above; 0 (the default): derived from `catch_fraction` and `confidence`."""
    challenge_timeout: Seconds = 30.0
    """Seconds the worker has to open the drawn steps."""
    verify_timeout: Seconds = 120.0
    """Seconds a verifier node has to re-run one step."""
    restart_recheck_timeout: Seconds = 900.0
    """After a coordinator restart, seconds a held receipt waits for its worker's node to
    reconnect so its check can run (the node keeps trajectories for
    `trajectory_retention_seconds`, 1 h by default); then it fails closed, without a strike."""
    rerender: bool = True
    """Check a sampled receipt the step checks cannot cover (a declared mode with no
    measured step tolerance, such as CUDA float16; no committed trajectory; a scheduler no
    verifier re-runs) by a whole re-render on a float32 node of another wallet
    (docs/VERIFICATION.md, "Whole re-render"). False: such receipts are released unchecked,
    and a node can escape every check by declaring such a mode."""
    image_check: bool = True
    """Also open the final latent and have a verifier decode it and compare with the
    delivered image (docs/IMAGE_CHECK.md)."""
    dispute_window: Annotated[float, Meta(ge=0.0, le=30 * 86_400.0)] = 0.0
    """Seconds a receipt waits after it is stored before an epoch may pay it: the time a
    worker, payer or verifier has to dispute it. A held receipt also waits for its check
    (counted from when it was stored, so a check longer than the window adds no wait)."""

    low_score_rate: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.5
    """Share of full receipts checked for a worker whose reputation score is below
    `low_score_below` (when checking is on at all: `rate` or `first_jobs`); the larger of
    this and `rate` applies."""
    low_score_below: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.3
    """The reputation score (`Reputation` record's `score`) under which a worker is a
    low-score worker."""
    probe_rate: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1
    """Share of verifier answers followed by a known-answer probe of the same verifier
    (`known_answers.py`); a wrong probe answer costs the verifier its standing."""
    probe_pool: Annotated[int, Meta(ge=0, le=10_000)] = 64
    """Known answers kept per (model, declared mode), in memory."""
    standing_lost_for: Annotated[float, Meta(ge=0.0, le=365 * 86_400.0)] = 86_400.0
    """Seconds a verifier without standing is not asked to verify."""

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.first_jobs > 0

    def steps_to_check(self, n_steps: int) -> int:
        """Random steps a check of an `n_steps` job re-runs (step 1, the seed check, is
        re-run besides when it is not drawn)."""
        if self.pairs:
            return min(self.pairs, n_steps)
        return pairs_needed(self.catch_fraction, self.confidence, n_steps)
