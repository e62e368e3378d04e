"""Small jobs' images are checked on the event loop, larger ones in a worker thread: the
verdict is `image_fault`'s either way, and a small job cannot make the loop decode a big
image (its header is read and refused first)."""

from __future__ import annotations

import io
import threading

import pytest
import trio
from PIL import Image

from sogni_coordinator import image_check
from sogni_coordinator.image_check import INLINE_PIXELS, check_image, image_fault


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [64, 512])
async def test_the_verdict_is_image_faults_on_the_loop_or_in_a_thread(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = image_check.image_fault

    def recording(image: bytes, fmt: str, width: int, height: int) -> str | None:
        threads.append(threading.get_ident())
        return real(image, fmt, width, height)

    monkeypatch.setattr(image_check, "image_fault", recording)
    good, other = _png((side, side)), _png((side, side + 8))
    assert await check_image(good, "png", side, side) is None
    assert await check_image(other, "png", side, side) == image_fault(other, "png", side, side)
    assert await check_image(good[:40], "png", side, side) is not None  # truncated
    on_loop = side * side <= INLINE_PIXELS
    assert all((t == threading.get_ident()) == on_loop for t in threads) and len(threads) == 3


async def test_a_small_job_answered_with_a_huge_image_is_refused_unread() -> None:
    big = _png((2048, 2048))
    with trio.fail_after(1):
        fault = await check_image(big, "png", 64, 64)
    assert fault is not None and "2048x2048" in fault
