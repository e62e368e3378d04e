"""Shared pieces of the image-check tests: the real detector (loaded once per process), the
synthetic trigger, and a policy file whose thresholds it crosses.

No explicit material exists here. `trigger.png` is a 16x16 pattern of coloured squares found
by a random search against NudeNet's shipped model (`make_trigger.py`): it depicts nothing,
yet at 128x128 the detector scores it as `BUTTOCKS_EXPOSED` (0.47). The tests run the real detector
on it, with an adult threshold below its score, so blurring and withholding are driven by a
real detection, not a stub."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from sogni_coordinator.content_policy import DEFAULT_POLICY_FILE
from sogni_coordinator.safety.detector import NudeNetDetector, shared_detector
from tests.e2e.conftest import backend, registry  # noqa: F401  (fixtures)

HERE = Path(__file__).parent
TRIGGER_CLASS = "BUTTOCKS_EXPOSED"
SIZE = 128
"""The size the trigger was searched at: it fires there (scaled otherwise, it does not)."""
TEST_THRESHOLD = 0.3
"""The test policy's adult threshold for `TRIGGER_CLASS` (the shipped one is 0.5)."""


def trigger(width: int = SIZE, height: int = SIZE, fmt: str = "PNG") -> bytes:
    """The synthetic trigger scaled (nearest) to `width` x `height`, encoded in `fmt`."""
    with Image.open(HERE / "trigger.png") as im:
        big = im.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
    out = io.BytesIO()
    big.save(out, format=fmt)
    return out.getvalue()


def policy_for_trigger(folder: Path) -> Path:
    """The shipped policy with the adult threshold of `TRIGGER_CLASS` lowered below the
    trigger's score (the minors table as shipped)."""
    text = DEFAULT_POLICY_FILE.read_text()
    shipped = f"{TRIGGER_CLASS} = 0.5 }}"
    assert shipped in text
    path = folder / "content_policy.toml"
    path.write_text(text.replace(shipped, f"{TRIGGER_CLASS} = {TEST_THRESHOLD} }}", 1))
    return path


@pytest.fixture(scope="session")
def detector() -> NudeNetDetector:
    return shared_detector()
