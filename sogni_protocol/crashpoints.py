"""Named crash points for the crash-matrix tests: `crashpoint("after_receipt_commit")` kills
this process with SIGKILL right there when `SOGNI_CRASHPOINT` names that point.

Why named points and not timing: a test that says "kill the coordinator after it committed the
receipt but before it acked" must hit exactly that window on every machine, every run. Outside
tests the variable is unset and a crash point costs one dictionary lookup.

`SOGNI_CRASHPOINT` may hold several names separated by commas; `SOGNI_CRASHPOINT_SKIP=N` lets
the first N hits pass (crash on the N+1-th), so a test can crash mid-stream, not on the first
job. Both are read once, when this module is imported: the crash tests set them in the
environment of the process they start, and a lookup in `os.environ` per call (two per
receipt on the coordinator's event loop) cost more than the rest of this module.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASHPOINT_ENV", "crashpoint"]

CRASHPOINT_ENV = "SOGNI_CRASHPOINT"
_WANTED = frozenset(filter(None, os.environ.get(CRASHPOINT_ENV, "").split(",")))
_SKIP = int(os.environ.get("SOGNI_CRASHPOINT_SKIP", "0") or 0)
_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """SIGKILL this process if `SOGNI_CRASHPOINT` names `name` (after the allowed skips)."""
    if name not in _WANTED:
        return
    seen = _hits.get(name, 0)
    _hits[name] = seen + 1
    if seen < _SKIP:
        return
    os.kill(os.getpid(), signal.SIGKILL)
