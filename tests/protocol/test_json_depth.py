"""Deep JSON is refused before any untyped decoder sees it (`sogni_protocol.json_depth`)."""

from __future__ import annotations

import pytest

from sogni_protocol.json_depth import MAX_JSON_DEPTH, TooDeep, check_depth


def test_depth_counts_brackets_outside_strings_only() -> None:
    check_depth("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    check_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[["}')
    with pytest.raises(TooDeep, match="deeper than 32"):
        check_depth("[" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(TooDeep):
        check_depth(b'{"a":' * 40 + b"1" + b"}" * 40)
    with pytest.raises(TooDeep):
        check_depth(b"[" * 100_000)  # what would have crashed the decoder
    check_depth("[" * 10, limit=10)
    with pytest.raises(TooDeep):
        check_depth("[" * 11, limit=10)
