"""`python -m bench [SECTION...] [--quick] [--json] [--against COMMIT]`: run benchmarks,
write BENCHMARKS.md.

With no section named, every benchmark but the slow `unet` one runs and BENCHMARKS.md is
rewritten whole (keeping the `unet` section); naming sections reruns only those and keeps the
others' text as it was. `--json` prints the headline figures as one JSON object on the last
line of stdout (`bench._metrics.KEYS`, null where not measured); `--against COMMIT` measures
the overhead, dispatch and settlement sections of COMMIT too, in the same run, and prints old
vs new (the JSON object then also has `against` and `against_commit`).
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread in this process too, before torch is imported anywhere: the direct
# baseline must run with the node's thread settings.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import shlex
import sys
import time

from bench import _common as common
from bench import _metrics
from sogni_protocol.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(common.SECTION_ORDER)}")
    parser.add_argument("--quick", action="store_true", help="smaller batches (about 2 min)")
    parser.add_argument("--keep", action="store_true", help="keep work folders and logs")
    parser.add_argument("--no-profile", action="store_true", help="dispatch: skip the profile")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the file")
    parser.add_argument(
        "--json", action="store_true", help="last line of stdout: the figures as one JSON object"
    )
    parser.add_argument(
        "--against",
        metavar="COMMIT",
        default=None,
        help="also measure COMMIT's overhead/dispatch/settlement (git archive, same .venv)",
    )
    parser.add_argument(
        "--fuzz-streams", type=int, default=None, help="fuzz: streams per protocol and client"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in common.SECTION_ORDER]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {list(common.SECTION_ORDER)}")
    sections = list(dict.fromkeys(args.sections)) or [
        s for s in common.SECTION_ORDER if s not in common.SLOW_SECTIONS
    ]
    whole = not args.sections
    configure_logging("warning", json=False)
    flags = [f for f, on in (("--quick", args.quick), ("--no-profile", args.no_profile)) if on]
    if args.fuzz_streams is not None:
        flags += ["--fuzz-streams", str(args.fuzz_streams)]
    if args.against is not None:
        try:
            _metrics.resolve_commit(common.REPO, args.against)
        except _metrics.AgainstError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(
            f"warning: load average is {load:.1f} before starting; other processes will "
            f"skew the numbers (reported as 'others' CPU)",
            file=sys.stderr,
        )
    started = time.perf_counter()
    out: dict[str, str] = {}
    figures = _metrics.empty()
    section_s: dict[str, float] = {}
    for name in sections:
        section_started = time.perf_counter()
        command = shlex.join(["python", "-m", "bench", *([] if whole else [name]), *flags])
        if name == "overhead":
            from bench import overhead

            o_settings = overhead.QUICK if args.quick else overhead.Settings()
            o_settings = overhead.Settings(**{**o_settings.__dict__, "keep": args.keep})
            o_report = overhead.run(o_settings, command)
            out[name] = overhead.render_markdown(o_report)
            figures.update(_metrics.from_overhead(o_report))
        elif name == "dispatch":
            from bench import dispatch

            d_settings = dispatch.QUICK if args.quick else dispatch.Settings()
            d_settings = dispatch.Settings(
                **{**d_settings.__dict__, "keep": args.keep, "profile": not args.no_profile}
            )
            d_report = dispatch.run(d_settings, command)
            out[name] = dispatch.render_markdown(d_report)
            figures.update(_metrics.from_dispatch(d_report))
        elif name == "settlement":
            from bench import settlement

            out[name], s_figures = settlement.run_with_metrics(args.quick)
            figures.update(s_figures)
        elif name == "governance":  # staking vote checkpoints, propose/vote/queue/execute
            from bench import governance_gas

            out[name] = governance_gas.run(args.quick)
        elif name == "disputes":  # open, commit, reveal, resolve, slashes through Disputes
            from bench import dispute_gas

            out[name] = dispute_gas.run(args.quick)
        elif name == "pricing":  # also proposes .cache/pricing_factors.proposed.toml
            from bench import pricing_scaling

            out[name] = pricing_scaling.run(args.quick)
        elif name == "fuzz":  # live daemons as processes, then the js-libp2p client
            from bench import fuzz

            out[name] = fuzz.run(args.quick, args.fuzz_streams)
        elif name == "chaos":  # node and coordinator processes SIGKILLed mid-run
            from bench import chaos

            out[name] = chaos.run(args.quick, command, keep=args.keep)
        elif name == "unet":  # runs each configuration in its own subprocess
            from bench import unet_steps

            out[name] = unet_steps.run(args.quick, command)
        elif name == "cpuvar":  # each CPU configuration in its own subprocess
            from bench import cpu_variation

            out[name] = cpu_variation.run(args.quick, command)
        elif name == "tolerance":  # trajectory commitments: step-check tolerance, detection
            from bench import trajectory_tolerance

            out[name] = trajectory_tolerance.run(args.quick, command)
        elif name == "image":  # image check: decode tolerance, detection, cost
            from bench import image_tolerance

            out[name] = image_tolerance.run(args.quick, command)
        elif name == "rerender":  # whole re-render: cross-mode image bound, detection
            from bench import rerender_tolerance

            out[name] = rerender_tolerance.run(args.quick, command)
        elif name == "rerender_weights":  # the 4-bit and fp8 modes, with the worker's weights
            from bench import rerender_tolerance

            out[name] = rerender_tolerance.run_same_weights(args.quick, command)
        elif name == "content":  # prompt policy: refusal rates on the corpus, cost per prompt
            from bench import content_policy

            out[name] = content_policy.run(args.quick, command)
        elif name == "safety_image":  # image check: detector cost per image (docs/SAFETY.md)
            from bench import safety_image

            out[name] = safety_image.run(args.quick, command)
        elif name == "shapes":  # sogni-shapes-64 prompt adherence (issue #17)
            from bench import shape_adherence

            out[name] = shape_adherence.run(args.quick, command)
        elif name == "cluster":  # coordinators on SQLite vs 1-3 on one PostgreSQL (#18)
            from bench import cluster

            out[name] = cluster.run(args.quick, command, keep=args.keep)
        section_s[name] = round(time.perf_counter() - section_started, 1)
        print(f"bench: {name} took {section_s[name]:.0f} s", file=sys.stderr, flush=True)
    old: _metrics.Metrics | None = None
    if args.against is not None:
        try:
            old = _metrics.run_against(common.REPO, args.against, sections, args.quick)
        except _metrics.AgainstError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    elapsed = time.perf_counter() - started
    for text in out.values():
        print("\n" + text)
    if old is not None:
        print("\n" + _metrics.comparison_markdown(old, figures, args.against))
        for name in out:  # each measured section carries its own old-vs-new table
            if name in _metrics.SECTION_KEYS:
                table = _metrics.comparison_markdown(
                    old, figures, args.against, _metrics.SECTION_KEYS[name], level="###"
                )
                out[name] = out[name].rstrip("\n") + "\n\n" + table
    if not args.no_write:
        path = common.write_sections(out, common.machine_section(), whole=whole)
        print(f"wrote {path} ({', '.join(out)}) in {elapsed:.0f} s")
    if args.json:
        extra: dict[str, object] = {"section_s": section_s, "elapsed_s": round(elapsed, 1)}
        if old is not None:
            extra.update(against_commit=args.against, against=old)
        print(_metrics.json_line(figures, extra), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
