"""Image files written together: each durable and whole on disk, a failure only its own.

`ResultFiles.put` writes the images asked for while a write is under way in one worker
thread call (one sync for all of them); what the store counts as deliverable must be on disk
when `put` returns, and a stream reads it from memory without another thread hop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sogni_coordinator.delivery import Mailbox, ResultFiles
from sogni_coordinator.results import ResultKey
from sogni_protocol.messages import JobImage, RequestDone, decode
from tests.coordinator._helpers import job_image


async def test_images_written_at_once_are_each_on_disk_whole(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    images = {files.key(b"\x09" * 32, i, b"\x02" * 32): job_image(i) for i in range(1, 21)}
    async with trio.open_nursery() as nursery:
        for key, image in images.items():
            nursery.start_soon(files.put, key, image)
    for key, image in images.items():
        path = files.path_of(key)
        assert decode(path.read_bytes()) == image
        assert path.stat().st_mode & 0o777 == 0o600
        assert await files.get(key) is image  # from memory: no re-read
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    gone = next(iter(images))
    files.remove([gone])
    assert await files.get(gone) is None  # deleted and forgotten


async def test_a_failed_file_fails_alone(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    good = files.key(b"\x09" * 32, 1, b"\x02" * 32)
    blocked = files.key(b"\x0a" * 32, 2, b"\x02" * 32)
    files.path_of(blocked).parent.parent.mkdir(parents=True)
    files.path_of(blocked).parent.write_bytes(b"")  # a file where its folder should be
    outcome: dict[str, BaseException | None] = {}

    async def write(name: str, path: ResultKey, image: JobImage) -> None:
        try:
            await files.put(path, image)
            outcome[name] = None
        except OSError as exc:
            outcome[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, "good", good, job_image(1))
        nursery.start_soon(write, "blocked", blocked, job_image(2))
    assert outcome["good"] is None
    assert isinstance(decode(files.path_of(good).read_bytes()), JobImage)
    assert isinstance(outcome["blocked"], OSError)
    with pytest.raises(OSError):
        files.path_of(blocked).read_bytes()


async def test_an_image_being_acknowledged_is_not_resent_nor_reported_lost(
    tmp_path: Path,
) -> None:
    """Between the ack's database commit (which deletes the file) and the event loop seeing
    it, a resumed stream must neither resend the image nor report it lost."""
    files = ResultFiles(tmp_path / "results")
    rid = b"\x09" * 32
    key = files.key(rid, 1, b"\x02" * 32)
    image = job_image(1)
    await files.put(key, image)
    box = Mailbox(rid, [image.job_id])
    box.add_image(image.job_id, key)
    box.done = RequestDone(request_id=rid, delivered=1, failed=0, cancelled=0)
    box.acking.add(image.job_id)  # the ack's worker thread is under way...
    files.remove([key])  # ...and has already deleted the file
    cursor = box.attach(files)
    assert await cursor.next() is box.done  # no JobFailed("lost"), no second copy
