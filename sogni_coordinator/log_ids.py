"""How ids appear in the coordinator's logs: one prefix length everywhere, so one grep
finds an id in every line (and never the whole id: a resume needs the whole request id)."""

from __future__ import annotations

__all__ = ["SHORT_HEX", "short"]

SHORT_HEX = 16
"""Hex digits of an id in logs: the prefix every coordinator log line uses for request, job
and check ids (and the node's for check ids), so one grep finds an id everywhere."""


def short(ident: bytes) -> str:
    """An id (request, job, check) for logs: a prefix of `SHORT_HEX` hex digits, never the
    whole id (a resume needs the whole request id, and its token)."""
    return ident.hex()[:SHORT_HEX]
