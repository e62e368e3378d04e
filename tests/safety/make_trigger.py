"""Regenerate `trigger.png`: a random search over 16x16 colour patterns for one that the
shipped NudeNet model scores highest on any class (run by hand: `python
tests/safety/make_trigger.py SEED ITERATIONS`; minutes on one core). The result depicts
nothing; it only exercises the detector's plumbing with a real detection."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sogni_coordinator.safety.detector import CLASSES, NudeNetDetector


def main(seed: int, iterations: int) -> None:
    import cv2
    from nudenet.nudenet import _read_image

    session = NudeNetDetector()._nudenet.onnx_session
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)

    def score(small: np.ndarray) -> np.ndarray:
        big = cv2.resize(small, (128, 128), interpolation=cv2.INTER_NEAREST)
        out = np.squeeze(session.run(None, {name: _read_image(big, 320)[0]})[0]).T
        return np.asarray(out[:, 4:].max(axis=0))

    small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    best = score(small)
    for _ in range(iterations):
        cand = small.copy()
        for _ in range(int(rng.integers(1, 6))):
            y, x = rng.integers(0, 16, 2)
            cand[y, x] = rng.integers(0, 256, 3)
        s = score(cand)
        if s.max() > best.max():
            small, best = cand, s
    top = int(np.argmax(best))
    print(CLASSES[top], round(float(best[top]), 3))
    # the search works on cv2's BGR order, as NudeNet reads files: saved as the same pixels
    Image.fromarray(small[:, :, ::-1]).save(Path(__file__).with_name("trigger.png"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
