"""Work units: how much rendering a job is worth, in milli render-seconds.

The whitepaper prices work in render seconds: one baseline HQ render (SDXL class,
1024x1024, 20 steps) is 43.2 render seconds and costs 1 Spark. Until per-model baselines
are measured (the economics issue), a job scales that baseline linearly in steps and pixels.
"""

from sogni_protocol.messages import JobParams

BASELINE_RENDER_SECONDS = 43.2
BASELINE_STEPS = 20
BASELINE_PIXELS = 1024 * 1024


def render_seconds(params: JobParams) -> float:
    return (
        BASELINE_RENDER_SECONDS
        * params.steps
        / BASELINE_STEPS
        * (params.width * params.height)
        / BASELINE_PIXELS
    )


def work_units(params: JobParams) -> int:
    """Integer milli render-seconds: what receipts carry and settlement adds up."""
    return max(1, round(render_seconds(params) * 1000))
