"""What the chain says about a worker's wallet (licence, stake), as routing and billing see it.

Its own module because both read it and neither should import the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Standing:
    """What the chain says about a wallet: licence, and stake in whole SOGNI."""

    licensed: bool = False
    stake: int = 0


StandingLookup = Callable[[str], Standing]


def no_chain(_wallet: str) -> Standing:
    return Standing()
