"""Known-answer probes: steps whose right answer the coordinator already holds.

Why: a verifier could answer without computing (a lazy verifier) or lie (failing an honest
worker, passing a cheat). A step the coordinator has already seen verified -- the worker's
committed x_{k+1} and a verifier of ANOTHER wallet agreed within tolerance -- has a known
answer. Sent to a verifier as an ordinary `VerifyStep` (a fresh random check id, the same
fields a real check carries), it tells whether that verifier computes: an honest one lands
within tolerance of the known x_{k+1}, a lazy or lying one does not (docs/VERIFICATION.md,
"Checking the verifiers").

The pool is in memory, bounded per (model, declared numeric mode): the verifier must run the
declared mode, so a probe is drawn for the mode of the check it rides with. A restart empties
it; new passed checks fill it again. A probe is never drawn from the probed wallet's own work
or from an answer it gave itself (it could recognise the step, and its own answer proves
nothing about it).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from sogni_protocol.messages import JobParams, StepOpeningWire

__all__ = ["KnownAnswer", "KnownAnswers"]


@dataclass(frozen=True)
class KnownAnswer:
    """One verified step: what a `VerifyStep` for it carries, and the agreed x_{k+1}."""

    worker: str
    """The wallet that rendered it (lowercase)."""
    verifier: str
    """The wallet whose re-run agreed (lowercase)."""
    params: JobParams
    scheduler: str
    dtype: str
    opening_k: StepOpeningWire
    opening_next: StepOpeningWire
    """Leaf k + 1 as the worker committed it: the known answer."""
    accounts: frozenset[str] = frozenset()
    """Every other account behind it (lowercase): the receipt's payee, the verifier's payout
    account. A verifier whose wallet or payout is one of them could recognise the step."""

    def involves(self, *accounts: str | None) -> bool:
        """Whether any of `accounts` (wallets or payout addresses) rendered, verified or was
        paid for this step."""
        mine = {self.worker, self.verifier, *self.accounts}
        return any(a is not None and a.lower() in mine for a in accounts)


class KnownAnswers:
    """At most `per_key` known answers per (model id, declared mode), newest kept."""

    def __init__(self, per_key: int = 64) -> None:
        self.per_key = per_key
        self._pool: dict[tuple[str, str], deque[KnownAnswer]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._pool.values())

    def add(self, answer: KnownAnswer) -> None:
        if self.per_key <= 0 or answer.worker.lower() == answer.verifier.lower():
            return  # a wallet agreeing with itself proves nothing
        key = (answer.params.model_id, answer.dtype)
        queue = self._pool.get(key)
        if queue is None:
            queue = self._pool[key] = deque(maxlen=self.per_key)
        queue.append(answer)

    def draw(
        self,
        model_id: str,
        dtype: str,
        verifier: str,
        rng: random.Random,
        *,
        payout: str | None = None,
    ) -> KnownAnswer | None:
        """A known answer for `model_id` in mode `dtype` that `verifier` (a wallet) and its
        `payout` account neither rendered, verified nor were paid for, drawn at random; None
        if there is none (a sibling container of one operator must not be probed with its
        siblings' work)."""
        queue = self._pool.get((model_id, dtype), ())
        fit = [a for a in queue if not a.involves(verifier, payout)]
        return rng.choice(fit) if fit else None
