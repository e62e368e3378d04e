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

    good, other = _png((side, side)), _png((side, side + 8))
    expected = image_fault(other, "png", side, side)
    monkeypatch.setattr(image_check, "image_fault", recording)
    assert await check_image(good, "png", side, side) is None
    assert await check_image(other, "png", side, side) == expected
    assert await check_image(good[:40], "png", side, side) is not None  # truncated
    # small: the plain PNGs were decided on the loop without `image_fault`; what Pillow must
    # decide (the truncated file) goes to a thread; large: everything in a thread
    on_loop = side * side <= INLINE_PIXELS
    assert len(threads) == (1 if on_loop else 3)
    assert all(t != threading.get_ident() for t in threads)


async def test_a_small_png_of_compressed_text_is_refused_off_the_loop() -> None:
    """A 64 KiB PNG of zTXt chunks, each inflating to 1 MiB, went to Pillow on the event loop
    (0.4 s per result) and was accepted, text and all."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
        return struct.pack(">I", len(data)) + kind + data + crc

    png = _png((64, 64))
    text = chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(1 << 20), 9))
    n = (60 * 1024 - len(png)) // len(text)
    iend = png.rfind(b"IEND") - 4
    bomb = png[:iend] + text * n + png[iend:]
    assert len(bomb) <= image_check.INLINE_BYTES and n > 1
    loop = threading.get_ident()
    decided: list[int] = []
    real = image_check._pillow_fault

    def recording(*args: object) -> str | None:
        decided.append(threading.get_ident())
        return real(*args)  # type: ignore[arg-type]

    image_check._pillow_fault = recording  # type: ignore[assignment]
    try:
        fault = await check_image(bomb, "png", 64, 64)
    finally:
        image_check._pillow_fault = real
    assert fault is not None and "does not decode" in fault
    assert decided and loop not in decided


async def test_a_small_job_answered_with_a_huge_image_is_refused_unread() -> None:
    big = _png((2048, 2048))
    with trio.fail_after(1):
        fault = await check_image(big, "png", 64, 64)
    assert fault is not None and "2048x2048" in fault
