"""A client stream's cost per image does not grow with the images it leaves unacknowledged.

A `Cursor` walks its mailbox's arrivals once from a position: a client that never acks
(so every image stays `pending`) costs O(1) lookups per image, not a rescan of everything
sent so far. The lookups are counted on the mailbox's and cursor's own containers, so the
test measures work done, not time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from sogni_coordinator.delivery import Mailbox, ResultFiles
from sogni_coordinator.results import ResultKey
from sogni_protocol.messages import JobFailed, JobImage, RequestDone
from tests.coordinator._helpers import job_image

RID = b"\x09" * 32


class _Counted:
    """Shared tally of membership tests and iteration steps."""

    lookups = 0


class _CountingSet(set[bytes]):
    def __contains__(self, item: object) -> bool:
        _Counted.lookups += 1
        return super().__contains__(item)


class _CountingDict(dict[bytes, Any]):
    def __contains__(self, item: object) -> bool:
        _Counted.lookups += 1
        return super().__contains__(item)

    def __iter__(self) -> Iterator[bytes]:
        for key in super().__iter__():
            _Counted.lookups += 1
            yield key


def _image(i: int) -> JobImage:
    job_id = i.to_bytes(32, "big")
    return msgspec.structs.replace(job_image(1, size=16), job_id=job_id, index=i)


async def _stored(files: ResultFiles, n: int) -> list[tuple[ResultKey, JobImage]]:
    images = [(files.key(RID, i, b"\x02" * 32), _image(i)) for i in range(n)]
    async with trio.open_nursery() as nursery:  # written together: one sync
        for key, image in images:
            nursery.start_soon(files.put, key, image)
    return images


async def test_a_client_that_never_acks_costs_constant_lookups_per_image(
    tmp_path: Path,
) -> None:
    n = 600
    files = ResultFiles(tmp_path / "results")
    images = await _stored(files, n)
    box = Mailbox(RID, [image.job_id for _, image in images], _pending=_CountingDict())
    cursor = box.attach(files)
    cursor.sent = _CountingSet()
    got: list[bytes] = []
    _Counted.lookups = 0
    for key, image in images:  # images arrive one at a time; the client reads each, never acks
        box.add_image(image.job_id, key)
        msg = await cursor.next()
        assert isinstance(msg, JobImage)
        got.append(msg.job_id)
        assert await cursor.next() is None  # nothing more until the next arrival
    assert got == [image.job_id for _, image in images]  # each once, in arrival order
    assert len(box.pending) == n  # all still unacknowledged
    # 5 per image (3,000); the former rescan of `pending` per image made 721,800
    assert _Counted.lookups <= 8 * n, _Counted.lookups


async def test_an_image_passed_while_its_ack_is_written_is_sent_if_that_write_fails(
    tmp_path: Path,
) -> None:
    """The cursor moves past an image being acknowledged (`acking`), but if the ack's
    write fails the image is still owed, and the same stream sends it."""
    files = ResultFiles(tmp_path / "results")
    (k1, i1), (k2, i2), (k3, i3) = await _stored(files, 3)
    box = Mailbox(RID, [i1.job_id, i2.job_id, i3.job_id])
    for key, image in ((k1, i1), (k2, i2), (k3, i3)):
        box.add_image(image.job_id, key)
    box.acking.add(i2.job_id)  # a client acks it (from an earlier stream) ...
    cursor = box.attach(files)
    first, second = await cursor.next(), await cursor.next()
    assert isinstance(first, JobImage) and isinstance(second, JobImage)
    assert [first.job_id, second.job_id] == [i1.job_id, i3.job_id]
    assert await cursor.next() is None
    box.acking.discard(i2.job_id)  # ... and the ack's write failed: still pending
    again = await cursor.next()
    assert isinstance(again, JobImage) and again.job_id == i2.job_id
    failed = JobFailed(job_id=b"\x07" * 32, index=9, reason="gave up")
    box.add_failure(failed)
    box.done = RequestDone(request_id=RID, delivered=3, failed=1, cancelled=0)
    assert await cursor.next() == failed
    assert await cursor.next() is box.done
    # a new attachment (a resume) starts again from everything still owed
    resumed = box.attach(files)
    sent = [await resumed.next() for _ in range(5)]
    assert [type(m) for m in sent] == [JobImage, JobImage, JobImage, JobFailed, RequestDone]
    assert cursor.superseded and await cursor.next() is None


def test_a_mailbox_is_written_only_through_its_methods(tmp_path: Path) -> None:
    """`pending` and `failed` are read-only views: a write that bypassed `add_image` or
    `add_failure` would be missing from the arrival lists, and its cursor would never send
    it. Writes through the views raise; the methods' writes show in them."""
    files = ResultFiles(tmp_path / "results")
    key = files.key(RID, 1, b"\x02" * 32)
    box = Mailbox(RID, [b"\x01" * 32])
    failed = JobFailed(job_id=b"\x07" * 32, index=9, reason="gave up")
    with pytest.raises(TypeError):
        box.pending[b"\x01" * 32] = key  # type: ignore[index]
    with pytest.raises(TypeError):
        box.failed[failed.job_id] = failed  # type: ignore[index]
    box.add_image(b"\x01" * 32, key)
    box.add_failure(failed)
    assert dict(box.pending) == {b"\x01" * 32: key} and dict(box.failed) == {failed.job_id: failed}
    box.acknowledge(b"\x01" * 32)
    assert not box.pending and box.acked == {b"\x01" * 32}
