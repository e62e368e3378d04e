"""The image detector behind a small interface, so the policy does not depend on NudeNet.

Why NudeNet: its PyPI wheel ships its ONNX model (`320n.onnx`), so it runs offline on CPU
through onnxruntime with nothing downloaded at run time. It finds body parts (boxes with a
class and a score); it does not judge age, and nothing here pretends to (docs/SAFETY.md).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Protocol

__all__ = [
    "CLASSES",
    "Detector",
    "DetectorMissing",
    "NudeNetDetector",
    "require_detector",
    "shared_detector",
]

CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)  # fmt: skip
"""NudeNet 3.4's class names, the keys of `[image]` thresholds in the policy file."""

THREADS = max(1, min(4, os.cpu_count() or 1))
"""onnxruntime threads per call: enough for ~10 ms an image, without taking every core."""


class DetectorMissing(ValueError):
    """The detector's package is not installed (the `coordinator` extra); a ValueError so
    the config loader reports it as one line."""

    def __init__(self) -> None:
        super().__init__(
            "content: image_check needs NudeNet: pip install 'sogni-supernet[coordinator]' "
            "(or set [content] image_check = false)"
        )


def require_detector() -> None:
    """Raise `DetectorMissing` unless NudeNet and onnxruntime can be imported (cheap: no
    import, so the config loads fast)."""
    if any(importlib.util.find_spec(m) is None for m in ("nudenet", "onnxruntime", "cv2")):
        raise DetectorMissing


class Detector(Protocol):
    """Classifies one encoded image (png, jpeg or webp). Blocking: call from a worker thread;
    must be safe to call from several threads at once."""

    def scores(self, image: bytes) -> dict[str, float]:
        """The highest score per class found (classes not found are absent)."""
        ...


class NudeNetDetector:
    """NudeNet 3.4.2's detector on its shipped model, on onnxruntime's CPU provider."""

    def __init__(self) -> None:
        try:
            import nudenet
            import onnxruntime
            from nudenet import NudeDetector
        except ImportError:
            raise DetectorMissing from None
        model = Path(nudenet.__file__).with_name("320n.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._nudenet = NudeDetector(model_path=str(model))
        # NudeDetector ignores `providers` and the thread count; its session is replaced by
        # one pinned to the CPU provider (no Azure/GPU probing) and a bounded thread pool.
        self._nudenet.onnx_session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )

    def scores(self, image: bytes) -> dict[str, float]:
        import cv2
        import numpy as np

        mat = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        if mat is None:
            raise ValueError("the image does not decode")
        found: dict[str, float] = {}
        for box in self._nudenet.detect(mat):
            label, score = str(box["class"]), float(box["score"])
            found[label] = max(score, found.get(label, 0.0))
        return found


@lru_cache(maxsize=1)
def shared_detector() -> NudeNetDetector:
    """One detector per process: the model loads once (~0.2 s), sessions are thread-safe."""
    return NudeNetDetector()
