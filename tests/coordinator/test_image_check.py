"""The cheap check every delivered image gets: it decodes, in the job's format and size."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from sogni_coordinator.dispatch import ResultRefused
from sogni_coordinator.image_check import _pillow_fault, _plain_png_fault, image_fault

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
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")
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


def _noise_png(mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = random.Random(seed)
    bands = len(mode)
    pixels = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * bands))
    buf = io.BytesIO()
    Image.frombytes(mode, size, pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_the_plain_png_path_decides_as_pillow_does_on_mutated_files() -> None:
    """The zlib-only path for the PNGs nodes write (`_plain_png_fault`) never passes what
    Pillow refuses: on valid files of both colour types and on 600 seeded mutations of them
    (bytes flipped, truncated, a chunk inserted, data appended, a bad filter byte) its
    verdict is Pillow's, and it decides the valid ones itself."""
    rng = random.Random(7)
    refused = 0
    for mode, (w, h), seed in (("RGB", (64, 64), 1), ("RGBA", (32, 48), 2)):
        png = _noise_png(mode, (w, h), seed)
        assert _plain_png_fault(png, w, h) is None  # decided on the fast path
        idat = slice(33 + 8, len(png) - 12 - 4)  # one IDAT between IHDR and IEND
        for _ in range(300):
            m = bytearray(png)
            how = rng.randrange(5)
            if how == 0:  # a flipped bit anywhere (header, data, CRC)
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
            elif how == 1:
                del m[rng.randrange(8, len(m)) :]
            elif how == 2:  # an ancillary chunk after IHDR
                m[33:33] = _chunk(b"tEXt", b"Comment\x00hi")
            elif how == 3:
                m += b"trailing"
            else:  # a filter byte out of range, in a well-formed IDAT
                raw = bytearray(zlib.decompress(png[idat]))
                raw[(1 + w * len(mode)) * rng.randrange(h)] = 9
                m[33 : len(m) - 12] = _chunk(b"IDAT", zlib.compress(bytes(raw)))
            mutated = bytes(m)
            pillow = _pillow_fault(mutated, "png", w, h)
            refused += pillow is not None
            assert image_fault(mutated, "png", w, h) == pillow, how
    assert refused > 200  # most mutations break the file: both verdicts were exercised


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
