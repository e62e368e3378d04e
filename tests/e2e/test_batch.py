"""A 512-image request over 20 simulated nodes of mixed speeds finishes near the ideal time.

The nodes are real (libp2p, pull loop, receipts) but their backend only waits its node's
render time and returns a fixed PNG, so the test measures scheduling, not rendering.
Ideal: all 512 jobs spread over the 16 fastest nodes (a request uses at most 16 at once) with
no overhead at all. All 21 peers share this one Python process (about 22 jobs/s of libp2p and
signing work on this machine), so the simulated render times keep the demand below that.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from PIL import Image

from sogni_app.api import render
from sogni_node.render.backend import RenderJob, RenderOutput
from sogni_protocol.messages import RenderRequest

from .conftest import MODEL

_buf = io.BytesIO()
Image.new("RGB", (64, 64), (200, 30, 30)).save(_buf, format="PNG")
PNG = _buf.getvalue()


class TimedBackend:
    """Takes `seconds` per image: a simulated GPU of a given speed."""

    name = "timed"
    supports_loras = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        time.sleep(self.seconds)
        on_step(job.steps)
        return RenderOutput(PNG, job.steps, "timed", "cpu", "none", 1)

    def close(self) -> None:
        pass


@pytest.mark.serial  # a wall-time floor: another test on the same cores would break it
async def test_512_images_on_20_mixed_nodes_within_125_percent_of_ideal(net_factory: Any) -> None:
    speeds = [1.0] * 10 + [2.0] * 10
    async with net_factory() as net:
        for i, seconds in enumerate(speeds):
            await net.add_node(
                TimedBackend(seconds), f"n{i}", heartbeat_interval=2.0, heartbeat_timeout=10.0
            )
        request = RenderRequest(
            model_id=MODEL,
            positive_prompt="x",
            steps=1,
            width=64,
            height=64,
            number_of_images=512,
        )
        start = time.perf_counter()
        with trio.fail_after(120):
            result = await render(net.addr, request)
        elapsed = time.perf_counter() - start
    assert len(result.images) == 512 and not result.failed
    ideal = 512 / sum(sorted(1 / s for s in speeds)[-16:])
    workers = {im.receipt.worker for im in result.images}
    assert len(workers) == 20  # every node got work
    assert elapsed <= 1.25 * ideal, f"{elapsed:.1f} s vs ideal {ideal:.1f} s"
