"""Verifier standing: a verifier caught answering wrongly is not asked again for a while.

Why: a verifier's answer can strike a worker. A verifier whose fail a third wallet's re-run
overrules, or whose answer to a known-answer probe is wrong, loses standing: it is never
chosen as a verifier (`verifiers.choose_verifier(exclude=...)`) until `lost_for` seconds
have passed, and the answers it gave in the check under way are discarded. It may still
render (standing is about verifying; a wrong render is the checks' business). Kept in
memory: a restart gives every verifier its standing back (docs/VERIFICATION.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sogni_protocol.logs import get_logger

__all__ = ["VerifierStanding"]

log = get_logger(__name__)


class VerifierStanding:
    """Wallets (lowercase) without standing, and until when."""

    def __init__(self, lost_for: float, clock: Callable[[], float] = time.time) -> None:
        self.lost_for = lost_for
        self._clock = clock
        self._until: dict[str, float] = {}

    def lose(self, wallet: str, reason: str) -> None:
        """`wallet` answered wrongly (`reason`: why, never a prompt)."""
        self._until[wallet.lower()] = self._clock() + self.lost_for
        log.warning("verifier_lost_standing", wallet=wallet, reason=reason)

    def has_standing(self, wallet: str) -> bool:
        until = self._until.get(wallet.lower())
        return until is None or until <= self._clock()

    def without(self) -> frozenset[str]:
        """Every wallet without standing now (expired entries are dropped)."""
        now = self._clock()
        for w in [w for w, t in self._until.items() if t <= now]:
            del self._until[w]
        return frozenset(self._until)
