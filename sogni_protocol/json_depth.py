"""How deep a JSON text nests, checked before any untyped decoder sees it.

Why: importing py_ecc (through the chain client) raises Python's recursion limit to 100,000,
and under that limit decoding deeply nested JSON (`[[[[...`) overflows the C stack instead of
raising: measured, a segfault of the whole daemon from one 64 KiB body (stdlib `json` at
100,000 levels, untyped `msgspec.json` at 32,000). Typed msgspec decoders stop at the first
wrong type and are safe; every untyped decode of network input calls `check_depth` first.
"""

from __future__ import annotations

import re

__all__ = ["MAX_JSON_DEPTH", "TooDeep", "check_depth"]

MAX_JSON_DEPTH = 32
"""Deeper than any message of this protocol or the SDKs' (their deepest is under 8)."""

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
"""A string, or an unterminated one running to the end of the text. Requiring the closing
quote made every quote of `"\\"\\"...` (no close) try to the end: quadratic, 12 s of the loop
for one 64 KiB body. Brackets after an unterminated quote are never parsed by a decoder."""
_BRACKETS = re.compile(rb"[\[\]{}]")


class TooDeep(ValueError):
    """The text nests arrays/objects deeper than allowed."""


def check_depth(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise `TooDeep` when arrays/objects in `text` nest deeper than `limit` (brackets
    inside strings do not count; unbalanced input is left to the decoder to refuse)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b"", data)):
        depth += 1 if bracket in b"[{" else -1
        if depth > limit:
            raise TooDeep(f"JSON nests deeper than {limit}")
