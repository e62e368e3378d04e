"""`Worker.render` reports steps to the event loop without stalling the render thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import trio

from sogni_node.render.backend import RenderJob, RenderOutput
from sogni_node.worker import Worker
from sogni_protocol.messages import JobParams

STEPS = 6


class _SteppingBackend:
    """Reports every step; records whether each report returned before the loop ran it."""

    name = "stepping"
    supports_loras = False

    def __init__(self, loop_busy: threading.Event) -> None:
        self.loop_busy = loop_busy
        self.returned_while_loop_busy: list[bool] = []
        self.started = threading.Event()
        self.go = threading.Event()

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        self.started.set()
        self.go.wait(10)
        for step in range(1, job.steps + 1):
            on_step(step)
            self.returned_while_loop_busy.append(self.loop_busy.is_set())
        return RenderOutput(b"", job.steps, self.name, "cpu", "float32", 1)

    def close(self) -> None:
        pass


def _params() -> JobParams:
    return JobParams(
        model_id="m", positive_prompt="x", steps=STEPS, guidance=1.0, width=64, height=64, seed=1
    )


async def test_steps_reach_the_loop_in_order_without_blocking_the_render() -> None:
    loop_busy = threading.Event()
    backend = _SteppingBackend(loop_busy)
    worker = Worker(backend, slots=1)
    seen: list[int] = []
    seen_when_returned: list[int] = []
    loop_busy.set()  # the loop cannot run step reports until the render thread is done

    def on_step(step: int) -> None:
        seen.append(step)

    async def render() -> None:
        await worker.render(worker.claim(b"\x01" * 32), _params(), on_step)
        seen_when_returned.extend(seen)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(render)
        with trio.fail_after(10):
            while not backend.started.is_set():
                await trio.sleep(0.01)  # the render thread starts
        backend.go.set()  # the render steps now, while this blocks the loop
        give_up = time.monotonic() + 10
        while len(backend.returned_while_loop_busy) < STEPS and time.monotonic() < give_up:
            time.sleep(0.01)  # block the loop itself: the reports must not wait for it
        rendered_while_blocked = list(backend.returned_while_loop_busy)
        loop_busy.clear()
    assert rendered_while_blocked == [True] * STEPS
    assert seen_when_returned == list(range(1, STEPS + 1))  # all, in order, before it returned


async def test_a_failing_step_report_does_not_end_the_render() -> None:
    backend = _SteppingBackend(threading.Event())
    backend.go.set()
    worker = Worker(backend, slots=1)

    def on_step(step: int) -> None:
        raise RuntimeError("progress sink broke")

    out = await worker.render(worker.claim(b"\x02" * 32), _params(), on_step)
    assert out.steps_done == STEPS


async def test_report_every_sends_the_first_step_then_at_most_one_per_interval() -> None:
    backend = _SteppingBackend(threading.Event())
    backend.go.set()
    worker = Worker(backend, slots=1)
    seen: list[int] = []
    run = worker.claim(b"\x03" * 32)
    # Every step of this backend lands within one interval (an hour), so only the first
    # wakes the loop; the run still records how far the render got.
    out = await worker.render(run, _params(), seen.append, report_every=3600.0)
    assert seen == [1]
    assert out.steps_done == STEPS and run.steps_done == STEPS
    seen.clear()
    await worker.render(worker.claim(b"\x04" * 32), _params(), seen.append, report_every=0.0)
    assert seen == list(range(1, STEPS + 1))
