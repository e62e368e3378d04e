"""The cheap check every delivered image gets: it decodes, in the job's format and size."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from sogni_coordinator.dispatch import ResultRefused
from sogni_coordinator.image_check import image_fault

from .conftest import Harness, request


def _encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a_real_image_of_the_jobs_format_and_size_passes(fmt: str) -> None:
    assert image_fault(_encoded(fmt.upper()), fmt, 64, 64) is None


def test_what_is_refused_and_why() -> None:
    png = _encoded("PNG")
    cases = {
        b"\x89PNG\r\n\x1a\n not a real image": "does not decode",
        png[: len(png) // 2]: "does not decode",  # truncated
        _encoded("JPEG"): "does not decode as the png",  # another format
        _encoded("PNG", (64, 128)): "image is 64x128, the job asked for 64x64",
        b"": "does not decode",
    }
    for image, why in cases.items():
        fault = image_fault(image, "png", 64, 64)
        assert fault is not None and why in fault, (image[:16], fault)


def test_a_decompression_bomb_is_refused_without_decoding_it() -> None:
    """A PNG header claiming 100k x 100k pixels (40 GB decoded) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    fault = image_fault(bomb, "png", 100_000, 100_000)
    assert fault is not None and "does not decode" in fault


async def test_a_node_delivering_garbage_is_not_paid_and_the_job_goes_back(
    coord: Harness,
) -> None:
    a = coord.node(0)
    sub = await coord.submit(request(1))
    coord.dispatcher.match()
    (offer,) = a.offers()
    with pytest.raises(ResultRefused, match="does not decode"):
        await coord.deliver(a, offer, image=b"\x89PNG\r\n\x1a\n noise, not an image")
    assert not coord.store.receipts()
    job = coord.dispatcher.jobs[sub.accepted.job_ids[0]]
    assert job.attempts == 1 and job.state.value == "queued"
