"""Known-answer probes: steps whose right answer the coordinator already holds.

Why: a verifier could answer without computing (a lazy verifier) or lie (failing an honest
worker, passing a cheat). A step the coordinator has already seen verified -- the worker's
committed x_{k+1} and a verifier of ANOTHER wallet agreed within tolerance -- has a known
answer. Sent to a verifier as an ordinary `VerifyStep` (a fresh random check id, the same
fields a real check carries), it tells whether that verifier computes: an honest one lands
within tolerance of the known x_{k+1}, a lazy or lying one does not (docs/VERIFICATION.md,
"Checking the verifiers").

A passed whole re-render is a known answer too (`KnownRender`: the job and the verifier's
image), for probing re-render verifiers with a re-render, which a verifier lazy only on
re-renders cannot pass.

The pool is in memory, bounded per (model, declared numeric mode): the verifier must run the
declared mode, so a probe is drawn for the mode of the check it rides with. A restart empties
it; new passed checks fill it again. A probe is never drawn from the probed wallet's own work
or from an answer it gave itself (it could recognise the step, and its own answer proves
nothing about it).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sogni_protocol.messages import JobParams, StepOpeningWire, TensorEntry

__all__ = [
    "KNOWN_RENDERS_PER_KEY",
    "KNOWN_RENDER_MAX_BYTES",
    "KnownAnswer",
    "KnownAnswers",
    "KnownRender",
]

KNOWN_RENDERS_PER_KEY = 16
"""Known renders kept per (model, weights): each holds a PNG (a 1024x1024 one is ~1.5 MB)."""
KNOWN_RENDER_MAX_BYTES = 4 * 1024 * 1024
"""A larger PNG (a verifier may pad its answer up to the frame limit) is not kept."""


class _Known:
    """What every known answer says about who made it."""

    worker: str
    """The wallet that rendered it (lowercase)."""
    verifier: str
    """The wallet whose re-run agreed (lowercase)."""
    accounts: frozenset[str]
    """Every other account behind it (lowercase): the receipt's payee, the verifier's payout
    account. A verifier whose wallet or payout is one of them could recognise the work."""

    @property
    def key(self) -> tuple[str, str]:
        """(model id, mode): a probe is drawn for the mode of the check it rides with."""
        raise NotImplementedError

    def involves(self, *accounts: str | None) -> bool:
        """Whether any of `accounts` (wallets or payout addresses) rendered, verified or was
        paid for this work."""
        mine = {self.worker, self.verifier, *self.accounts}
        return any(a is not None and a.lower() in mine for a in accounts)


@dataclass(frozen=True)
class KnownAnswer(_Known):
    """One verified step: what a `VerifyStep` for it carries, and the agreed x_{k+1}."""

    worker: str
    verifier: str
    params: JobParams
    scheduler: str
    dtype: str
    opening_k: StepOpeningWire
    opening_next: StepOpeningWire
    """Leaf k + 1 as the worker committed it: the known answer."""
    accounts: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[str, str]:
        return (self.params.model_id, self.dtype)


@dataclass(frozen=True)
class KnownRender(_Known):
    """One passed whole re-render: the job (and the worker's weights, `VerifyRender.weights`)
    and the verifier's image, which the delivered one matched: a re-render verifier asked the
    same job again must land within the re-render bound of it."""

    worker: str
    verifier: str
    params: JobParams
    weights: str
    image: bytes
    """The verifier's render, a lossless PNG."""
    budget: float
    """The job's render budget (s): a probe's deadline must be the one a real check of this
    job would carry, or a verifier could tell probes apart."""
    accounts: frozenset[str] = frozenset()
    start: TensorEntry | None = None
    """The worker's leaf 0, when the check measured it against the seed and it passed: a
    probe then carries it too (`VerifyRender.start_latents`), so a verifier that lies only
    about the seed distance is caught as one that lies about the image."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.params.model_id, self.mode(self.weights))

    @staticmethod
    def mode(weights: str) -> str:
        """The pool's mode for re-renders with `weights` (`KnownAnswers.draw`)."""
        return f"render:{weights}"


K = TypeVar("K", bound=_Known)


class KnownAnswers(Generic[K]):
    """At most `per_key` known answers per (model id, mode), newest kept, each for at most
    `max_age` seconds: an answer holds its job's prompt (and a known render its image), which
    must not outlive the coordinator's `prompt_retention_seconds`."""

    def __init__(
        self,
        per_key: int = 64,
        *,
        max_age: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.max_age = max_age
        self._clock = clock
        self._pool: dict[tuple[str, str], deque[tuple[float, K]]] = {}

    def __len__(self) -> int:
        self._expire()
        return sum(len(q) for q in self._pool.values())

    def add(self, answer: K) -> None:
        if self.per_key <= 0 or answer.worker.lower() == answer.verifier.lower():
            return  # a wallet agreeing with itself proves nothing
        self._expire()
        queue = self._pool.get(answer.key)
        if queue is None:
            queue = self._pool[answer.key] = deque(maxlen=self.per_key)
        queue.append((self._clock(), answer))

    def evict_made_by(self, worker: str, verifier: str) -> int:
        """Forget every answer `worker` rendered and `verifier` agreed with (a planted entry
        was found: its pair's other entries are suspect too); how many went."""
        pair = (worker.lower(), verifier.lower())
        gone = 0
        for key, queue in list(self._pool.items()):
            kept = [item for item in queue if (item[1].worker, item[1].verifier) != pair]
            gone += len(queue) - len(kept)
            if kept:
                self._pool[key] = deque(kept, maxlen=queue.maxlen)
            else:
                del self._pool[key]
        return gone

    def _expire(self) -> None:
        """Forget answers older than `max_age` (each queue is oldest first)."""
        oldest = self._clock() - self.max_age
        for key, queue in list(self._pool.items()):
            while queue and queue[0][0] < oldest:
                queue.popleft()
            if not queue:
                del self._pool[key]

    def draw(
        self,
        model_id: str,
        mode: str,
        verifier: str,
        rng: random.Random,
        *,
        payout: str | None = None,
    ) -> K | None:
        """A known answer for `model_id` in `mode` (a declared mode; `render:<weights>` for a
        re-render) that `verifier` (a wallet) and its `payout` account neither rendered,
        verified nor were paid for, drawn at random; None if there is none (a sibling
        container of one operator must not be probed with its siblings' work)."""
        self._expire()
        queue = self._pool.get((model_id, mode), ())
        fit = [a for _, a in queue if not a.involves(verifier, payout)]
        return rng.choice(fit) if fit else None
