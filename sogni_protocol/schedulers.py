"""The schedulers this network renders with: a request naming another is refused when it
arrives, not failed by every node it is offered to (each attempt an error on an innocent
node). The node's diffusers backend maps each name to its class (`SCHEDULERS` there; a test
keeps the two lists equal); "" is the model's own scheduler."""

from __future__ import annotations

__all__ = ["NETWORK_SCHEDULERS", "scheduler_fault"]

NETWORK_SCHEDULERS = ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm")


def scheduler_fault(name: str) -> str | None:
    """Why a request's scheduler cannot be rendered here, or None ("" is the model's own)."""
    if not name or name in NETWORK_SCHEDULERS:
        return None
    return f"unknown scheduler {name!r}; this network renders with {', '.join(NETWORK_SCHEDULERS)}"
