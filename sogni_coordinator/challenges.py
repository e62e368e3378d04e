"""Challenges: ask a worker to reveal steps of the trajectory its receipt committed to.

Why: a receipt signs `trajectory_root`, the Merkle root over every latent of the render
(docs/TRAJECTORY.md). After the receipt is in, the coordinator draws a few steps at random and
asks the node that rendered the job to open them (`Challenge`); the node answers with the
committed entries and a Merkle proof for each (`ChallengeAnswer`), or says why it cannot
(`ChallengeRefused`). `check_answer` proves the revealed latents are the ones committed before
the node knew which steps would be asked. It does not prove they are the model's honest
steps: that is the verifier's re-render of step s from leaf s - 1
(`verifiers.verify_step`), which is why steps are drawn in pairs.

How many steps: a node that faked ``b`` of its ``n`` steps escapes ``k`` distinct uniformly
drawn steps with probability ``C(n - b, k) / C(n, k)`` (drawing without replacement, what
`draw_steps` does), which is at most ``(1 - f)^k`` for ``f = b / n``. `pairs_needed(f, p, n)`
is the smallest ``k`` that brings it to ``1 - p`` or below for every node faking at least a
fraction ``f`` (``b = ceil(f n)``): 7 of 8 steps and 12 of 30 for f = 0.25, p = 0.99. Without
``n`` it is the bound ``ceil(log(1 - p) / log(1 - f))`` (17 for the same f and p), which holds
for any length. One `Challenge` carries at most `MAX_CHALLENGE_STEPS` leaves, so a check that
needs more is sent as several challenges, one after another (`challenge_batches`).

The async half (`PendingChallenges`) pairs each answer with the challenge waiting for it; the
dispatcher owns one (`Dispatcher.challenge`), the node session feeds it the node's answers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import trio

from sogni_coordinator.pending_replies import PendingReplies
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    MAX_CHALLENGE_STEPS,
    NO_TRAJECTORY,
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    Message,
    Receipt,
    StepOpeningWire,
)
from sogni_protocol.trajectory import StepValue, TensorBytes, step_digest, verify_step

__all__ = [
    "MAX_PAIRS",
    "ChallengeResult",
    "PendingChallenges",
    "challenge_batches",
    "check_answer",
    "choose_steps",
    "draw_steps",
    "leaves_for",
    "opening_entries",
    "pairs_needed",
]

log = get_logger(__name__)

MAX_PAIRS = MAX_CHALLENGE_STEPS // 2
"""Most step pairs one `Challenge` can ask for."""


def pairs_needed(fraction: float, confidence: float, n_steps: int | None = None) -> int:
    """Steps to re-run so that a node faking at least `fraction` of its steps is caught with
    probability at least `confidence`. With `n_steps`, exact for distinct draws among that
    many steps (at most `n_steps`: all of them when fewer would not do); without, the bound
    ``ceil(log(1 - p) / log(1 - f))`` for any length. At least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if n_steps is not None:
        if n_steps < 1:
            raise ValueError("a render has at least one step")
        bad = max(1, math.ceil(fraction * n_steps - 1e-9))  # the fewest faked steps that count
        for k in range(1, n_steps + 1):
            if math.comb(n_steps - bad, k) / math.comb(n_steps, k) <= 1 - confidence + 1e-12:
                return k
        return n_steps
    if fraction == 1 or confidence == 0:
        return 1
    # the tiny epsilon keeps an exact k (e.g. f = 0.5, p = 0.75 -> 2) from rounding up to k + 1
    return max(1, math.ceil(math.log1p(-confidence) / math.log1p(-fraction) - 1e-9))


def draw_steps(
    n_steps: int, k: int, rng: random.Random | None = None, *, start: bool = False
) -> list[int]:
    """`k` distinct denoising steps (1..n_steps, capped at n_steps) drawn uniformly, sorted;
    with `start`, step 1 too (the seed check opens leaf 0) when it was not drawn. Draw after
    the receipt is in, from a source the node cannot predict (the default: the OS's)."""
    if n_steps < 1:
        raise ValueError("a render has at least one step")
    if k < 1:
        raise ValueError("draw at least one step")
    rng = rng or random.SystemRandom()
    drawn = set(rng.sample(range(1, n_steps + 1), min(k, n_steps)))
    return sorted(drawn | {1} if start else drawn)


def leaves_for(steps: list[int], n_steps: int, *, end: bool = False) -> list[int]:
    """The leaves to open to re-run `steps`: s - 1 and s for each (the verifier runs step s
    from leaf s - 1 and compares with leaf s), plus the final leaf with `end` (the image
    check, docs/IMAGE_CHECK.md). Sorted, no repeats."""
    opened = {leaf for s in steps for leaf in (s - 1, s)}
    return sorted(opened | {n_steps} if end else opened)


def challenge_batches(leaves: list[int]) -> list[list[int]]:
    """`leaves` cut into challenges of at most `MAX_CHALLENGE_STEPS` leaves each, in order."""
    return [leaves[i : i + MAX_CHALLENGE_STEPS] for i in range(0, len(leaves), MAX_CHALLENGE_STEPS)]


def choose_steps(
    n_steps: int,
    k: int,
    rng: random.Random | None = None,
    *,
    start: bool = False,
    end: bool = False,
) -> list[int]:
    """One challenge's leaves (at most `MAX_PAIRS` steps; `checks.Checks` uses `draw_steps`,
    `leaves_for` and `challenge_batches`, which have no cap) to re-run `k` distinct denoising
    steps of an `n_steps` render:
    for each drawn step s (1..n_steps) leaves s - 1 and s (the verifier runs step s from leaf
    s - 1 and compares with leaf s). Sorted, no repeats (adjacent pairs share a leaf). `k` is
    capped at `n_steps` and at `MAX_PAIRS`. Draw it after the receipt is in, from a source the
    node cannot predict (the default: the OS's).

    `start`: also ask for step 1 (leaves 0 and 1) when it was not drawn, so leaf 0 is opened
    and a verifier compares it with the seed's noise (docs/VERIFICATION.md, "Seed check").
    If that would exceed `MAX_CHALLENGE_STEPS` leaves, the last drawn step gives way.

    `end`: also ask for the final leaf (`n_steps`, the final latent), which a verifier
    decodes and compares with the delivered image (docs/IMAGE_CHECK.md)."""
    if n_steps < 1:
        raise ValueError("a render has at least one step")
    if k < 1:
        raise ValueError("draw at least one step")
    rng = rng or random.SystemRandom()
    drawn = rng.sample(range(1, n_steps + 1), min(k, n_steps, MAX_PAIRS))

    def leaves() -> list[int]:
        opened = {leaf for s in drawn for leaf in (s - 1, s)}
        return sorted(opened | {n_steps} if end else opened)

    if start and 1 not in drawn:
        drawn.append(1)
    keep = 1 if start else 0  # step 1 (the seed check) stays; others give way at random
    while len(leaves()) > MAX_CHALLENGE_STEPS and len(drawn) > keep + 1:
        del drawn[-2 if start and drawn[-1] == 1 else -1]
    return leaves()


def opening_entries(opening: StepOpeningWire) -> dict[str, StepValue]:
    """The revealed step as `sogni_protocol.trajectory` entries (ValueError if malformed)."""
    entries: dict[str, StepValue] = {s.name: s.value for s in opening.scalars}
    for t in opening.tensors:
        entries[t.name] = TensorBytes(t.dtype, tuple(t.shape), t.data)
    return entries


def check_answer(receipt: Receipt, challenge: Challenge, answer: ChallengeAnswer) -> str | None:
    """Why `answer` does not open `challenge` against `receipt.trajectory_root`, or None.

    Holds when the answer is for the receipt's job, opens exactly the asked steps, each in a
    tree of ``steps_done + 1`` leaves, and each revealed step's digest (recomputed from its
    entries) is that leaf of the committed root."""
    root = receipt.trajectory_root
    if root == NO_TRAJECTORY:
        return "the receipt commits to no trajectory"
    if not receipt.job_id == challenge.job_id == answer.job_id:
        return "the answer is for another job"
    opened = sorted(o.step for o in answer.openings)
    if opened != sorted(challenge.steps):
        return f"asked for steps {sorted(challenge.steps)}, opened {opened}"
    n_leaves = receipt.steps_done + 1
    for opening in answer.openings:
        if opening.n_leaves != n_leaves:
            return (
                f"step {opening.step}: a tree of {opening.n_leaves} leaves, the receipt's "
                f"{receipt.steps_done} steps make {n_leaves}"
            )
        try:
            digest = step_digest(opening_entries(opening))
        except (TypeError, ValueError) as exc:
            return f"step {opening.step}: malformed entries ({exc})"
        if not verify_step(root, opening.step, digest, opening.proof, n_leaves):
            return f"step {opening.step} does not match the committed trajectory root"
    return None


@dataclass(frozen=True)
class ChallengeResult:
    """What came back for `challenge`: the node's answer (not yet checked: `fault`), or why
    there is none (`refused`: the node's reason, no answer in time, the node left)."""

    challenge: Challenge
    answer: ChallengeAnswer | None = None
    refused: str | None = None

    def fault(self, receipt: Receipt) -> str | None:
        """Why the challenge failed (no answer counts as failed), or None if it passed."""
        if self.answer is None:
            return self.refused or "no answer"
        return check_answer(receipt, self.challenge, self.answer)


class PendingChallenges:
    """Challenges sent and not yet answered, keyed by (peer id, job id): one at a time per
    job and node (`pending_replies.PendingReplies`)."""

    def __init__(self) -> None:
        self._pending = PendingReplies(ChallengeAnswer, ChallengeRefused, "node", exclusive=True)

    def __len__(self) -> int:
        return len(self._pending)

    def open_to(self, peer_id: str) -> int:
        """Challenges waiting for `peer_id`'s answer (a "busy" refusal is believed only when
        there are many: `checks.BUSY_BELIEVED`)."""
        return self._pending.open_to(peer_id)

    async def ask(
        self,
        peer_id: str,
        outbox: trio.MemorySendChannel[Message],
        challenge: Challenge,
        timeout: float,
    ) -> ChallengeResult:
        """Queue `challenge` on the node's stream and wait at most `timeout` seconds."""
        reply = await self._pending.ask(peer_id, challenge.job_id, outbox, challenge, timeout)
        if isinstance(reply, str):
            return ChallengeResult(challenge, refused=reply)
        return ChallengeResult(challenge, answer=reply)

    def answered(self, peer_id: str, reply: ChallengeAnswer | ChallengeRefused) -> bool:
        """A node's reply; False (and ignored) if no challenge of this node waits for it."""
        return self._pending.answered(peer_id, reply.job_id, reply)

    def node_left(self, peer_id: str, reason: str) -> None:
        """The node's stream ended: its open challenges fail now, not at their deadline."""
        self._pending.node_left(peer_id, reason)
