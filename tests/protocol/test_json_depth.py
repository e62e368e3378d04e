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


def test_an_unterminated_string_is_scanned_in_linear_time() -> None:
    """`"` then `\\"` pairs and no closing quote: every quote tried to match up to the end
    (quadratic: 12.6 s for 64 KiB, ~200 s for one 256 KiB gateway frame, all of it on the
    event loop). A complexity guard with a wide margin, not a speed test: linear is ~10 ms."""
    import time

    body = b'"' + b'\\"' * (128 * 1024)
    started = time.perf_counter()
    check_depth(body)
    check_depth(b"[" * 20 + body)  # brackets before it still count
    assert time.perf_counter() - started < 5.0
    with pytest.raises(TooDeep):
        check_depth(b"[" * 40 + body)
    check_depth(b'["a\\')  # a lone backslash at the end: still one unterminated string
