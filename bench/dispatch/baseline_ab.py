"""The in-process baseline, this tree against another commit's, in alternated runs.

    python -m bench.dispatch.baseline_ab --against HEAD [--rounds 8] [--jobs 2000]

Why: on a shared machine the in-process baseline moves 1.2x between two runs of the same
code in one `python -m bench dispatch --against` (which runs each tree's whole bench once,
one after the other), more than most changes to the coordinator's per-job work. Here each
round runs one baseline of each tree, each in a fresh process (the other commit's tree
exported with `git archive`, first on the import path), the order swapped every round, and
the medians are compared. Per tree: jobs/s, the loop thread's CPU per job, its idle time per
job, and the database writer's time per commit group and per image group. A commit whose
harness lacks one of these figures reports it as `-`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import _common as common

FIGURES = ("jobs/s", "loop CPU us/job", "loop idle us/job", "commit ms/group", "images ms/group")

_ONE_RUN = """
import json, logging, sys, tempfile
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from bench.dispatch import baseline as b
requests, images, nodes = (int(a) for a in sys.argv[1:4])
kwargs = {"by_task": False} if "by_task" in b.run_baseline.__code__.co_varnames else {}
r = b.run_baseline(requests, images, nodes, Path(tempfile.mkdtemp()), **kwargs)
disk = getattr(r, "disk", None)
cpu = getattr(r, "cpu_seconds", 0.0)
print(json.dumps([
    r.jobs_per_s,
    cpu / r.jobs * 1e6 if cpu else None,
    r.parts.get(b.PART_IDLE, 0.0) / r.jobs * 1e6 if hasattr(b, "PART_IDLE") else None,
    disk.commit_s / disk.groups * 1e3 if disk and disk.groups else None,
    disk.stage_s / disk.stages * 1e3 if disk and getattr(disk, "stages", 0) else None,
]))
"""


def one_run(tree: Path, requests: int, images: int, nodes: int) -> list[float | None]:
    """One baseline run of `tree`'s harness and coordinator in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, str(requests), str(images), str(nodes)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"baseline run of {tree} failed: {last}")
    figures: list[float | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return common.median(known) if known else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="commit whose baseline runs too")
    parser.add_argument("--rounds", type=int, default=8, help="runs of each tree")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run (4 requests)")
    parser.add_argument("--nodes", type=int, default=50, help="one-slot fake nodes")
    args = parser.parse_args(argv)
    requests, images = 4, max(1, args.jobs // 4)
    with tempfile.TemporaryDirectory(prefix="sogni-baseline-ab-") as work:
        old_tree = Path(work) / "old"
        old_tree.mkdir()
        try:
            common.export_tree(args.against, old_tree)
        except common.ExportError as exc:
            raise SystemExit(f"git archive {args.against}: {exc}") from None
        trees = {args.against: old_tree, "this tree": common.REPO}
        runs: dict[str, list[list[float | None]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                runs[name].append(one_run(trees[name], requests, images, args.nodes))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{name} {runs[name][-1][0]:,.0f} jobs/s" for name in trees),
                flush=True,
            )
    print(f"\nmedians of {args.rounds} alternated runs ({requests * images} jobs each):")
    print("| figure | " + " | ".join(trees) + " | new / old |")
    print("|---|" + "---|" * (len(trees) + 1))
    for i, figure in enumerate(FIGURES):
        old, new = (_median([run[i] for run in runs[name]]) for name in trees)
        ratio = "-" if old is None or new is None or not old else f"{new / old:.2f}"
        print(f"| {figure} | {_cell(old)} | {_cell(new)} | {ratio} |")


if __name__ == "__main__":
    main()
