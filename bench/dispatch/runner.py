"""Settings and the run: baseline, network start-up, warm-up, timed rounds, profile."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from bench import _common as common
from bench import _profile
from bench.dispatch import transport_floor
from bench.dispatch._parts import Settings
from bench.dispatch.baseline import Baseline, run_baseline
from bench.dispatch.network import Network, Round, run_round, start_network
from bench.instant import DISTINCT_SEEDS, noise_png
from sogni_devnet.localnet import Proc


@dataclass
class Report:
    settings: Settings
    baseline: Baseline
    rounds: list[Round]
    warmup: Round
    profile: _profile.Profile | None
    profile_error: str | None
    command: str
    startup_s: float
    paid_baseline: Baseline
    """The baseline with billing on: signed payer, reservation, settlement per receipt."""
    paid_rounds: list[Round]
    """Networked rounds of paid requests (billing on), interleaved with the free ones."""
    floor: list[tuple[str, float]] | None = None
    """CPU seconds per small frame: py-libp2p vs raw trio + Noise's cipher (`transport_floor`)."""
    distinct: Round | None = None
    """One round in which every image differs (seeds from `DISTINCT_SEEDS`): the coordinator's
    NudeNet check runs on each, where the other rounds' identical PNG is answered from its
    memory after the first. The CPU per job with the check on every image."""
    check_ms: float | None = None
    """CPU ms of one NudeNet check of a distinct 64x64 image, in this process (None: the
    detector is not installed)."""


def _print_round(label: str, r: Round) -> None:
    line = (
        f"  {label}: {r.jobs} jobs ({r.failed} failed) in {r.wall:.2f} s = "
        f"{r.jobs_per_s:.0f} jobs/s, p50 {common.percentile(r.latencies, 50) * 1000:.0f} ms, "
        f"p99 {common.percentile(r.latencies, 99) * 1000:.0f} ms"
    )
    if r.cpu:
        line += (
            f"; coordinator {r.cpu['coordinator'] / r.jobs * 1e3:.1f} ms CPU/job, "
            f"other processes {r.cpu['others'] / r.window * 100:.0f}% CPU"
        )
    print(line)


BASELINE_RUNS = 3
"""In-process runs per baseline: each waits on `syncfs`, which also flushes whatever else on
the machine's file system is dirty, so single runs differ by up to 1.7x here."""


def _median_baseline(settings: Settings, folder: Path, *, paid: bool) -> Baseline:
    """The run with the median throughput of `BASELINE_RUNS` (its idle and disk figures
    with it), each in a fresh folder, timed as production code runs (no per-task clock);
    its `split` is the median of as many runs with the per-task clock, whose parts split
    the time (and whose throughput compares with harnesses that always ran the clock)."""

    def one(i: int, by_task: bool) -> Baseline:
        return run_baseline(
            settings.requests,
            settings.images_per_request,
            settings.nodes,
            folder / str(i),
            paid=paid,
            by_task=by_task,
        )

    runs = sorted((one(i, False) for i in range(BASELINE_RUNS)), key=lambda b: b.jobs_per_s)
    clocked = sorted(
        (one(BASELINE_RUNS + i, True) for i in range(BASELINE_RUNS)), key=lambda b: b.jobs_per_s
    )
    print(
        "  runs: "
        + ", ".join(f"{b.jobs_per_s:.0f}" for b in runs)
        + " jobs/s; with the per-task clock: "
        + ", ".join(f"{b.jobs_per_s:.0f}" for b in clocked)
    )
    return dataclasses.replace(runs[len(runs) // 2], split=clocked[len(clocked) // 2])


def run(settings: Settings, command: str) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="sogni-bench-dispatch-"))
    procs: list[Proc] = []
    try:
        print(f"dispatch: baseline (in-process Dispatcher + Store, {settings.jobs} jobs)")
        baseline = _median_baseline(settings, workdir / "baseline", paid=False)
        print(f"  {baseline.jobs_per_s:.0f} jobs/s of coordinator work")
        paid_baseline = _median_baseline(settings, workdir / "baseline-paid", paid=True)
        print(f"  paid (billing on): {paid_baseline.jobs_per_s:.0f} jobs/s of coordinator work")
        started = time.perf_counter()
        print(
            f"dispatch: starting a coordinator and {settings.nodes} nodes "
            f"({settings.processes} processes x {settings.nodes_per_process}); logs in {workdir}"
        )
        net = start_network(settings, workdir, procs)
        startup = time.perf_counter() - started
        print(f"  up in {startup:.1f} s")
        warmup = trio.run(run_round, net.addr, 2, settings.nodes, 1)
        _print_round("warm-up", warmup)
        rounds: list[Round] = []
        paid_rounds: list[Round] = []
        profile: _profile.Profile | None = None
        profile_error: str | None = None
        use_py_spy = settings.profile and _profile.py_spy() is not None
        for r in range(settings.rounds):
            seed = 1000 * (r + 1)
            result = net.timed_round(settings, seed)
            rounds.append(result)
            _print_round(f"round {r + 1}", result)
            paid = net.timed_round(settings, seed + 500, paid=True)
            paid_rounds.append(paid)
            _print_round(f"round {r + 1}, paid", paid)
        distinct = net.timed_round(settings, DISTINCT_SEEDS)
        _print_round("distinct images (image check on every one)", distinct)
        if use_py_spy:  # one more round, not counted: py-spy takes ~25% of a core here
            spy_out = workdir / "coordinator.py-spy.txt"
            try:
                with _profile.sampling(net.coordinator.popen.pid, spy_out):
                    profiled = net.timed_round(settings, 1000 * (settings.rounds + 1))
                _print_round("profiled round (py-spy, not counted)", profiled)
                profile = _profile.from_py_spy(spy_out)
            except (OSError, RuntimeError) as exc:
                profile_error = f"py-spy failed: {exc}"
        if settings.profile and profile is None:
            profile = _cprofile_round(net, settings)
        for proc in reversed(procs):  # the floor is measured on a quiet machine
            proc.stop()
        print("dispatch: transport floor (py-libp2p vs raw trio + ChaCha20-Poly1305)")
        floor = transport_floor.measure()
        check_ms = detector_cpu_ms()
        if check_ms is not None:
            print(f"  NudeNet check of a distinct 64x64 image: {check_ms:.1f} ms CPU")
        return Report(
            settings,
            baseline,
            rounds,
            warmup,
            profile,
            profile_error,
            command,
            startup,
            paid_baseline,
            paid_rounds,
            floor,
            distinct,
            check_ms,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not settings.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _cprofile_round(net: Network, settings: Settings) -> _profile.Profile:
    """No py-spy: one more round with cProfile switched on inside the coordinator."""
    net.coordinator.popen.send_signal(signal.SIGUSR1)
    net.coordinator.wait_event("profiling", 10)
    result = trio.run(run_round, net.addr, settings.requests, settings.images_per_request, 99_000)
    net.coordinator.popen.send_signal(signal.SIGUSR2)
    path = Path(str(net.coordinator.wait_event("profiled", 60)["path"]))
    _print_round("profiled round (cProfile)", result)
    return _profile.from_cprofile(path)


def detector_cpu_ms(images: int = 40) -> float | None:
    """CPU ms per NudeNet check of distinct 64x64 noise images, as the coordinator runs it
    (`ImageSafety`'s detector: one onnxruntime thread), after one warm-up image."""
    from sogni_coordinator.safety.detector import DetectorMissing, require_detector

    try:
        require_detector()
        from sogni_coordinator.safety.detector import shared_detector

        detector = shared_detector()
    except DetectorMissing:
        return None
    pngs = [noise_png(64, DISTINCT_SEEDS + i) for i in range(images + 1)]
    detector.scores(pngs[0])
    started = time.process_time()
    for png in pngs[1:]:
        detector.scores(png)
    return (time.process_time() - started) / images * 1000
