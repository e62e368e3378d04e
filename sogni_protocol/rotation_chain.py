"""Chains of offer-key rotations: a coordinator's key history, each link signed by the key it
replaces (docs/OPERATIONS.md, "Rotating the offer key").

Why a chain: a node trusts a coordinator by its offer-signing address. When the coordinator
rotates that key, every node would need its `trusted_coordinators` edited; instead the
coordinator sends, in its `Welcome`, the links from an older key to the current one. A node
that trusts any key on a valid chain may trust the current key. Both ends use this module:
the coordinator checks its chain file before it sends it, the node checks what it receives.

A valid chain: 1..`MAX_LINKS` links, oldest first; each link signed by its `old_key` under the
coordinator's EIP-712 domain; each link's `new_key` is the next link's `old_key`; the last
`new_key` is the coordinator's current key; no key appears twice (no loops); `not_before`
never decreases along the chain and is not later than now plus `CLOCK_SKEW`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import SignedKeyRotation

__all__ = ["CLOCK_SKEW", "MAX_LINKS", "chain_fault", "chain_keys", "newly_trusted"]

MAX_LINKS = 16
"""As many links as a `Welcome` carries."""
CLOCK_SKEW = 120.0
"""How far a link's `not_before` may be ahead of the checker's clock (seconds)."""


def chain_keys(chain: Sequence[SignedKeyRotation]) -> list[str]:
    """Every key on the chain, oldest first (the first link's old key, then each new key)."""
    if not chain:
        return []
    return [chain[0].rotation.old_key, *(link.rotation.new_key for link in chain)]


def chain_fault(
    domain: Domain,
    chain: Sequence[SignedKeyRotation],
    current: str,
    now: float,
    *,
    skew: float = CLOCK_SKEW,
) -> str | None:
    """Why `chain` is not a valid history ending at `current`, or None (an empty chain is
    valid: no rotation)."""
    if not chain:
        return None
    if len(chain) > MAX_LINKS:
        return f"key rotation chain has {len(chain)} links, more than {MAX_LINKS}"
    seen: set[str] = set()
    previous_time = 0
    for i, link in enumerate(chain):
        r = link.rotation
        where = f"key rotation {i + 1} of {len(chain)} ({r.old_key} -> {r.new_key})"
        if i == 0:
            seen.add(r.old_key.lower())
        elif not eip712.same_address(chain[i - 1].rotation.new_key, r.old_key):
            return f"{where} does not continue from {chain[i - 1].rotation.new_key}"
        if r.new_key.lower() in seen:
            return f"{where} returns to a key already on the chain (a loop)"
        seen.add(r.new_key.lower())
        if r.not_before > now + skew:
            return f"{where} takes effect in the future (not_before {r.not_before})"
        if r.not_before < previous_time:
            return f"{where} takes effect before the rotation it follows"
        previous_time = r.not_before
        fault = eip712.check_key_rotation(domain, link)
        if fault is not None:
            return f"{where}: {fault}"
    if not eip712.same_address(chain[-1].rotation.new_key, current):
        return f"key rotation chain ends at {chain[-1].rotation.new_key}, not at {current}"
    return None


def newly_trusted(
    chain: Sequence[SignedKeyRotation], trusted: Collection[str]
) -> list[tuple[str, str]] | None:
    """For a valid chain (`chain_fault` None): the links a node that trusts `trusted`
    (lower-case addresses) would newly trust, as (old, new) pairs, oldest first: those after
    the last trusted key on the chain. [] when the current key is trusted already; None
    when no key on the chain is trusted."""
    keys = chain_keys(chain)
    last = max((i for i, key in enumerate(keys) if key.lower() in trusted), default=None)
    if last is None:
        return None
    return [(keys[i], keys[i + 1]) for i in range(last, len(keys) - 1)]
