"""The node's render slots: run jobs in worker threads, report steps, stop on request.

One `Worker` is shared by the pull sessions of every coordinator the node trusts, so the
slot count is global. Model work never touches the trio thread. Every render, whatever its
end, logs the stable `job_started` and `job_finished` events (docs/EVENTS.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from sogni_node.models.loras import LoraLibrary
from sogni_node.render.backend import Backend, RenderCancelled, RenderJob, RenderOutput
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import MAX_LOOKAHEAD, JobParams

log = get_logger(__name__)


class NoFreeSlot(Exception):
    pass


LOOKAHEAD = 1
"""Offers the node holds beyond its slots (pipelined credit) at the least: the next job is in
hand when a render ends, so a slot never idles for the result -> ack -> next offer round trip."""
PROMISE_SECONDS = 10.0
"""How long a `Ready`'s lookahead is honoured after it shrank: far longer than an offer the
coordinator sent before it saw the smaller `Ready` takes to arrive."""
OVERTIME_REASON = "render ran past its offer's deadline by as long again"
"""Why a render stopped by `Worker.render`'s `give_up_at` was handed back."""
_SMOOTHING = 0.2
"""Weight of the newest sample in the moving averages of render and round-trip time."""
FAILURE_STAGES = ("render", "journal", "sign", "trajectory", "upload", "other")
"""Where a job can fail (`job_failed`, the `stage` of `sogni_node_jobs_failed_total`):
the render itself; writing the journal (offer, image, receipt); signing the receipt;
keeping its trajectory; sending the result (too large for a frame); anything else."""


@dataclass(eq=False)
class Running:
    job_id: bytes
    cancel: threading.Event = field(default_factory=threading.Event)
    steps_done: int = 0
    reason: str = ""
    pay_partial: bool = False
    ended: trio.Event = field(default_factory=trio.Event)
    """Set when the slot is free again: a re-offer of this job waits for it."""
    owner: Any = None
    """The pull session that claimed it (`closed`: a `trio.Event`): another session's
    `Cancel` stops it only once that session has ended."""


def _render_job(params: JobParams, loras: LoraLibrary | None) -> RenderJob:
    """Wire parameters -> a backend job; LoRA ids become checked files (in a thread: hashing)."""
    if params.loras and loras is None:
        raise ValueError("this node has no LoRA library")
    prompt = params.positive_prompt
    if params.style_prompt:
        prompt = f"{prompt}, {params.style_prompt}"
    return RenderJob(
        model_id=params.model_id,
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        steps=params.steps,
        guidance=params.guidance,
        scheduler=params.scheduler or None,
        width=params.width,
        height=params.height,
        seed=params.seed,
        loras=loras.resolve(params.loras) if loras is not None else (),
        output_format=params.output_format,
    )


class Worker:
    def __init__(self, backend: Backend, slots: int, loras: LoraLibrary | None = None) -> None:
        self.backend = backend
        self.slots = slots
        self.loras = loras
        self.running: dict[bytes, Running] = {}
        self.finishing: dict[bytes, trio.Event] = {}
        """Jobs rendered or rendering whose result is not yet kept on disk (the slot is free
        once the render ends; a re-offer of the job must wait for the kept result)."""
        self._draining = False
        self._idle = trio.Event()
        self._idle.set()
        self.in_hand: set[bytes] = set()
        """Offers accepted without a free slot, waiting for one (`can_hold`)."""
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._render_s: float | None = None
        """Moving average of a render's wall time (thread hop included)."""
        self._round_trip_s: float | None = None
        """Moving average of result sent -> its ack received (the ack brings the credit back)."""
        self._promised = LOOKAHEAD
        self._promised_at = float("-inf")
        """The largest lookahead a recent `Ready` advertised, and when (`advertise`)."""

    def job_failed(self, model_id: str, stage: str) -> None:
        """A job failed outside its render (`FAILURE_STAGES`); the metered worker counts it."""

    def models_changed(self, models: list[str]) -> None:
        """The models served changed while the node runs (`sogni_node.live_install`)."""

    def lora_ids(self) -> list[str]:
        """LoRAs to advertise: none when the backend cannot apply them."""
        if self.loras is None or not self.backend.supports_loras:
            return []
        return self.loras.ids()[:256]

    def warm_models(self) -> list[str]:
        warm = getattr(self.backend, "warm_models", None)
        return list(warm()[:64]) if callable(warm) else []

    @property
    def free_slots(self) -> int:
        return 0 if self.draining else max(0, self.slots - len(self.running))

    @property
    def draining(self) -> bool:
        """Shutting down: no new jobs; offers in hand are handed back."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self.wake()

    @property
    def lookahead(self) -> int:
        """Offers to hold beyond the slots: enough to cover the round trip at the render rate
        (the slots finish `slots x round trip / render` jobs while a result's credit travels),
        at least `LOOKAHEAD`, at most `MAX_LOOKAHEAD`. A GPU render of seconds against a round
        trip of milliseconds keeps it at 1, so a real job is never held back from an idle
        node; only renders faster than the network (benchmarks, tiny models) pipeline deeper."""
        if self._render_s is None or self._round_trip_s is None:
            return LOOKAHEAD
        wanted = math.ceil(self.slots * self._round_trip_s / max(self._render_s, 1e-6))
        return max(LOOKAHEAD, min(MAX_LOOKAHEAD, wanted))

    def note_render(self, seconds: float) -> None:
        """A render took `seconds` of wall time."""
        self._render_s = _smoothed(self._render_s, seconds)

    def note_round_trip(self, seconds: float) -> None:
        """A result's ack came `seconds` after the result was written."""
        self._round_trip_s = _smoothed(self._round_trip_s, seconds)

    def advertise(self) -> int:
        """The lookahead for a `Ready` about to be sent, remembered: `can_hold` honours it
        for `PROMISE_SECONDS` even if the lookahead shrinks meanwhile."""
        lookahead = self.lookahead
        now = time.monotonic()
        if lookahead >= self._promised or now - self._promised_at >= PROMISE_SECONDS:
            self._promised, self._promised_at = lookahead, now
        return lookahead

    def can_hold(self) -> bool:
        """May one more offer wait here for a slot? As many as the lookahead, or as a recent
        `Ready` promised: offers it credited may still arrive after the lookahead shrank
        (renders got slower), and declining them would count against the node."""
        held = self.lookahead
        if time.monotonic() - self._promised_at < PROMISE_SECONDS:
            held = max(held, self._promised)
        return not self.draining and len(self.in_hand) < held

    async def changed(self) -> None:
        """Wait until a slot frees or `wake` is called (an offer in hand looks again)."""
        await self._slot_lot.park()

    def wake(self) -> None:
        """Let offers in hand look again (a slot freed, a cancel, draining)."""
        self._slot_lot.unpark_all()

    def claim(self, job_id: bytes) -> Running:
        """Reserve a slot now (synchronously), so two offers never race for the last one."""
        if self.draining:
            raise NoFreeSlot("node is shutting down")
        if job_id in self.running:
            raise NoFreeSlot("job is already running here")
        if len(self.running) >= self.slots:
            raise NoFreeSlot("no free render slot")
        run = Running(job_id)
        self.running[job_id] = run
        self._idle = trio.Event()
        return run

    async def render(
        self,
        run: Running,
        params: JobParams,
        on_step: Callable[[int], None],
        *,
        report_every: float = 0.0,
        give_up_at: float | None = None,
    ) -> RenderOutput:
        """Render in a thread; raises `RenderCancelled` if `cancel` was called meanwhile.

        `on_step` runs on the event loop, queued by the render thread without waiting for it
        (a blocking call into a busy loop stalled the render once per step, and cost about
        as much CPU as the hop into the thread); the steps it gets reach it in order, all of
        them before `render` returns. With `report_every` > 0 it gets the first step and then
        at most one per `report_every` seconds: each report wakes the loop through a socket,
        ~3% of a small model's render when every step went (`run.steps_done` still follows
        every step).

        `give_up_at` (unix seconds): the render stops at its first step after it, as if
        cancelled (`OVERTIME_REASON`): nobody waits for it any more, and a render stuck
        slow (a throttled GPU, a swapping host) would hold its slot for ever."""
        token = trio.lowlevel.current_trio_token()
        last_report = [float("-inf")]

        def report(i: int) -> None:  # on the loop: an exception here would end the run
            try:
                on_step(i)
            except Exception as exc:
                log.error("step_report_failed", error=type(exc).__name__)

        def step(i: int) -> None:
            run.steps_done = i
            if report_every > 0:
                now = time.monotonic()
                if now - last_report[0] < report_every:
                    return
                last_report[0] = now
            token.run_sync_soon(report, i)

        def should_cancel() -> bool:  # in the render thread, before each step
            if run.cancel.is_set():
                return True
            if give_up_at is not None and time.time() > give_up_at:
                run.reason = OVERTIME_REASON
                run.cancel.set()
                return True
            return False

        def render() -> RenderOutput:
            job = _render_job(params, self.loras)
            return self.backend.render(job, step, should_cancel)

        job_id = run.job_id.hex()[:16]
        log.info("job_started", job=job_id, model=params.model_id, steps=params.steps)
        started = time.monotonic()
        end: dict[str, object] = {"outcome": "failed"}
        try:
            out = await trio.to_thread.run_sync(render)
            self.note_render(time.monotonic() - started)
            end = {"outcome": "done"}
            run.steps_done = out.steps_done
            return out
        except (RenderCancelled, trio.Cancelled):
            end = {"outcome": "cancelled", "reason": run.reason or "cancelled"}
            raise
        except Exception as exc:  # the type only: a message may quote the job's parameters
            end["error"] = type(exc).__name__
            raise
        finally:
            self.release(run)
            seconds = round(time.monotonic() - started, 3)
            log.info("job_finished", job=job_id, seconds=seconds, steps=run.steps_done, **end)

    def release(self, run: Running) -> None:
        """Free `run`'s slot (idempotent): `render` does it, and so must whoever claimed a
        slot and then never rendered (the job failed before, or needed no render)."""
        if self.running.get(run.job_id) is run:
            del self.running[run.job_id]
            if not self.running:
                self._idle.set()
            self._slot_lot.unpark_all()
        run.ended.set()

    def cancel(self, job_id: bytes, reason: str, *, pay_partial: bool = False) -> bool:
        run = self.running.get(job_id)
        if run is None:
            return False
        run.reason = reason
        run.pay_partial = pay_partial
        run.cancel.set()
        return True

    def cancel_all(self, reason: str) -> list[bytes]:
        ids = list(self.running)
        for job_id in ids:
            self.cancel(job_id, reason)
        return ids

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else average + _SMOOTHING * (sample - average)
