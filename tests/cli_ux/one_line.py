"""What every test here asserts of a failed command: its exit code, and one `error:` line
on stderr, no traceback."""

from __future__ import annotations


def one_line(result: object, code: int) -> str:
    """The single `error:` line of a failed command (no traceback), after its exit code."""
    exit_code = getattr(result, "exit_code", None)
    output = getattr(result, "output", "")
    assert exit_code == code, (output, getattr(result, "exception", None))
    stderr: str = getattr(result, "stderr", "")
    assert "Traceback" not in output and stderr.startswith("error: "), output
    assert stderr.count("\n") == 1, stderr
    return stderr
