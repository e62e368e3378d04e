"""The benchmark's headline figures as one JSON object (`python -m bench --json`), and the
same figures for another commit (`--against COMMIT`), measured in the same run.

Self-contained on purpose (standard library only at import): `--against` runs this file as
a script with the other commit's source tree first on the import path, so that commit's
`bench.overhead`, `bench.dispatch` and `bench.settlement` are measured through these
extractors, which only read what both old and new reports have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

KEYS = (
    "overhead_ms",
    "overhead_ratio",
    "dispatch_jobs_per_s",
    "dispatch_capacity_per_core",
    "baseline_jobs_per_s",
    "baseline_clocked_jobs_per_s",
    "client_lag_p50_ms",
    "post_root_gas_first",
    "post_root_gas_next",
    "claim_gas_cold",
    "claim_gas_warm",
    "receipts_verified_per_s",
    "merkle_100k_s",
)
"""Every key of the JSON line, in order; null when its section did not run."""
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "overhead": KEYS[0:2],
    "dispatch": KEYS[2:7],
    "settlement": KEYS[7:13],
}
"""The figures each section produces."""
SECTIONS = tuple(SECTION_KEYS)
"""The sections that produce figures (and that `--against` re-runs on the other commit)."""
LOWER_IS_BETTER = frozenset(
    {
        "overhead_ms",
        "overhead_ratio",
        "client_lag_p50_ms",
        "post_root_gas_first",
        "post_root_gas_next",
        "claim_gas_cold",
        "claim_gas_warm",
        "merkle_100k_s",
    }
)

Metrics = dict[str, float | None]


def empty() -> Metrics:
    return dict.fromkeys(KEYS)


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _p50(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, min(len(ordered) - 1, round(0.5 * len(ordered) + 0.5) - 1))])


# --- extractors (duck-typed: old and new reports alike) --------------------------------------
def from_overhead(report: Any) -> Metrics:
    """Per image: (network batch wall - direct batch wall) / images, median of the runs."""
    n = report.settings.images
    direct = [r.direct_s / n * 1000 for r in report.runs]
    network = [r.network_s / n * 1000 for r in report.runs]
    return {
        "overhead_ms": _median(b - a for a, b in zip(direct, network, strict=True)),
        "overhead_ratio": _median(b / a for a, b in zip(direct, network, strict=True)),
    }


def from_dispatch(report: Any) -> Metrics:
    """Networked and in-process rates; client lag = p50(accepted -> image at the client) -
    p50(accepted -> receipt committed), median over rounds (null if receipts were not timed)."""
    rounds = report.rounds
    lags = [
        (_p50(r.latencies) - _p50(r.receipted)) * 1000
        for r in rounds
        if getattr(r, "receipted", None) and r.latencies
    ]
    # timed with a per-task clock, as harnesses before 2c009f0 timed every run: what
    # compares with an older commit's baseline (this tree's own is timed without it)
    clocked = getattr(report.baseline, "split", None) or report.baseline
    return {
        "dispatch_jobs_per_s": _median(r.jobs_per_s for r in rounds),
        "dispatch_capacity_per_core": _median(r.jobs / r.cpu["coordinator"] for r in rounds),
        "baseline_jobs_per_s": float(report.baseline.jobs_per_s),
        "baseline_clocked_jobs_per_s": float(clocked.jobs_per_s),
        "client_lag_p50_ms": _median(lags) if lags else None,
    }


def from_settlement(
    gas_100k: Mapping[str, float], merkle_100k: Sequence[float], verify_rates: Sequence[float]
) -> Metrics:
    """Gas at 100,000 leaves, Merkle build of 100,000 leaves (median s), receipts/s."""
    return {
        "post_root_gas_first": float(gas_100k["post_first"]),
        "post_root_gas_next": float(gas_100k["post_next"]),
        "claim_gas_cold": float(gas_100k["claim_cold"]),
        "claim_gas_warm": float(gas_100k["claim_warm"]),
        "receipts_verified_per_s": _median(verify_rates),
        "merkle_100k_s": _median(merkle_100k),
    }


def measure_settlement(module: Any, quick: bool) -> Metrics:
    """The settlement figures alone, through a `bench.settlement` module's own functions
    (present in old commits too): no 1,000-leaf gas, no 1M-leaf build, no epoch close."""
    runs, n_verify = (3, 2_000) if quick else (5, 10_000)
    return from_settlement(
        module.gas(100_000),
        module.build_seconds(100_000, runs),
        module.verify_rate(n_verify, runs),
    )


# --- the line and the comparison -------------------------------------------------------------
def json_line(metrics: Metrics, extra: Mapping[str, Any] | None = None) -> str:
    """One JSON object: every key of `KEYS` (null if not measured), then `extra`."""
    out: dict[str, Any] = {k: _finite(metrics.get(k)) for k in KEYS}
    out.update(extra or {})
    return json.dumps(out, sort_keys=False, allow_nan=False)


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def _cell(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def comparison_markdown(
    old: Metrics, new: Metrics, commit: str, keys: Sequence[str] = KEYS, level: str = "##"
) -> str:
    """Old vs new for every figure of ``keys`` either run measured; ratio = new / old."""
    rows = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a is None and b is None:
            continue
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        better = "lower" if k in LOWER_IS_BETTER else "higher"
        rows.append(f"| `{k}` | {_cell(a)} | {_cell(b)} | {ratio} | {better} |")
    return "\n".join(
        [
            f"{level} Against {commit} (same run)",
            "",
            f"| figure | {commit} | this tree | new / old | better |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


class AgainstError(RuntimeError):
    """The other commit could not be measured (one line, for the CLI)."""


def resolve_commit(repo: Path, commit: str) -> str:
    """The full hash of ``commit`` (checked before anything is measured)."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AgainstError(f"--against {commit}: not a commit in {repo}")
    return proc.stdout.strip()


def run_against(repo: Path, commit: str, sections: Sequence[str], quick: bool) -> Metrics:
    """Measure ``sections`` (those in `SECTIONS`) at ``commit``: its tree is exported with
    `git archive` into a temporary folder (no worktree entry left in .git, nothing to clean
    up after a kill), this script runs there with that tree first on the import path and the
    same interpreter (.venv); .cache (models) is shared through a symlink."""
    wanted = [s for s in sections if s in SECTIONS]
    if not wanted:
        return empty()
    from bench._common import ExportError, export_tree  # not at import: this file also
    # runs inside the other commit's tree, whose `bench` may lack it

    tmp = Path(tempfile.mkdtemp(prefix="bench-against-"))
    try:
        try:
            export_tree(commit, tmp, repo)
        except ExportError as exc:
            raise AgainstError(f"--against {commit}: {exc}") from None
        cache = repo / ".cache"
        if cache.is_dir() and not (tmp / ".cache").exists():
            (tmp / ".cache").symlink_to(cache)
        env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--root", str(tmp), *wanted]
        proc = subprocess.run(
            cmd + (["--quick"] if quick else []),
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise AgainstError(f"--against {commit}: its benchmark exited {proc.returncode}")
        parsed = json.loads(lines[-1])
        return {k: parsed.get(k) for k in KEYS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure_here(sections: Sequence[str], quick: bool) -> Metrics:
    """In the child: measure with whatever `bench` is first on the import path."""
    out = empty()
    for name in sections:
        if name == "settlement":
            from bench import settlement

            out.update(measure_settlement(settlement, quick))
        elif name == "overhead":
            from bench import overhead

            o_settings = overhead.QUICK if quick else overhead.Settings()
            out.update(
                from_overhead(overhead.run(o_settings, "python -m bench overhead (against)"))
            )
        elif name == "dispatch":
            from bench import dispatch

            settings = dispatch.QUICK if quick else dispatch.Settings()
            if "profile" in {f.name for f in dataclasses.fields(settings)}:
                settings = dataclasses.replace(settings, profile=False)
            out.update(from_dispatch(dispatch.run(settings, "python -m bench dispatch (against)")))
    return out


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="measure the figures of the tree at --root")
    parser.add_argument("--root", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("sections", nargs="+", choices=SECTIONS)
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [args.root, *[p for p in sys.path if p not in (here, "")]]
    from sogni_protocol.logs import configure_logging

    configure_logging("warning", json=False)
    print(json_line(_measure_here(args.sections, args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
