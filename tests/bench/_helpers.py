"""What the benchmark tests share: the repository, and whether it is a git checkout (the
`--against` paths export another commit with `git archive`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_ok() -> bool:
    probe = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False
    )
    return probe.returncode == 0
