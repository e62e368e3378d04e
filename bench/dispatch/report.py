"""The BENCHMARKS.md section: tables and a paragraph naming the limit, from the numbers."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable

from bench import _common as common
from bench.dispatch._parts import COMMIT, FLOOR_JOBS_PER_S
from bench.dispatch.baseline import PART_IDLE, PART_LOOP, PART_READER, Baseline
from bench.dispatch.network import Round
from bench.dispatch.runner import BASELINE_RUNS, Report
from sogni_coordinator.dispatch import MAX_LOOKAHEAD, Dispatcher


# --- markdown -------------------------------------------------------------------------------
def _ms(values: list[float], q: float) -> float:
    return common.percentile(values, q) * 1000


def render_markdown(report: Report) -> str:
    s = report.settings
    rounds = report.rounds
    base = report.baseline
    rates = [r.jobs_per_s for r in rounds]
    rate = common.median(rates)
    failed = sum(r.failed for r in rounds)
    p50 = [_ms(r.latencies, 50) for r in rounds]
    p99 = [_ms(r.latencies, 99) for r in rounds]
    receipted = [r for r in rounds if r.receipted]
    cores = os.cpu_count() or 1
    pct = "{:.0f}"
    rows: list[tuple[str, str]] = [
        ("jobs per round", f"{s.jobs} ({failed} failed over all rounds)"),
        ("**throughput, networked**", f"**{common.spread(rates, pct)} jobs/s**"),
        (
            "floor",
            f"{FLOOR_JOBS_PER_S:.0f} jobs/s: {'met' if rate >= FLOOR_JOBS_PER_S else 'NOT met'} "
            f"({rate / FLOOR_JOBS_PER_S:.2f}x)",
        ),
        (
            "baseline: the coordinator's own work, no network",
            f"{base.jobs_per_s:.0f} jobs/s ({base.seconds / base.jobs * 1e6:.0f} us per job, "
            f"{base.busy_seconds / base.jobs * 1e6:.0f} us of it running code, "
            f"{base.cpu_seconds / base.jobs * 1e6:.0f} us of the loop thread's CPU)",
        ),
        *(
            [
                (
                    "baseline timed by task, as older harnesses timed it",
                    f"{base.split.jobs_per_s:.0f} jobs/s",
                )
            ]
            if base.split is not None
            else []
        ),
        ("**ratio networked / baseline**", f"**{rate / base.jobs_per_s:.2f}**"),
        (
            "coordinator capacity at one full core (jobs per coordinator CPU-second)",
            f"{common.spread([r.jobs / r.cpu['coordinator'] for r in rounds], pct)} jobs/s",
        ),
        ("latency p50, accepted -> image at client", f"{common.spread(p50, pct)} ms"),
        *_check_rows(report),
        ("latency p99", f"{common.spread(p99, pct)} ms"),
    ]
    if receipted:
        rp50 = [_ms(r.receipted, 50) for r in receipted]
        rp99 = [_ms(r.receipted, 99) for r in receipted]
        rows += [
            ("  of which accepted -> receipt committed, p50", f"{common.spread(rp50, pct)} ms"),
            ("  accepted -> receipt committed, p99", f"{common.spread(rp99, pct)} ms"),
        ]
    rows.append(("time to drain a batch", f"{common.spread([r.wall for r in rounds], '{:.1f}')} s"))
    rows += _paid_rows(report, rate)
    lines = [
        "## Dispatch: one coordinator, 50 instant nodes",
        "",
        f"Command: `{report.command}` (load average {_load_note()} when written: the "
        f"machine is shared, so figures move with the other work on it)",
        "",
        f"The coordinator runs alone in its own process (`bench._coordinator`: the CLI's "
        f"`run_coordinator`, SQLite on disk, log level info). {s.nodes} real node daemons "
        f"(`run_node`: own libp2p host, wallet and SQLite journal each, 1 slot) run "
        f"{s.nodes_per_process} per process in {s.processes} processes over `InstantBackend` "
        f"(a ready 64x64 PNG of 12 KB after 1 step, the same bytes every time; the coordinator's "
        f"content-safety check, on as shipped, runs NudeNet on it once and answers the rest "
        f"from memory, so one more round sends distinct images to price the check), log "
        f"level warning. This process is the "
        f"client: each round sends {s.requests} requests of {s.images_per_request} images at "
        f"once, each from its own libp2p host ({s.jobs} jobs), and times each job from "
        f"`requestAccepted` to its image. Median of {len(rounds)} rounds after a warm-up "
        f"round; min-max in brackets. Baseline (same run, same {s.requests} x "
        f"{s.images_per_request} jobs, the median of {BASELINE_RUNS} runs): the coordinator's "
        f"own code in one trio loop, "
        f"`Dispatcher.run` and `Store` on disk, results decoded, verified and acked, offers "
        f"and images encoded, with {s.nodes} fake nodes on memory channels instead of "
        f"libp2p, each holding {MAX_LOOKAHEAD} offers beyond its slot as an instant "
        f"`sogni_node.pull` node does (one `Ready` of slots + {MAX_LOOKAHEAD}, credit back "
        f"with each ack); the fake nodes' time (they time their own work) is subtracted, and "
        f"only the loop's waits are clocked (a trio instrument on its I/O wait, two calls per "
        f"loop turn); as many runs more with a clock on every task step split the time into "
        f"parts (that clock costs the loop time itself). Paid path: after each free round a "
        f"round of the same size whose requests "
        f"name a funded payer and carry its EIP-712 signature (the coordinator's billing is "
        f"`optional`, so these are billed: reservation, settlement per receipt, refund), and a "
        f"baseline with billing `required`.",
        "",
        common.table(("metric", "value"), rows),
        "",
        *_check_paragraph(report),
    ]
    cpu_rows = []
    for who in ("coordinator", "nodes", "client", "others"):
        shares = [r.cpu[who] / r.window * 100 for r in rounds]
        per_job = [r.cpu[who] / r.jobs * 1e3 for r in rounds]
        label = "other processes on the machine" if who == "others" else who
        cpu_rows.append((label, f"{common.median(shares):.0f}%", f"{common.median(per_job):.2f}"))
    total = [sum(r.cpu.values()) / r.window * 100 for r in rounds]
    cpu_rows.append(
        (f"whole machine ({cores} cores = {100 * cores}%)", f"{common.median(total):.0f}%", "")
    )
    lines += [
        "CPU during the timed rounds (from /proc; 100% = one core; medians):",
        "",
        common.table(("process", "CPU", "CPU ms per job"), cpu_rows),
        "",
    ]
    lines += _thread_table(report)
    split = base.by_part
    lines += [
        "The coordinator's own work per job (baseline, no network) and its primitives"
        + (
            ""
            if split is base
            else f" (parts from the median of as many runs timed by task, {split.jobs_per_s:.0f} "
            "jobs/s: the clock's two calls per task step are within this machine's run-to-run "
            "spread; harnesses before 2c009f0 timed every run so)"
        )
        + ":",
        "",
        common.table(
            ("part", "us per job"),
            [
                (k, f"{v / split.jobs * 1e6:.0f}")
                for k, v in sorted(split.parts.items(), key=lambda kv: kv[1], reverse=True)
            ]
            + [
                (
                    "`Router.pick` calls per job (`_match` wake-ups in all)",
                    f"{base.picks / base.jobs:.1f} ({base.matches})",
                )
            ]
            + [(f"primitive: {k}", f"{v:.0f} per call") for k, v in base.micro_us.items()],
        ),
        "",
    ]
    prof = report.profile
    if prof is not None:
        lines += [
            f"Coordinator profile: {prof.method}; {prof.seconds:.1f} s of its trio thread, "
            f"{prof.busy * 100:.0f}% busy (not waiting in epoll). Share of that thread's wall "
            f"time by innermost frame (time in a C call, e.g. an SQLite commit or a socket "
            f"send, counts for its caller), then by operation (inclusive):",
            "",
            common.table(
                ("innermost frame in", "share of wall time"),
                [(c, f"{v * 100:.1f}%") for c, v in prof.categories if v >= 0.005]
                + [("idle (waiting in epoll)", f"{prof.idle * 100:.1f}%")],
            ),
            "",
            common.table(
                ("operation (inclusive)", "share of wall time"),
                [(c, f"{v * 100:.1f}%") for c, v in prof.operations],
            ),
            "",
        ]
    elif report.profile_error:
        lines += [f"(No profile: {report.profile_error}.)", ""]
    lines += [_interpretation(report), ""]
    lines += _floor(report)
    return "\n".join(lines)


def _floor(report: Report) -> list[str]:
    """Is py-libp2p's per-frame cost the wall? The same small frames over raw trio + Noise's
    cipher (`bench.dispatch.transport_floor`), measured after the rounds."""
    floor = getattr(report, "floor", None)
    if not floor:
        return []
    us = {name: seconds * 1e6 for name, seconds in floor}
    if len(floor) != 6:  # another commit's floor (`--against`): its own rows, no text
        return [
            common.table(("way", "CPU us per frame"), [(n, f"{v:.1f}") for n, v in us.items()]),
            "",
        ]
    one, batched, direct_one, direct_batched, raw_one, raw_batched = (us[name] for name, _ in floor)
    return [
        "Transport floor (`python -m bench.dispatch.transport_floor`): CPU per 200-byte "
        "frame, both ends of one stream in one process (the coordinator pays one end):",
        "",
        common.table(("way", "CPU us per frame"), [(n, f"{v:.1f}") for n, v in us.items()]),
        "",
        f"py-libp2p costs {one / raw_one:.0f}x a raw trio socket with the same AEAD per frame "
        f"when each frame is its own write ({one:.0f} vs {raw_one:.0f} us), and "
        f"{batched / raw_batched:.0f}x when frames share writes ({batched:.0f} vs "
        f"{raw_batched:.1f} us): yamux's per-frame locks, events and window bookkeeping in "
        f"Python. A direct channel (the same `Channel`, Noise on its own TCP connection, no "
        f"yamux: `sogni_net.direct`, what node job sessions and app requests use) costs "
        f"{direct_one:.0f} us one frame at a time ({one / direct_one:.1f}x less than "
        f"py-libp2p) and {direct_batched:.1f} us batched ({batched / direct_batched:.1f}x "
        f"less); what is left above the raw rows is the channel's own Python (its frame "
        f"queue, the writer and reader tasks waking each other) and Noise's per-message "
        f"work. Below that, only native code would go (Noise and the framing in Rust via "
        f"PyO3). For the streams still on yamux (gossip, epochs, relay), py-libp2p also sends a "
        f"yamux WINDOW_UPDATE after nearly every read (its `PY_YAMUX_RELEASE_ON_READ`, on by "
        f"default): 5.5 per job at the coordinator in one cProfile round (30 Nov 2026), 2.9 "
        f"with it off (and 27% fewer socket reads). `sogni_net.channel` turns it off in every "
        f"process of this tree (its go-yamux-style rule then returns credit every other "
        f"small read: half the updates; the js-libp2p interop test and tests/net pass).",
        "",
    ]


def _check_rows(report: Report) -> list[tuple[str, str]]:
    """The content-safety image check (NudeNet) with and without pixel work per image: the
    timed rounds send one PNG over and over, which the check answers from memory after the
    first; the distinct round's images all differ, so it runs the model on every one."""
    rounds = report.rounds
    same = common.median([r.cpu["coordinator"] / r.jobs * 1e3 for r in rounds])
    loop = common.median([r.coordinator_thread[0] / r.jobs * 1e3 for r in rounds])
    rows = [
        (
            "coordinator CPU per job, image check answered from memory (the rounds above)",
            f"{same:.2f} ms ({loop:.2f} ms of it on the event-loop thread)",
        )
    ]
    d = getattr(report, "distinct", None)
    if d is not None and d.cpu:
        checked = d.cpu["coordinator"] / d.jobs * 1e3
        d_loop = d.coordinator_thread[0] / d.jobs * 1e3
        rows.append(
            (
                "**coordinator CPU per job, NudeNet on every image** (one round, distinct images)",
                f"**{checked:.2f} ms** ({1000 / checked:.0f} jobs per CPU-second; "
                f"{d_loop:.2f} ms of it on the event-loop thread, the rest in the check's "
                f"worker threads; {d.jobs_per_s:.0f} jobs/s, {d.failed} failed)",
            )
        )
    check_ms = getattr(report, "check_ms", None)
    if check_ms is not None:
        rows.append(("  of which one NudeNet check, measured alone", f"{check_ms:.1f} ms CPU"))
    return rows


def _check_paragraph(report: Report) -> list[str]:
    """What the content-safety check costs and why the timed rounds barely pay it."""
    d = getattr(report, "distinct", None)
    check_ms = getattr(report, "check_ms", None)
    if d is None or not d.cpu:
        return []
    same = common.median([r.cpu["coordinator"] / r.jobs * 1e3 for r in report.rounds])
    checked = d.cpu["coordinator"] / d.jobs * 1e3
    alone = f" ({check_ms:.1f} ms measured alone)" if check_ms is not None else ""
    return [
        f"The content-safety image check (docs/SAFETY.md) runs NudeNet's 320n model on every "
        f"delivered image, at the model's own 320x320 input whatever the image's size (a "
        f"smaller input would be cheaper for 64-px images but detects differently, and no "
        f"labelled set here can show it is as safe). It runs in worker threads (one "
        f"onnxruntime thread each, no spin-waiting), so it takes CPU beside the event loop, "
        f"not from it. Its scores are remembered by the image's SHA-256: the same bytes "
        f"always score the same, so the instant nodes' one PNG is checked once, and a result "
        f"re-sent after a timeout or the same job re-rendered elsewhere costs nothing "
        f"again. Every image distinct, the coordinator needs {checked:.1f} ms of CPU per "
        f"job against {same:.1f} ms: the check costs about {checked - same:.0f} ms per "
        f"image{alone}, so a real network's coordinator needs about one core for the check "
        f"per {1000 / max(checked - same, 0.1):.0f} images per second, on top of its event "
        f"loop.",
        "",
    ]


def _paid_rows(report: Report, free_rate: float) -> list[tuple[str, str]]:
    """The paid path: the same jobs with billing on (payer signature checked, quote reserved in
    the ledger, each receipt settled, the rest refunded)."""
    paid, base = report.paid_rounds, report.paid_baseline
    if not paid:
        return []
    rates = [r.jobs_per_s for r in paid]
    rate = common.median(rates)
    pct = "{:.0f}"
    return [
        (
            "**paid path (billing on), networked**",
            f"**{common.spread(rates, pct)} jobs/s** ({rate / free_rate:.2f} of free; "
            f"{sum(r.failed for r in paid)} failed)",
        ),
        (
            "paid path baseline: the coordinator's own work, no network",
            f"{base.jobs_per_s:.0f} jobs/s ({base.seconds / base.jobs * 1e6:.0f} us per job; "
            f"{base.jobs_per_s / report.baseline.jobs_per_s:.2f} of free)",
        ),
        ("ratio paid networked / paid baseline", f"{rate / base.jobs_per_s:.2f}"),
        (
            "paid latency p50, accepted -> image at client",
            f"{common.spread([_ms(r.latencies, 50) for r in paid], pct)} ms",
        ),
    ]


def _thread_table(report: Report) -> list[str]:
    """Where the coordinator's trio thread was during the rounds: on CPU, queued, blocked."""
    rounds = [r for r in report.rounds if not math.isnan(r.coordinator_thread[0])]
    if not rounds:
        return []
    on_cpu = [r.coordinator_thread[0] / r.window for r in rounds]
    queued = [r.coordinator_thread[1] / r.window for r in rounds]
    off = [max(0.0, 1 - a - b) for a, b in zip(on_cpu, queued, strict=True)]
    rows = [
        ("running on a CPU", f"{common.median(on_cpu) * 100:.0f}%"),
        (
            "runnable, waiting for a CPU (cores busy elsewhere)",
            f"{common.median(queued) * 100:.0f}%",
        ),
        ("blocked in the kernel (epoll wait, fsync, ...)", f"{common.median(off) * 100:.0f}%"),
    ]
    return [
        "The coordinator's trio thread during the rounds (/proc/PID/schedstat; share of wall):",
        "",
        common.table(("state", "share"), rows),
        "",
    ]


def _disk_sentence(base: Baseline) -> list[str]:
    """Why the in-process run waits: its acks wait on the database writer's two steps (and
    its loop on the GIL the writer's threads hold)."""
    disk = base.disk
    if disk is None or not disk.groups or not disk.stages:
        return []
    idle_us = base.parts.get(PART_IDLE, 0.0) / base.jobs * 1e6
    stage_ms = disk.stage_s / disk.stages * 1e3
    return [
        f"The in-process figure also waits on the disk: its loop sat idle "
        f"{idle_us:.0f} us per job while the database writer stored {disk.stages} image "
        f"groups of {disk.staged / disk.stages:.0f} ({stage_ms:.1f} ms each: the files and "
        f"one `syncfs`) and committed {disk.groups} transactions of "
        f"{disk.writes / disk.groups:.0f} writes ({disk.commit_s / disk.groups * 1e3:.1f} ms "
        f"each, fsync included); a job is acked only after both, and a one-slot node's next "
        f"result is settled only once its last is answered (`results_at_once`), so the "
        f"{base.nodes} nodes keep about {base.nodes} receipts in those steps at a time. Its "
        f"loop-busy time alone would allow {1e6 / (base.busy_seconds / base.jobs * 1e6):.0f} "
        f"jobs/s, but not all of that idle is the disk's: it lasts until the loop's thread "
        f"holds the GIL again, and changes that cut it moved as much time into the loop's "
        f'CPU (docs/ARCHITECTURE.md, "What the baseline\'s idle is").'
    ]


def _interpretation(report: Report) -> str:
    """One paragraph naming the limit, computed from the numbers above."""
    rounds = report.rounds
    base = report.baseline
    cores = os.cpu_count() or 1

    def med(fn: Callable[[Round], float]) -> float:
        return common.median([fn(r) for r in rounds])

    def per_job_us(part: str) -> float:
        split = base.by_part
        return split.parts.get(part, 0.0) / split.jobs * 1e6

    rate = med(lambda r: r.jobs_per_s)
    coord_ms = med(lambda r: r.cpu["coordinator"] / r.jobs * 1e3)
    ours_ms = med(lambda r: sum(v for k, v in r.cpu.items() if k != "others") / r.jobs * 1e3)
    others = med(lambda r: r.cpu["others"] / r.window * 100)
    machine = med(lambda r: sum(r.cpu.values()) / r.window * 100)
    queued = med(lambda r: r.coordinator_thread[1] / r.window * 100)
    on_cpu = med(lambda r: r.coordinator_thread[0] / r.window * 100)
    busy_us = base.busy_seconds / base.jobs * 1e6
    commit_us = base.micro_us.get(COMMIT, float("nan"))
    transport_ms = max(0.0, coord_ms - busy_us / 1000)
    capacity = 1000 / coord_ms
    grouped = inspect.iscoroutinefunction(Dispatcher.accept_result)
    picks = base.picks / max(base.jobs, 1)
    walk = (
        ", as a freed node may only take jobs of requests holding fewer than 16 nodes and "
        "the walk goes on past every job it may not take"
        if picks > 3
        else ""
    )
    commit = (
        "receipts are committed in groups in a worker thread"
        if grouped
        else "each receipt is committed, with an fsync, on the event loop"
    )
    text = [
        f"{rate:.0f} jobs/s is {'above' if rate >= FLOOR_JOBS_PER_S else 'below'} the "
        f"{FLOOR_JOBS_PER_S:.0f} jobs/s floor and {rate / base.jobs_per_s:.2f} of the "
        f"{base.jobs_per_s:.0f} jobs/s the coordinator's own work allows.",
        f"That work costs {busy_us:.0f} us of loop time per job: {per_job_us(PART_LOOP):.0f} us in "
        f"`Dispatcher.run` (`_match` calls `Router.pick` over the nodes with credit only, "
        f"for each queued job it looks at: {picks:.0f} per job here{walk}; a pass remembers "
        f"each node's tier, fit and score, so a pick is a few lookups per node with credit; "
        f"plus signing the offer), "
        f"{per_job_us(PART_READER):.0f} us handling results (ECDSA recovery, bookkeeping); "
        f"{commit} ({commit_us:.0f} us per single commit).",
        *_disk_sentence(base),
        f"Networked, the coordinator uses {coord_ms:.1f} ms of CPU per job, so about "
        f"{transport_ms:.1f} ms goes to the frames per job (result, with the node's `Ready` "
        f"in the same write; ack and next offer in one write; image; no per-step progress) "
        f"through the channels (node sessions and app requests on direct channels: Noise "
        f"straight on their own TCP connection, no yamux; `sogni_net.direct`), trio tasks, "
        f"locks and wake-ups, a socket send per write (queued frames share one). With a core "
        f"to itself it would manage ~{capacity:.0f} jobs/s.",
        f"All processes together need {ours_ms:.1f} ms of CPU per job (the simulated nodes "
        f"and the client pay the same per-frame costs), so {cores} cores cap this test near "
        f"{cores * 1000 / ours_ms:.0f} jobs/s on an idle machine; during the rounds the machine "
        f"was {machine:.0f}% busy of {cores * 100}% ({others:.0f}% other processes) and the "
        f"coordinator's trio thread ran {on_cpu:.0f}% of the time and waited for a core "
        f"{queued:.0f}%.",
    ]
    best = max(rounds, key=lambda r: r.jobs_per_s)
    worst = min(rounds, key=lambda r: r.jobs_per_s)
    if best.jobs_per_s > 1.15 * worst.jobs_per_s:
        text.append(
            f"Rounds track the machine's other load: {best.jobs_per_s:.0f} jobs/s with other "
            f"processes at {best.cpu['others'] / best.window * 100:.0f}% of a core, "
            f"{worst.jobs_per_s:.0f} jobs/s at {worst.cpu['others'] / worst.window * 100:.0f}%."
        )
    prof = report.profile
    if prof is not None:
        top = ", ".join(
            f"{c.split(' (')[0].lower()} {v * 100:.0f}%" for c, v in prof.categories[:3]
        )
        text.append(f"Its profile: {top}; idle {prof.idle * 100:.0f}%.")
    ops = dict(prof.operations) if prof is not None else {}
    frames = sum(v for k, v in ops.items() if "Yamux" in k or "DirectStream" in k)
    own = sum(v for k, v in ops.items() if "_match" in k or k.startswith("verify"))
    split = (
        f" (on its thread: reading and writing frames {frames * 100:.0f}%, matching and "
        f"result handling {own * 100:.0f}%)"
        if ops
        else ""
    )
    text.append(
        "So the limit is CPU: one single-threaded event loop "
        + ("starved of a core by everything else on the machine, " if queued >= 25 else "")
        + f"whose time goes to trio's task switching and the frames' Python around the "
        f"dispatch work itself{split}."
    )
    receipted = [_ms(r.receipted, 50) for r in rounds if r.receipted]
    if receipted:
        text.append(
            f"Latency is queueing (all {report.settings.jobs} jobs are accepted at once and "
            f"drain in {med(lambda r: r.wall):.0f} s): p50 {common.median(receipted):.0f} ms "
            f"to the receipt, {med(lambda r: _ms(r.latencies, 50)):.0f} ms to the client. A "
            f"client stream writes every image ready at once in one write: one socket send on "
            f"a direct channel; over libp2p the channel hands what the yamux window allows to "
            f"the connection as one write of all its 64 KB frames (`sogni_net.channel._write`), "
            f"because py-libp2p's own write awaits four locks and a checkpoint per frame, each "
            f"a full turn of the busy loop (writes of 40-60 images took 1.5-2.5 s before that, "
            f"traced 30 Nov 2026, load average 10)."
        )
    return " ".join(text)


def _load_note() -> str:
    """The 1/5/15-minute load averages now, e.g. "4.1 / 6.6 / 7.1"."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"
