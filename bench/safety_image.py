"""Image check before delivery (docs/SAFETY.md): what NudeNet costs per image on CPU.

Median milliseconds of the shipped detector (NudeNet 3.4.2, onnxruntime CPU provider, the
coordinator's thread setting) on a 64x64 and a 512x512 PNG (noise: the detector's cost does
not depend on what the image shows, every image is resized to 320x320), the blur applied to
an adult image (and the second detection that checks it), and the model's load time (once
per process).

Run: ``.venv/bin/python -m bench safety_image [--quick]`` (writes its section of
BENCHMARKS.md; seconds).
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from bench import _common as common
from sogni_coordinator.safety.detector import THREADS, NudeNetDetector
from sogni_coordinator.safety.redact import blur


def _png(size: int) -> bytes:
    rng = np.random.default_rng(size)
    out = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def _ms(fn: object, arg: bytes, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run(quick: bool = False, command: str = "python -m bench safety_image") -> str:
    start = time.perf_counter()
    detector = NudeNetDetector()
    load_ms = (time.perf_counter() - start) * 1e3
    repeats = 10 if quick else 50
    rows = []
    figures: dict[int, float] = {}
    for size in (64, 512):
        image = _png(size)
        detector.scores(image)  # warm-up: the first run allocates
        times = _ms(detector.scores, image, repeats)
        figures[size] = common.median(times)
        blur_times = _ms(lambda im: blur(im, "png"), image, max(3, repeats // 5))
        rows.append((f"{size}x{size} png", common.spread(times), common.spread(blur_times)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return "\n".join(
        [
            "## Image check (safety, before delivery)",
            "",
            f"Command: `{command}`. NudeNet 3.4.2's shipped ONNX model (320x320 input) on "
            f"onnxruntime's CPU provider with {THREADS} threads, {repeats} runs per size after "
            f"a warm-up; {os.cpu_count()} CPUs, load average {load:.1f} at the end. Every "
            "delivered image pays the detection; an adult image for a request that did not opt "
            "in also pays the blur and a second detection. Model load, once per process: "
            f"{load_ms:.0f} ms.",
            "",
            common.table(("image", "detector ms, median (min-max)", "blur ms"), rows),
            "",
            f"Per image: about {figures[64]:.0f} ms at 64x64 and {figures[512]:.0f} ms at "
            "512x512 (the model input is 320x320 whatever the size; larger images add decode "
            "and resize).",
        ]
    )


if __name__ == "__main__":
    print(run(quick=True))
