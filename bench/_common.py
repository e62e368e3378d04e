"""Shared helpers: machine description, statistics, process CPU time, markdown, spawning."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from sogni_devnet.localnet import DEMO_PASSWORD, Proc
from sogni_protocol.atomic import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


class ExportError(RuntimeError):
    """`export_tree` could not export the commit (git's last line says why)."""


def export_tree(commit: str, into: Path, repo: Path = REPO) -> None:
    """Extract `commit`'s tracked files into the folder `into`, for measuring another commit
    beside this tree (`--against`, `node_ab`, `baseline_ab`): `git archive`, so no worktree
    entry is left in .git and a killed run leaves nothing to clean up but the folder."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        why = archive.stderr.decode(errors="replace").strip().splitlines()
        raise ExportError(why[-1] if why else "git archive failed")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


# --- statistics ----------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """`median (min-max)` for a table cell."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# --- machine -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev} (uncommitted changes)" if dirty else rev


def machine_rows() -> list[tuple[str, str]]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{cores} logical ({usable} usable by this process)"),
        ("RAM", f"{_ram_gib():.1f} GiB"),
        ("OS", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", platform.python_version()),
        ("torch", _version("torch")),
        (
            "libp2p / trio / diffusers",
            f"{_version('libp2p')} / {_version('trio')} / {_version('diffusers')}",
        ),
        ("git", _git_revision()),
    ]


# --- process CPU time ----------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used so far (Linux /proc), NaN if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread."""
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return float("nan"), float("nan")
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes; /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def busy_elsewhere(ours: float, before: float, after: float) -> float:
    """CPU seconds other processes used meanwhile: machine busy time minus our processes'."""
    return max(0.0, (after - before) - ours)


# --- markdown ------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- bench:{'/' if end else ''}{name} -->"


SECTION_ORDER = (
    "overhead", "dispatch", "settlement", "governance", "disputes", "pricing", "fuzz", "chaos",
    "unet", "cpuvar", "tolerance", "image", "rerender", "rerender_weights", "content",
    "safety_image", "shapes", "cluster",
)  # fmt: skip
SLOW_SECTIONS = (
    "unet", "cpuvar", "tolerance", "image", "rerender", "rerender_weights", "cluster",
)  # fmt: skip
"""Run only when named (`python -m bench unet`, about 45 min here); a whole-file rewrite keeps
their last text."""

HEADER = """# Benchmarks

Generated by `python -m bench` (all sections but `unet`; `--quick` halves the batches and
took 6 min 34 s here on 3 Dec 2026, the dispatch, chaos and fuzz sections the longest) or
`python -m bench overhead|dispatch|unet` (one section, the others
kept; `unet`, the UNet step times, takes about 45 minutes and runs only when named). Timings use
`time.perf_counter`; each section names its command, its baseline (measured in the same
run) and the median of its runs, with min-max in brackets.

`--json` adds one JSON object of the headline figures as the last line of stdout, and
`--against COMMIT` measures the overhead, dispatch and settlement sections of COMMIT in the
same run (its tree exported to a temporary folder, the same .venv) and adds an old-vs-new
table to each. GPU: `bench/gpu/sdxl_speed.py` (SDXL through the node's backend against plain
diffusers fp16) has **no GPU figures yet**: its one H200 run ran past its time limit before
printing (bench/gpu/README.md); no GPU figure is below.

Every process of a benchmark (coordinator, nodes, client) shares the machine below, and so
did whatever else ran on it: each section reports the CPU that other processes took during
its timed runs. On a 2-core machine that matters; the ratios and per-job CPU costs move
less than the absolute rates.
"""


def write_sections(sections: Mapping[str, str], machine: str, *, whole: bool) -> Path:
    """Write BENCHMARKS.md: the whole file, or only the given sections (others kept)."""
    kept: dict[str, str] = {}
    if BENCHMARKS_MD.exists():
        text = BENCHMARKS_MD.read_text()
        for name in SECTION_ORDER if not whole else SLOW_SECTIONS:
            start, end = _marker(name), _marker(name, end=True)
            if start in text and end in text:
                body = text.split(start, 1)[1].split(end, 1)[0]
                kept[name] = body.strip("\n")
    kept.update(sections)
    parts = [HEADER, machine]
    for name in SECTION_ORDER:
        if name in kept:
            parts.append(f"{_marker(name)}\n{kept[name]}\n{_marker(name, end=True)}")
    # atomic: a crash or Ctrl-C mid-write must not lose the sections this run kept
    atomic_write_text(BENCHMARKS_MD, "\n\n".join(p.strip("\n") for p in parts) + "\n")
    return BENCHMARKS_MD


def rewrite_section(name: str, render: Callable[[str], str]) -> Path:
    """Replace one section's text between its markers with `render(took)`, where `took` is
    the seconds its last run took, as that text gives them (the command line's "(N s)").
    Why: a full run of a slow section is 15-40 minutes here; re-tabulating its raw results
    after a change to its tables must not need another (`--from-json` of those benches)."""
    text = BENCHMARKS_MD.read_text()
    start, end = _marker(name), _marker(name, end=True)
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    took = body.split("` (", 1)[1].split(" s)", 1)[0]
    atomic_write_text(BENCHMARKS_MD, f"{head}{start}\n{render(took)}\n{end}{tail}")
    return BENCHMARKS_MD


def machine_section() -> str:
    return "## Machine\n\n" + table(("", ""), machine_rows())


# --- processes -----------------------------------------------------------------------------
def base_env(log_level: str) -> dict[str, str]:
    """Environment for child processes: no inherited SOGNI_* settings, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    env["SOGNI_COORDINATOR_PASSWORD"] = DEMO_PASSWORD
    env["SOGNI_COORDINATOR_LOG_LEVEL"] = log_level
    env["SOGNI_COORDINATOR_LOG_JSON"] = "true"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def spawn(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Proc:
    """Start `python <argv>` with stdout read as JSON event lines and stderr to a log file."""
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        popen = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            text=True,
            cwd=workdir,
        )
    return Proc(name, popen, log_path)
