"""Sampling, holding and consequences: a sampled receipt is paid only once it is verified.

Policy (`VerificationConfig`, the `[verification]` table): a full receipt is sampled with
probability `rate`, and always among its wallet's `first_jobs` receipts. Never sampled: a
partial receipt. A late receipt for a job back in the queue that its draw says to check is
not taken (`JobGone`: the queue may offer the job again); a cancelled job's full receipt is
held with its cancel (`checks.cancelled`), paid only if its check passes. A receipt the step
checks cannot cover (`step_checkable`: no trajectory committed, a scheduler or declared
numeric mode no verifier can re-run a step of, `SUPPORTED_SCHEDULERS`,
`verifiers.TOLERANCES`) is checked by a whole re-render instead (`rerender_verify`; off with
`rerender = false`: then released unchecked), so declaring an unmeasured mode buys no
escape.

Holding: the dispatcher stores a sampled receipt with a `pending` check (same transaction,
`Store.store_held_receipt`), writes the image to disk as always, but does not settle billing,
credit reputation, put the image in the client's mailbox, nor end the job (the client still
sees it rendering); the epoch settler skips pending receipts (`Store.unsettled_receipts`).
`Checks.run` (in the dispatcher's nursery) then runs one `_check` task per held receipt:

1. draw `policy.steps_to_check(n)` random steps (`challenges.draw_steps`: enough that a
   worker faking `catch_fraction` of its steps is caught with probability `confidence`),
   plus step 1 when it was not drawn; challenge the worker for leaves s - 1 and s of each
   (and the final leaf for the image check), in as many challenges as the leaves need
   (`challenge_batches`), and prove each answer against the receipt's root
   (`ChallengeResult.fault`);
2. re-run each drawn step on a node of another wallet (`verifiers.verify_step`); step 1's
   verifier also compares leaf 0 with the noise of the job's seed (the seed check), so a
   render of another seed, or an older job's trajectory replayed, fails.

Verdicts: `pass` (every step within tolerance): the check is marked passed, billing settles,
the image is delivered. `fail` (no or bad answer to the challenge, a step over tolerance,
confirmed): the receipt moves to `failed_receipts` with the reason and `evidence`
(`evidence.py`), the payer is charged nothing, the worker is struck (`Reputation.strike`;
repeated strikes blacklist), and the job is re-queued, offered to other wallets first
(`Dispatcher.excluded`). `skipped` (no other wallet's node serves the model, or the verifier
refused or did not answer: nothing the worker did): released as a pass; an honest node is
never refused for lack of verifiers. A refusal with code `bad_leaf` (the worker's leaf
cannot be re-run) counts as over tolerance.

Checking the verifiers (docs/VERIFICATION.md, "Checking the verifiers"): a step over
tolerance is re-run on a node of a third wallet before it is held against the worker. The
third agrees: the fail stands. It passes: the first verifier loses standing
(`verifier_standing.py`), its answers in this check are discarded and the step counts as
passed. No third answer: the first verifier gets a known-answer probe (`known_answers.py`);
a wrong probe answer costs it its standing (and the step is asked elsewhere, or skipped),
a right one (or no probe at all) lets the fail stand. Verifier answers are also probed at
`probe_rate`. Every verifier answer a verdict rests on is recorded for pay
(`Store.record_verifier_work`, at the verifier's payout account, else its wallet); passed
steps feed the known-answer pool. A verifier is never of the worker's wallet or payout
account (nor, for a third node, of the first verifier's), by either of its own.

Restart: a check still pending when the coordinator stopped is handed back by
`Dispatcher.restore` (`Held.reconnect_within`): it waits for the node that rendered the job
(it keeps the trajectory) and a verifier to reconnect, then runs; if the node does not come
back within `restart_recheck_timeout`, or cannot open its trajectory, it fails closed ("not
verified before restart: ...", no strike) and the job is rendered again. Every check appends
one JSON line to `data_dir/verifications.jsonl`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec
import trio

from sogni_coordinator.challenges import (
    ChallengeResult,
    PendingChallenges,
    challenge_batches,
    draw_steps,
    leaves_for,
)
from sogni_coordinator.evidence import Evidence, StepEvidence, VerifierAnswer, encode_evidence
from sogni_coordinator.image_verify import verify_image
from sogni_coordinator.jobs import Job, NodeLink
from sogni_coordinator.known_answers import (
    KNOWN_RENDER_MAX_BYTES,
    KNOWN_RENDERS_PER_KEY,
    KnownAnswer,
    KnownAnswers,
    KnownRender,
)
from sogni_coordinator.reputation import STRIKE_WINDOW, Reputation
from sogni_coordinator.rerender_verify import (
    REFERENCE_MODE,
    can_rerender,
    rerender_on,
    rerender_weights,
    seed_checkers,
    verify_rerender,
)
from sogni_coordinator.results import ResultKey, ResultStore
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifier_standing import VerifierStanding
from sogni_coordinator.verifiers import (
    PendingVerifications,
    StepVerdict,
    can_verify,
    choose_verifier,
    probe_step,
    tolerance_for,
    verify_step,
)
from sogni_protocol.image_encoding import LOSSY_FORMATS
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    CHALLENGE_BUSY,
    MAX_CHALLENGE_STEPS,
    NO_TRAJECTORY,
    OPEN_PIXELS_FEATURE,
    ChallengeAnswer,
    PixelsOpening,
    Receipt,
    RenderMeta,
    StepOpeningWire,
    TensorEntry,
)

if TYPE_CHECKING:
    from sogni_coordinator.billing import Billing

__all__ = ["SUPPORTED_SCHEDULERS", "Checks", "Held", "Outcome"]

log = get_logger(__name__)

SUPPORTED_SCHEDULERS = frozenset({"", "euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm"})
"""Schedulers a verifier can re-run a step of (docs/VERIFICATION.md; "" is the model's
default, which the verifier node rebuilds or refuses, a refusal counting as skipped)."""
RESTART_REASON = "not verified before restart"
BUSY_RETRY = 1.0
"""Seconds before a challenge a node refused as busy (`CHALLENGE_BUSY`) is asked again."""
BUSY_BELIEVED = 16
"""Challenges this coordinator must have open to the node for its "busy" to be believed (a
node refuses past 64 held: `sogni_node.pull.MAX_CHALLENGES_WAITING`). Fewer: an ordinary
refusal, struck, or a cheater would say "busy" to every check it cannot pass."""
OVERRULED = "overruled a verifier's fail"
"""In a verdict's reason: a third wallet passed a step a verifier had failed."""
PROBE_FAILED = "a verifier failed a known-answer probe"
"""In a verdict's reason: a verifier's answer was discarded after a wrong probe answer."""
BAD_LEAF = "bad_leaf"
"""The refusal code (`VerifyRefused.code`) that blames the worker's leaf (`sogni_node.pull`:
re-running it raised ValueError: a latent of the wrong size, a multistep scheduler's
committed state missing, ...): a fail, as a step over tolerance. Other codes (another
numeric mode, the model not loaded, a deadline) and silence say nothing about the worker:
skipped."""


RENDER = "render"
"""The kind of a whole re-render's verdict (`StepEvidence.kind`, `_Run.used`)."""


def step_checkable(job: Job, receipt: Receipt, dtype: str) -> bool:
    """The step checks cover this receipt: it commits a trajectory, of a scheduler a
    verifier re-runs, in a declared mode whose step tolerance was measured. Otherwise its
    check is a whole re-render (`rerender_verify`; docs/VERIFICATION.md, "Whole re-render")."""
    return (
        receipt.trajectory_root != NO_TRAJECTORY
        and job.params.scheduler in SUPPORTED_SCHEDULERS
        and tolerance_for(dtype) is not None
    )


@dataclass(frozen=True)
class Held:
    """A receipt stored with a pending check, and what releasing it needs."""

    job: Job
    peer_id: str
    worker: str
    receipt: Receipt
    dtype: str
    path: ResultKey
    """Its image in the result store (`Dispatcher.results`)."""
    elapsed: float
    budget: float
    reconnect_within: float | None = None
    """Restored after a restart: seconds to wait for node `peer_id` (of `worker`'s wallet)
    to reconnect before checking; it never does, or cannot open its trajectory: the check
    fails closed, without a strike. None: held by this run, its node connected."""


AWAY_FORGIVEN = 3
"""Challenges a wallet may lose with its stream within `STRIKE_WINDOW` without a strike."""


def _away(refused: str) -> bool:
    """A challenge that never reached its node, or whose node left before answering (its
    stream dropped or was replaced, its outbox full): not the node's lie. It is asked again
    if the node comes back before the deadline, else the check fails unpaid, unstruck."""
    return (
        refused == "node not connected"
        or refused.startswith("node left: ")
        or refused in ("the node is gone", "the node's outbox is full")
    )


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
    rule: str | None = None
    """The image check's rule when it decided (`image_verify.PIXELS_RULE`/`CODEC_RULE`/
    `BLOCK_RULE`)."""


@dataclass(frozen=True)
class _Answer:
    """One verifier's verdict (`verifier` its wallet), the peer that gave it, and the
    account its work is paid to (its advertised payout address at the time, else its
    wallet; None when nobody answered, or its node left before it was looked up:
    such an answer is not paid, as no account is known for it)."""

    verdict: StepVerdict
    peer: str | None
    payee: str | None = None

    @property
    def wallet(self) -> str | None:
        return self.verdict.verifier

    @property
    def accounts(self) -> frozenset[str]:
        """Its wallet and payout account, lowercase: a third node may be neither."""
        return frozenset(a.lower() for a in (self.wallet, self.payee) if a is not None)

    @property
    def answered(self) -> bool:
        """The verifier answered (or refused with a code): its word can be probed."""
        v = self.verdict
        return self.peer is not None and (v.distance is not None or v.code is not None)

    def outcome(self, verdict: str, *, strike: bool = True) -> Outcome:
        v = self.verdict
        return Outcome(
            verdict, v.reason, v.step, v.verifier, v.distance, v.tolerance, strike, rule=v.rule
        )

    def evidence(self) -> VerifierAnswer:
        v = self.verdict
        return VerifierAnswer(
            verifier=v.verifier,
            distance=v.distance,
            tolerance=v.tolerance,
            passed=v.passed,
            reason=v.reason,
            code=v.code,
            latents=v.latents,
        )


@dataclass
class _Run:
    """One check under way: the opened leaves and what the verdict rests on so far."""

    held: Held
    by_step: dict[int, StepOpeningWire]
    pixels: PixelsOpening | None = None
    """The lossy image's pixels, when the worker was asked and opened them."""
    image_rule: str | None = None
    """The rule the image check passed by (logged with the check's verdict)."""
    used: list[tuple[str | None, int, str]] = field(default_factory=list)
    """(verifier wallet, step k or the final leaf, "step"/"image") per answer relied on."""
    payees: dict[str, str] = field(default_factory=dict)
    """Verifier wallet (lowercase) -> the account its work is paid to, as it was when it
    answered (its payout address, else its wallet)."""
    discarded: frozenset[str] = frozenset()
    """Wallets (lowercase) whose answers this check no longer believes."""
    evidence: list[StepEvidence] = field(default_factory=list)
    last: Outcome | None = None
    notes: list[str] = field(default_factory=list)
    """What happened to verifiers in this check, for the verdict's reason."""

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def use(self, answer: _Answer, step: int, kind: str) -> None:
        """Rely on `answer` for `step`: it is paid, at the payee it had when it answered."""
        self.used.append((answer.wallet, step, kind))
        if answer.wallet is not None and answer.payee is not None:
            self.payees[answer.wallet.lower()] = answer.payee


@dataclass(frozen=True)
class _Decided:
    outcome: Outcome
    requeue: list[int]
    """Steps k whose earlier pass was discarded (their verifier lost standing)."""


def _evidence_openings(run: _Run) -> list[StepOpeningWire]:
    """The opened leaves a fail's evidence keeps: all of them when one challenge's worth,
    else those the failed steps rest on (leaf k and k + 1 of a step, the final leaf of the
    image check), so the evidence stays one valid `ChallengeAnswer`."""
    if len(run.by_step) <= MAX_CHALLENGE_STEPS:
        return [run.by_step[k] for k in sorted(run.by_step)]
    wanted = {e.step + j for e in run.evidence for j in ((0, 1) if e.kind == "step" else (0,))}
    return [run.by_step[k] for k in sorted(wanted) if k in run.by_step][:MAX_CHALLENGE_STEPS]


_Ask = Callable[[frozenset[str]], Awaitable[StepVerdict]]
"""Ask one verifier, not of these wallets, for a verdict (a step re-run, an image check)."""


def _against_worker(v: StepVerdict) -> bool:
    """The verdict holds the step against the worker: over tolerance, or `bad_leaf`."""
    return not v.passed and (v.distance is not None or v.code == BAD_LEAF)


@dataclass(frozen=True)
class _Without:
    """The dispatcher's nodes less some wallets, for `verify_image` (which draws its own
    verifier): so the image check, too, never asks a verifier without standing."""

    _d: _Dispatcher
    _exclude: frozenset[str]
    """Accounts (wallets or payout addresses): a node with either among them is left out."""

    @property
    def nodes(self) -> Mapping[str, NodeLink]:
        barred = {w.lower() for w in self._exclude}
        return {p: link for p, link in self._d.nodes.items() if link.accounts.isdisjoint(barred)}

    @property
    def verifications(self) -> PendingVerifications:
        return self._d.verifications


class _Dispatcher(Protocol):
    """What the checks use of `sogni_coordinator.dispatch.Dispatcher` (named here, not
    imported: the dispatcher imports this module)."""

    @property
    def nodes(self) -> Mapping[str, NodeLink]: ...

    @property
    def verifications(self) -> PendingVerifications: ...

    @property
    def challenges(self) -> PendingChallenges: ...

    @property
    def store(self) -> Store: ...

    @property
    def reputation(self) -> Reputation: ...

    @property
    def results(self) -> ResultStore: ...

    @property
    def prompt_retention(self) -> float: ...

    @property
    def billing(self) -> Billing | None: ...

    async def challenge(
        self, peer_id: str, job_id: bytes, steps: list[int], timeout: float, pixels: bool = False
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dispatcher = dispatcher
        self.policy = policy or VerificationConfig()
        self.log_path = log_path
        self._rng = rng or random.SystemRandom()
        self._clock = clock
        retention = dispatcher.prompt_retention  # an answer holds its job's prompt
        self.known = KnownAnswers[KnownAnswer](self.policy.probe_pool, max_age=retention)
        """Steps whose answer is known, to probe verifiers with (in memory)."""
        self.known_renders = KnownAnswers[KnownRender](
            min(self.policy.probe_pool, KNOWN_RENDERS_PER_KEY), max_age=retention
        )
        """Passed re-renders, to probe re-render verifiers with (in memory)."""
        self.standing = VerifierStanding(self.policy.standing_lost_for, clock)
        """Verifiers caught answering wrongly, not asked for a while."""
        self._joined = trio.Event()
        """Set (and replaced) whenever a node joins: checks restored after a restart wait on
        it for their node."""
        self._away_at: dict[str, list[float]] = {}
        """Wallet -> when its challenges were lost with its stream (`_away`), in the last
        `STRIKE_WINDOW`: past `AWAY_FORGIVEN` of them, one more is struck."""
        self._send, self._recv = trio.open_memory_channel[Held](math.inf)
        self.pending: dict[bytes, Held] = {}
        """Held receipts by job id, until their check ends."""

    # --- policy --------------------------------------------------------------------------
    def sampled(self, job: Job, receipt: Receipt, meta: RenderMeta | None) -> bool:
        """Check this (verified, not yet stored) full receipt before releasing it?"""
        p = self.policy
        if not p.enabled or receipt.steps_done < job.params.steps:
            return False
        dtype = meta.dtype if meta is not None else ""
        if not step_checkable(job, receipt, dtype) and not p.rerender:
            return False  # released unchecked, as before the whole re-render existed
        if p.first_jobs and self.dispatcher.store.receipt_count(receipt.worker) < p.first_jobs:
            return True
        rate = p.rate
        if p.low_score_rate > rate and self._low_score(receipt.worker):
            rate = p.low_score_rate
        return rate >= 1.0 or self._rng.random() < rate

    def _low_score(self, wallet: str) -> bool:
        """The worker's reputation score (with its live connection, if any) is below
        `low_score_below`."""
        since = [
            link.connected_at
            for link in self.dispatcher.nodes.values()
            if link.wallet.lower() == wallet.lower()
        ]
        score = self.dispatcher.reputation.get(wallet).score(
            self._clock(), min(since) if since else None
        )
        return score < self.policy.low_score_below

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

    def node_joined(self) -> None:
        """A node joined (`Dispatcher.node_joined`): wake the checks waiting for theirs."""
        joined, self._joined = self._joined, trio.Event()
        joined.set()

    def _connected(self, held: Held) -> bool:
        """The node that rendered `held` is connected (a re-render needs nothing of it), and
        (after a restart verifiers come back too) some node of another wallet that can check
        it (re-run its steps, or render it again) and has standing."""
        rerender = not step_checkable(held.job, held.receipt, held.dtype)
        link = self.dispatcher.nodes.get(held.peer_id)
        if not rerender and (link is None or link.wallet.lower() != held.worker.lower()):
            return False
        barred = self.standing.without() | {held.worker.lower(), held.receipt.payee.lower()}
        barred |= self._payers(held)
        model = held.job.params.model_id
        return any(
            (
                can_rerender(other, model, rerender_weights(held.dtype))
                if rerender
                else can_verify(other, model, held.dtype)
            )
            and other.accounts.isdisjoint(barred)
            for other in self.dispatcher.nodes.values()
        )

    def _payers(self, held: Held) -> frozenset[str]:
        """The accounts that paid for `held`'s request (`Billing.payer_accounts`): none of
        them may check it (a payer would be paid from its take, free Daily Boost work
        included, and could fail honest renders of its own jobs)."""
        billing = self.dispatcher.billing
        return frozenset() if billing is None else billing.payer_accounts(held.job.request_id)

    def _forgiven(self, wallet: str) -> bool:
        """This challenge lost with the worker's stream goes unstruck unless `AWAY_FORGIVEN`
        others did within `STRIKE_WINDOW`: a cheater could otherwise drop its connection at
        every challenge it cannot pass and never be struck (it only lost that job's pay)."""
        now = time.time()
        recent = [t for t in self._away_at.get(wallet.lower(), []) if now - t < STRIKE_WINDOW]
        recent.append(now)
        self._away_at[wallet.lower()] = recent[-(AWAY_FORGIVEN + 1) :]
        if len(self._away_at) > 10_000:  # bounded: the oldest wallets' counts go first
            del self._away_at[next(iter(self._away_at))]
        return len(recent) <= AWAY_FORGIVEN

    async def _back(self, held: Held, asked: object, deadline: float) -> bool:
        """Wait until `deadline` (trio time) for node `held.peer_id`, of the worker's wallet,
        on another stream than `asked` (the one whose challenge was lost with it)."""
        with trio.move_on_at(deadline):
            while True:
                link = self.dispatcher.nodes.get(held.peer_id)
                if link is not None and link is not asked:
                    return link.wallet.lower() == held.worker.lower()
                await self._joined.wait()
        return False

    async def _reconnected(self, held: Held) -> Outcome | None:
        """Wait (at most `reconnect_within` s) for the node that rendered a receipt held
        across a restart, and a verifier; None once they are connected (or the node is and
        no verifier came back: the check then runs and is skipped, as any without one),
        else the fail-closed outcome."""
        wait = held.reconnect_within
        if wait is None:
            return None
        with trio.move_on_after(wait):
            while not self._connected(held):
                await self._joined.wait()
            return None
        if not step_checkable(held.job, held.receipt, held.dtype):
            return None  # a re-render needs no worker: run it (skipped with no verifier)
        link = self.dispatcher.nodes.get(held.peer_id)
        if link is not None and link.wallet.lower() == held.worker.lower():
            return None
        reason = f"{RESTART_REASON}: its node did not reconnect within {wait:g} s"
        return Outcome("fail", reason, strike=False)

    async def _check(self, held: Held) -> None:
        try:
            outcome = await self._reconnected(held) or await self.verify(held)
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
        """Challenge the worker, prove its answers, re-run each drawn step elsewhere; or,
        for a receipt no step check covers, render the whole job again elsewhere."""
        if not step_checkable(held.job, held.receipt, held.dtype):
            return await self._verify_rerender(held)
        p, receipt = self.policy, held.receipt
        n = receipt.steps_done
        drawn = draw_steps(n, p.steps_to_check(n), self._rng, start=True)
        opened = await self._open(held, leaves_for(drawn, n, end=p.image_check))
        if isinstance(opened, Outcome):
            return opened
        openings, pixels = opened
        run = _Run(held, {o.step: o for o in openings}, pixels)
        outcome = await self._verify_steps(run, drawn)
        if outcome is None and p.image_check and n in run.by_step:
            outcome, again = await self._verify_image(run)
            if outcome is None and again:  # its verifier lost standing: its steps are re-run
                outcome = await self._verify_steps(run, [k + 1 for k in again])
        outcome = outcome or run.last or Outcome("skipped", "no step pair drawn", strike=False)
        if outcome.rule is None and run.image_rule is not None:
            outcome = replace(outcome, rule=run.image_rule)
        if outcome.verdict == "fail":
            answer = ChallengeAnswer(
                job_id=receipt.job_id,
                openings=_evidence_openings(run),
                pixels=run.pixels if run.pixels is not None else msgspec.UNSET,
            )
            ev = Evidence(reason=outcome.reason, challenge=answer, steps=run.evidence)
            outcome = replace(outcome, evidence=encode_evidence(ev))
        elif outcome.verdict == "pass":
            self._remember(run)
        extra = [n for n in run.notes if n not in outcome.reason]
        if extra and outcome.verdict != "fail":
            outcome = replace(outcome, reason="; ".join([outcome.reason, *extra]))
        await self._record_work(run)
        return outcome

    async def _verify_rerender(self, held: Held) -> Outcome:
        """The whole re-render (`rerender_verify`), decided as a step is: a third wallet
        re-renders before a fail stands, a verifier it overrules loses standing."""
        d, receipt = self.dispatcher, held.receipt
        stored = await d.results.get(held.path)
        if stored is None:
            raise OSError(f"result store: the held image {held.path.name} is gone")
        image, n = stored.image, receipt.steps_done
        start: TensorEntry | None = None
        opened: list[StepOpeningWire] = []
        if self._seed_checkable(held):  # the seed check: leaf 0, proved, to the verifier
            leaf0 = await self._open(held, [0])
            if isinstance(leaf0, Outcome):
                return leaf0
            opened = leaf0[0]
            start = opened[0].latents
        run = _Run(held, {o.step: o for o in opened})
        answers: dict[str, StepVerdict] = {}
        """Each verifier's latest answer, by wallet (`_asked` names them so)."""

        async def ask(exclude: frozenset[str]) -> StepVerdict:
            v = await verify_rerender(
                d,
                params=held.job.params,
                dtype=held.dtype,
                worker=held.worker,
                worker_payout=receipt.payee,
                image=image,
                step=n,
                timeout=self.policy.verify_timeout + held.budget,
                rng=self._rng,
                exclude=exclude,
                start=start,
            )
            link = self.dispatcher.nodes.get(v.verifier) if v.verifier is not None else None
            if link is not None:
                answers[link.wallet.lower()] = v
            return v

        outcome = (await self._decide(run, n, RENDER, ask)).outcome
        if outcome.verdict == "fail":
            answer = ChallengeAnswer(job_id=receipt.job_id, openings=opened) if opened else None
            ev = Evidence(reason=outcome.reason, challenge=answer, steps=run.evidence)
            outcome = replace(outcome, evidence=encode_evidence(ev))
        elif outcome.verdict == "pass":
            self._remember_render(run, answers)
        extra = [note for note in run.notes if note not in outcome.reason]
        if extra and outcome.verdict != "fail":
            outcome = replace(outcome, reason="; ".join([outcome.reason, *extra]))
        await self._record_work(run)
        return outcome

    def _seed_checkable(self, held: Held) -> bool:
        """Open the worker's leaf 0 for a re-render: it committed a trajectory and a node of
        another account can re-render with the seed check (`RERENDER_SEED_FEATURE`)."""
        if held.receipt.trajectory_root == NO_TRAJECTORY:
            return False
        pool = seed_checkers(
            self.dispatcher.nodes,
            held.job.params.model_id,
            rerender_weights(held.dtype),
            held.worker,
            worker_payout=held.receipt.payee,
            pixels=held.job.params.width * held.job.params.height,
        )
        return pool is not None

    def _asks_pixels(self, held: Held) -> bool:
        """Ask the worker to open its lossy image's pixels with the final leaf (the image
        check's pixels rule): only a node that names `OPEN_PIXELS_FEATURE` understands it."""
        link = self.dispatcher.nodes.get(held.peer_id)
        return (
            self.policy.image_check
            and held.job.params.output_format in LOSSY_FORMATS
            and link is not None
            and OPEN_PIXELS_FEATURE in link.features
        )

    async def _open(
        self, held: Held, leaves: list[int]
    ) -> tuple[list[StepOpeningWire], PixelsOpening | None] | Outcome:
        """Have the worker open `leaves`, one challenge after another (each at most
        `MAX_CHALLENGE_STEPS` leaves), each answer proved against the receipt's root; the
        openings and the opened pixels (when asked for and given), or the failed outcome of
        the first challenge that failed."""
        d, receipt = self.dispatcher, held.receipt
        openings: list[StepOpeningWire] = []
        pixels: PixelsOpening | None = None
        asks_pixels = self._asks_pixels(held)
        for batch in challenge_batches(leaves):
            with_pixels = asks_pixels and receipt.steps_done in batch
            deadline = trio.current_time() + self.policy.challenge_timeout
            while True:  # "busy", when believable: asked again until the deadline
                asked = d.nodes.get(held.peer_id)
                result = await d.challenge(
                    held.peer_id,
                    receipt.job_id,
                    batch,
                    max(0.1, deadline - trio.current_time()),
                    pixels=with_pixels,
                )
                refused = result.refused or ""  # `PendingReplies` words it "node refused: ..."
                lost = result.answer is None and _away(refused)
                if lost and await self._back(held, asked, deadline):
                    continue  # it reconnected (it keeps its trajectory): asked again
                crowded = d.challenges.open_to(held.peer_id) + 1 >= BUSY_BELIEVED  # + this
                busy = (
                    crowded
                    and result.answer is None
                    and refused.startswith(f"node refused: {CHALLENGE_BUSY}")
                )
                if not busy or trio.current_time() + BUSY_RETRY >= deadline:
                    break
                await trio.sleep(BUSY_RETRY)
            fault = result.fault(receipt)
            if fault is not None:
                restored = held.reconnect_within is not None
                # no answer: not struck when the node left, or lost its trajectory in the
                # restart (it kept it for `trajectory_retention_seconds` only), or was busy
                # to the end (not paid either way: nothing is released unchecked)
                away = result.answer is None and _away(refused)
                gone = (away and self._forgiven(held.worker)) or (
                    result.answer is None and (restored or busy)
                )
                reason = f"challenge: {fault}"
                if gone and restored:
                    reason = f"{RESTART_REASON}: {reason}"
                ev = Evidence(
                    reason=reason, challenge=result.answer, challenge_refused=result.refused
                )
                return Outcome("fail", reason, strike=not gone, evidence=encode_evidence(ev))
            assert result.answer is not None
            openings += result.answer.openings
            given = result.answer.pixels
            if with_pixels and isinstance(given, PixelsOpening):
                pixels = given
        return openings, pixels

    # --- one check's steps ---------------------------------------------------------------
    async def _verify_steps(self, run: _Run, drawn: list[int]) -> Outcome | None:
        """Each drawn step, in order (step 1 first: the seed check); a step whose answer is
        discarded (its verifier lost standing) is asked again. An outcome that ends the
        check (fail, skipped), or None when every step passed."""
        todo = sorted(drawn)
        while todo:
            s = todo.pop(0)
            ok = run.by_step[s - 1]
            ask = self._step_asker(run, ok, run.by_step[s])
            decided = await self._decide(run, ok.step, "step", ask)
            for again in decided.requeue:
                if again + 1 not in todo:
                    todo.append(again + 1)  # `passed` holds k; the drawn step is k + 1
            todo.sort()
            if decided.outcome.verdict != "pass":
                return decided.outcome
            run.last = decided.outcome
        return None

    def _step_asker(self, run: _Run, ok: StepOpeningWire, nxt: StepOpeningWire) -> _Ask:
        held, params = run.held, run.held.job.params

        async def ask(exclude: frozenset[str]) -> StepVerdict:
            return await verify_step(
                self.dispatcher,
                params=params,
                scheduler=params.scheduler,
                worker=held.worker,
                opening_k=ok,
                opening_next=nxt,
                dtype=held.dtype,
                timeout=self.policy.verify_timeout,
                rng=self._rng,
                exclude=exclude,
                worker_payout=held.receipt.payee,
                job=held.job.job_id,  # named in `step_verified` / `step_not_verified`
            )

        return ask

    async def _verify_image(self, run: _Run) -> tuple[Outcome | None, list[int]]:
        """The image check (docs/IMAGE_CHECK.md), decided as a step is; an inconclusive one
        changes nothing (None). Also the steps k whose pass was discarded meanwhile."""
        held, d = run.held, self.dispatcher
        stored = await d.results.get(held.path)
        if stored is None:
            raise OSError(f"result store: the held image {held.path.name} is gone")
        image = stored.image
        final = run.by_step[held.receipt.steps_done]

        async def ask(exclude: frozenset[str]) -> StepVerdict:
            # the worker's payout account too: `verify_image` bars only the worker's wallet
            view = _Without(d, exclude | {held.receipt.payee.lower()})
            return await verify_image(
                view,
                params=held.job.params,
                worker=held.worker,
                final=final,
                image=image,
                dtype=held.dtype,
                timeout=self.policy.verify_timeout,
                rng=self._rng,
                pixels=run.pixels,
            )

        decided = await self._decide(run, final.step, "image", ask)
        if decided.outcome.verdict == "fail":
            return decided.outcome, decided.requeue
        if decided.outcome.verdict == "pass":
            run.last = run.last or decided.outcome
            run.image_rule = decided.outcome.rule
        return None, decided.requeue

    async def _decide(self, run: _Run, step: int, kind: str, ask: _Ask) -> _Decided:
        """One step (or the image check), asked until an answer can be believed:
        the first verifier; over tolerance, a third wallet; none, a probe of the first."""
        requeue: list[int] = []
        while True:
            excluded = self.standing.without() | run.discarded | self._payers(run.held)
            first = await self._asked(ask, excluded)
            v = first.verdict
            probing = first.answered and self._rng.random() < self.policy.probe_rate
            if probing and await self._probe(run, first, kind) is False:
                requeue += self._discard(run, first.wallet)
                continue  # its answer is discarded: ask another verifier
            if v.passed:
                run.use(first, step, kind)
                return _Decided(first.outcome("pass"), requeue)
            if not _against_worker(v):
                unfit = v.verifier is None and not v.reason.startswith("no verifier")
                if unfit and kind == "step":  # the worker's leaves do not make a step
                    return _Decided(self._failed(run, step, kind, first), requeue)
                return _Decided(first.outcome("skipped", strike=False), requeue)
            assert first.wallet is not None  # an answer over tolerance names its verifier
            third = await self._asked(ask, excluded | first.accounts)
            if third.verdict.passed:  # the first verifier is overruled
                self.standing.lose(first.wallet, f"overruled by a third wallet at {kind} {step}")
                requeue += self._discard(run, first.wallet)
                run.use(third, step, kind)
                run.note(OVERRULED)
                reason = f"{third.verdict.reason}; {OVERRULED}"
                return _Decided(replace(third.outcome("pass"), reason=reason), requeue)
            if third.answered and _against_worker(third.verdict):
                run.use(first, step, kind)
                run.use(third, step, kind)
                return _Decided(self._failed(run, step, kind, first, third), requeue)
            probed = await self._probe(run, first, kind)
            if probed is False:
                requeue += self._discard(run, first.wallet)
                continue  # the step is asked again, without the lying verifier
            run.use(first, step, kind)
            return _Decided(self._failed(run, step, kind, first, probed=probed), requeue)

    async def _asked(self, ask: _Ask, exclude: frozenset[str]) -> _Answer:
        """`ask`, with the verifier named by its wallet (the log names wallets)."""
        v = await ask(exclude)
        link = self.dispatcher.nodes.get(v.verifier) if v.verifier is not None else None
        wallet = link.wallet if link is not None else v.verifier
        payee = link.payee if link is not None else None  # gone: no account known to pay
        return _Answer(replace(v, verifier=wallet), v.verifier, payee)

    async def _probe(self, run: _Run, first: _Answer, kind: str) -> bool | None:
        """A known-answer probe of `first`'s verifier: True if it answered right, False if
        wrong (it loses standing), None if there was no probe or no answer. A re-render's
        verifier is asked to re-render a known render (a passed re-render of a job none of
        its accounts touched, with the same weights) where the pool holds one, so a verifier
        lazy only on re-renders is caught; else it gets a known step of `REFERENCE_MODE`, its
        own (the worker's mode has no known answers: nobody step-checks it). A wrong answer
        costs standing only once another wallet answering the same probe agrees with the
        pool (or none can answer it): an entry planted by a colluding worker and verifier is evicted
        instead, and the probe says nothing (`_recheck_entry`)."""
        held = run.held
        if first.peer is None or first.wallet is None:
            return None
        model = held.job.params.model_id
        entries: list[KnownAnswer | KnownRender | None] = []
        if kind == RENDER:  # a known render first: a verifier lazy only on re-renders
            mode = KnownRender.mode(rerender_weights(held.dtype))
            entries.append(
                self.known_renders.draw(model, mode, first.wallet, self._rng, payout=first.payee)
            )
        dtype = REFERENCE_MODE if kind == RENDER else held.dtype
        entries.append(self.known.draw(model, dtype, first.wallet, self._rng, payout=first.payee))
        v: StepVerdict | None = None
        entry: KnownAnswer | KnownRender | None = None
        for entry in (e for e in entries if e is not None):
            v = await self._ask_known(first.peer, entry)
            if v.passed or _against_worker(v):
                break  # answered (a refusal or silence: the next kind of probe instead)
        if v is None or entry is None:
            return None
        log.info("verifier_probed", verifier=first.wallet, passed=v.passed, kind=kind)
        if v.passed:
            return True
        if not _against_worker(v):  # over tolerance, or bad_leaf on a known-good leaf
            return None
        recheck = await self._recheck_entry(held, first, entry)
        if recheck == "bad":  # planted: everything its pair put in the pools goes
            gone = self.known.evict_made_by(entry.worker, entry.verifier)
            gone += self.known_renders.evict_made_by(entry.worker, entry.verifier)
            self.standing.lose(entry.verifier, "agreed with an answer two other wallets failed")
            log.warning(
                "known_answer_evicted", worker=entry.worker, verifier=entry.verifier, gone=gone
            )
            return None
        if recheck == "split":  # one recheck failed it, no other answered: nothing decided
            return None
        self.standing.lose(first.wallet, f"known-answer probe: {v.reason}")
        run.note(PROBE_FAILED)
        return False

    async def _ask_known(self, peer: str, entry: KnownAnswer | KnownRender) -> StepVerdict:
        """Send `peer` the probe `entry` makes, as a real check of its job would look."""
        if isinstance(entry, KnownRender):
            return await rerender_on(
                self.dispatcher,
                peer,
                params=entry.params,
                weights=entry.weights,
                image=entry.image,
                fmt="png",
                step=entry.params.steps,
                timeout=self.policy.verify_timeout + entry.budget,
                start=entry.start,
            )
        return await probe_step(
            self.dispatcher,
            peer,
            params=entry.params,
            scheduler=entry.scheduler,
            opening_k=entry.opening_k,
            opening_next=entry.opening_next,
            dtype=entry.dtype,
            timeout=self.policy.verify_timeout,
        )

    async def _recheck_entry(
        self, held: Held, first: _Answer, entry: KnownAnswer | KnownRender
    ) -> Literal["holds", "bad", "split", "unknown"]:
        """Whether a pool entry `first`'s verifier failed is right, by the same probe to nodes
        of other wallets (none of whose accounts is the first verifier's, the held receipt's
        worker or payee, behind the entry, or an earlier recheck's; with standing), one after
        another: `holds` once one agrees with the entry (each that failed it before loses
        standing: failing takes no work, so a partner of the liar must not clear it);
        `bad` when two fail it; `split` when one failed it and no other answers; `unknown`
        when none answers."""
        assert first.wallet is not None
        barred = {first.wallet.lower(), *self.standing.without()}
        barred |= {entry.worker, entry.verifier, *entry.accounts, *self._payers(held)}
        if first.payee is not None:
            barred.add(first.payee.lower())
        failed_by: list[str] = []
        for _ in range(2):
            peer = self._recheck_peer(held, entry, barred)
            link = self.dispatcher.nodes.get(peer) if peer is not None else None
            if peer is None or link is None:
                break
            v = await self._ask_known(peer, entry)
            log.info("known_answer_rechecked", verifier=link.wallet, passed=v.passed)
            if v.passed:
                for wallet in failed_by:
                    self.standing.lose(wallet, "failed a known answer another wallet confirmed")
                return "holds"
            if not _against_worker(v):
                break
            failed_by.append(link.wallet)
            barred |= link.accounts
        else:
            return "bad"
        return "split" if failed_by else "unknown"

    def _recheck_peer(
        self, held: Held, entry: KnownAnswer | KnownRender, barred: set[str]
    ) -> str | None:
        """A node that can answer `entry`'s probe, none of whose accounts is `barred`."""
        model = entry.params.model_id
        able = {
            p: n
            for p, n in self.dispatcher.nodes.items()
            if (
                can_rerender(n, model, entry.weights)
                if isinstance(entry, KnownRender)
                else can_verify(n, model, entry.dtype)
            )
        }
        return choose_verifier(
            able, model, held.worker, self._rng, barred, worker_payout=held.receipt.payee,
            pixels=entry.params.width * entry.params.height,
        )  # fmt: skip

    @staticmethod
    def _discard(run: _Run, wallet: str | None) -> list[int]:
        """Forget `wallet`'s answers in this check; the steps they had passed (to ask again)."""
        if wallet is None:
            return []
        w = wallet.lower()
        run.discarded = run.discarded | {w}
        gone = [(x, s, k) for x, s, k in run.used if x is not None and x.lower() == w]
        run.used = [u for u in run.used if u not in gone]
        return sorted({s for _, s, k in gone if k == "step"})

    @staticmethod
    def _failed(
        run: _Run,
        step: int,
        kind: str,
        first: _Answer,
        third: _Answer | None = None,
        probed: bool | None = None,
    ) -> Outcome:
        run.evidence.append(
            StepEvidence(
                step=step,
                kind=kind,
                first=first.evidence(),
                third=third.evidence() if third is not None else None,
                probe_passed=probed,
            )
        )
        return first.outcome("fail")

    def _remember(self, run: _Run) -> None:
        """A passed check's steps become known answers (for probing other verifiers)."""
        held = run.held
        for wallet, step, kind in run.used:
            if kind != "step" or wallet is None:
                continue
            self.known.add(
                KnownAnswer(
                    worker=held.worker.lower(),
                    verifier=wallet.lower(),
                    params=held.job.params,
                    scheduler=held.job.params.scheduler,
                    dtype=held.dtype,
                    opening_k=run.by_step[step],
                    opening_next=run.by_step[step + 1],
                    accounts=frozenset(
                        a.lower()
                        for a in (held.receipt.payee, run.payees.get(wallet.lower()))
                        if a is not None
                    ),
                )
            )

    def _remember_render(self, run: _Run, answers: Mapping[str, StepVerdict]) -> None:
        """A passed re-render becomes a known render: the job and the verifier's image."""
        held = run.held
        for wallet, _step, kind in run.used:
            w = wallet.lower() if wallet is not None else ""
            v = answers.get(w)
            if kind != RENDER or v is None or not v.passed or v.image is None:
                continue
            if len(v.image) > KNOWN_RENDER_MAX_BYTES:
                continue
            payees = (held.receipt.payee, run.payees.get(w))
            self.known_renders.add(
                KnownRender(
                    worker=held.worker.lower(),
                    verifier=w,
                    params=held.job.params,
                    weights=rerender_weights(held.dtype),
                    image=v.image,
                    budget=held.budget,
                    accounts=frozenset(a.lower() for a in payees if a is not None),
                    start=run.by_step[0].latents if v.seed_checked else None,
                )
            )

    async def _record_work(self, run: _Run) -> None:
        """Each used answer is one step of verifier work, paid from the take at settlement
        to the verifier's payout account (else its wallet): an ephemeral container's pay
        lands with its operator, not on a throwaway key."""
        per_payee: Counter[str] = Counter()
        for w, _, kind in run.used:  # a re-render is every step of the job's work
            if w is not None and w.lower() in run.payees:
                steps = run.held.receipt.steps_done if kind == RENDER else 1
                per_payee[run.payees[w.lower()].lower()] += steps
        store = self.dispatcher.store
        for payee, steps in sorted(per_payee.items()):
            await store.call(store.record_verifier_work, run.held.job.job_id, payee, steps)

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
        if outcome.rule is not None:
            line["imageRule"] = outcome.rule
        try:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("verification_log_failed", error=str(exc))
