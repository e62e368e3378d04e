"""The receipt write path and the sweep's cost, on real SQLite and real files.

A receipted image is stored by the receipt's own group commit (`Database.call_staged`): the
writer's worker thread writes the group's images durably first, then commits their rows, so
an image is on disk before the receipt that points at it, and a failed image keeps its
receipt out without failing the rest of the group. The sweep pops expired deadlines off a
heap and asks servability once per request (`Dispatcher.sweep`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from sogni_coordinator import db as db_module
from sogni_coordinator.db import Database
from sogni_coordinator.dispatch import ResultRefused
from sogni_coordinator.job_state import JobState
from sogni_coordinator.results import FolderResults, ResultKey, SqliteResults
from sogni_coordinator.results.base import StagedImage
from sogni_protocol.messages import JobFailed, JobImage, JobOffer, JobProgress, Receipt, decode
from sogni_protocol.messages import encode as encode_message
from tests.coordinator._helpers import job_image

from .conftest import FLOOR, Harness, events, request

MIGRATIONS = ("CREATE TABLE rows (name TEXT PRIMARY KEY, image_on_disk INTEGER NOT NULL)",)


class CountingFolder(FolderResults):
    """A real folder store that records the size of each `write_group` call."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.groups: list[int] = []

    def write_group(self, items: list[StagedImage]) -> list[BaseException | None]:
        self.groups.append(len(items))
        return super().write_group(items)


async def test_images_are_on_disk_before_their_rows_commit_in_one_group(tmp_path: Path) -> None:
    db = Database(tmp_path / "w.db", component="write_path", migrations=MIGRATIONS)
    files = CountingFolder(tmp_path / "results")
    keys = [files.key(bytes([i]) * 32, i, b"\x02" * 32) for i in range(8)]
    images = [job_image(i) for i in range(8)]

    def insert(key: ResultKey) -> None:  # runs in the writer's transaction
        on_disk = files.path_of(key).exists()
        with db._tx() as conn:
            conn.execute("INSERT INTO rows VALUES (?, ?)", (key.name, int(on_disk)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as calls:
            for i, key in enumerate(keys):
                calls.start_soon(db.call_staged, files.staged(key, images[i]), insert, key)
        nursery.cancel_scope.cancel()
    rows = db._db.execute("SELECT image_on_disk FROM rows").fetchall()
    assert rows == [(1,)] * len(keys)  # every image durable before its row was written
    assert sum(files.groups) == len(keys) and len(files.groups) < len(keys)  # grouped
    stats = db.write_stats()  # what the benchmark reads to tell waits on the disk
    assert (stats.stages, stats.staged) == (len(files.groups), len(keys))
    assert stats.writes == len(keys) and 1 <= stats.groups < len(keys)
    for i, key in enumerate(keys):
        assert decode(files.path_of(key).read_bytes()) == images[i]
        assert await files.get(key) == images[i]  # kept in memory too
    db.close()


async def test_a_groups_waiters_each_get_their_outcome_from_one_wake_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer wakes the loop once per group for all its waiters (`db._wake_loops`), not
    once per write: each waiter still gets its own result or error."""
    db = Database(tmp_path / "w.db", component="write_path", migrations=MIGRATIONS)
    wake_ups: list[int] = []
    call_each = db_module._call_each

    def counted(fns: list[Any]) -> None:
        wake_ups.append(len(fns))
        call_each(fns)

    monkeypatch.setattr(db_module, "_call_each", counted)

    def write(i: int) -> int:  # runs in the writer's transaction
        if i % 5 == 0:
            raise ValueError(f"write {i} refused")
        with db._tx() as conn:
            conn.execute("INSERT INTO rows VALUES (?, ?)", (f"r{i}", i))
        return i * 10

    outcomes: dict[int, int | str] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await db.call(write, i)
        except ValueError as exc:
            outcomes[i] = str(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as calls:
            for i in range(20):
                calls.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert outcomes == {i: f"write {i} refused" if i % 5 == 0 else i * 10 for i in range(20)}
    rows = db._db.execute("SELECT image_on_disk FROM rows ORDER BY image_on_disk").fetchall()
    assert rows == [(i,) for i in range(20) if i % 5]  # the refused writes rolled back alone
    stats = db.write_stats()
    assert sum(wake_ups) == 20 and len(wake_ups) == stats.groups < 20
    db.close()


async def test_a_failed_image_keeps_its_row_out_and_the_rest_of_its_group_in(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "w.db", component="write_path", migrations=MIGRATIONS)
    files = FolderResults(tmp_path / "results")
    good = files.key(b"\x09" * 32, 1, b"\x02" * 32)
    blocked = files.key(b"\x0a" * 32, 2, b"\x02" * 32)
    files.path_of(blocked).parent.parent.mkdir(parents=True)
    files.path_of(blocked).parent.write_bytes(b"")  # a file where its folder should be
    ran: list[str] = []
    outcome: dict[str, BaseException | None] = {}

    def insert(key: ResultKey) -> None:
        ran.append(key.name)
        with db._tx() as conn:
            conn.execute("INSERT INTO rows VALUES (?, 1)", (key.name,))

    async def write(key: ResultKey, n: int) -> None:
        try:
            await db.call_staged(files.staged(key, job_image(n)), insert, key)
            outcome[key.name] = None
        except OSError as exc:
            outcome[key.name] = exc

    for writer_running in (True, False):
        ran.clear()
        db._db.execute("DELETE FROM rows")
        async with trio.open_nursery() as nursery:
            if writer_running:
                nursery.start_soon(db.run_writer)
                await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as calls:
                calls.start_soon(write, good, 1)
                calls.start_soon(write, blocked, 2)
            nursery.cancel_scope.cancel()
        assert outcome[good.name] is None and isinstance(outcome[blocked.name], OSError)
        assert ran == [good.name]  # the blocked image's row was never written
        assert db._db.execute("SELECT name FROM rows").fetchall() == [(good.name,)]
    db.close()


def test_a_write_remakes_the_folder_a_concurrent_delete_removed(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Delivering a request's last image removes its folder (in another thread); a new image
    of that request written at that moment makes the folder again instead of failing (the
    receipt was refused, "could not store the image; retry", seen under load)."""
    import os

    from sogni_coordinator.results import folder as folder_mod

    store = FolderResults(tmp_path / "results")
    key_a, key_b = ResultKey(b"r" * 32, 0, b"a" * 32), ResultKey(b"r" * 32, 1, b"b" * 32)
    real_open, real_mkdir = os.open, Path.mkdir
    raced = {"open": 0, "mkdir": 0}

    def open_after_rmdir(path: Any, *args: Any) -> int:
        if str(path).endswith(".jobimage") and raced["open"] == 0:
            raced["open"] += 1
            Path(path).parent.rmdir()  # the other thread's `_unlink` got there first
        return real_open(path, *args)

    def mkdir_racing(self: Path, *args: Any, **kwargs: Any) -> None:
        if raced["open"] == 1 and raced["mkdir"] == 0:
            raced["mkdir"] += 1  # inside mkdir: it existed, then was gone by the is_dir check
            raise FileExistsError(17, "File exists", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(folder_mod.os, "open", open_after_rmdir)
    monkeypatch.setattr(Path, "mkdir", mkdir_racing)
    assert folder_mod._write_files([(store.path_of(key_a), b"png-a")]) == {}
    assert raced == {"open": 1, "mkdir": 1}  # lost at the open, then inside mkdir: made again
    monkeypatch.undo()
    assert store.path_of(key_a).read_bytes() == b"png-a"
    assert folder_mod._write_files([(store.path_of(key_b), b"png-b")]) == {}  # unraced
    assert store.path_of(key_b).read_bytes() == b"png-b"


async def test_a_receipt_is_committed_with_its_image_in_one_writer_call(coord: Harness) -> None:
    """Through the dispatcher: the image file exists when the receipt's row is written."""
    seen: list[bool] = []
    store_receipt = coord.store.store_receipt
    results = coord.dispatcher.results
    assert isinstance(results, FolderResults)

    def checking(
        receipt: Receipt,
        signature: bytes,
        request_id: bytes,
        state: JobState = JobState.DONE,
        offer: tuple[JobOffer, bytes] | None = None,
    ) -> bool:
        job = coord.dispatcher.jobs[receipt.job_id]
        seen.append(
            results.path_of(results.key(request_id, job.index, receipt.offer_hash)).exists()
        )
        return store_receipt(receipt, signature, request_id, state, offer)

    coord.store.store_receipt = checking  # type: ignore[method-assign]
    sub = await coord.submit(request(3))
    node = coord.node(0, slots=3)
    coord.dispatcher.match()
    async with trio.open_nursery() as nursery:
        for offer in node.offers():
            nursery.start_soon(coord.deliver, node, offer)
    assert seen == [True, True, True]
    assert len(coord.store.receipts()) == 3
    assert len([m for m in await events(sub) if isinstance(m, JobImage)]) == 3


async def test_a_duplicate_result_leaves_its_twins_image_alone(coord: Harness) -> None:
    """The same result sent twice at once (same request, index and offer): the second waits
    for the first's commit and is refused without writing its image, so the committed image
    stays and reaches the client, and the node is not struck for it. Before, the duplicate
    wrote the same file, was refused, and deleted it: the client got "lost"."""
    results = coord.dispatcher.results
    assert isinstance(results, FolderResults)
    sub = await coord.submit(request(1))
    node = coord.node(0, slots=1)
    coord.dispatcher.match()
    (offer,) = node.offers()
    job = coord.dispatcher.jobs[offer.offer.job_id]
    result = node.result(offer)
    refused: list[str] = []

    async def send() -> None:
        try:
            await coord.dispatcher.accept_result(node.link, result)
        except ResultRefused as exc:
            refused.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(send)
    assert len(refused) == 1 and "already receipted" in refused[0], refused
    assert len(coord.store.receipts()) == 1
    key = results.key(job.request_id, job.index, result.receipt.offer_hash)
    assert results.path_of(key).exists()
    got = await events(sub)
    assert [type(m) for m in got if not isinstance(m, JobProgress)] == [JobImage]
    assert coord.dispatcher.reputation.get(node.link.wallet).strikes == []


# --- the database result store: the image row in the receipt's own commit -------------------
PG_MIGRATIONS = ("CREATE TABLE receipt_rows (name TEXT PRIMARY KEY)",)


def _pg_results(pg_url: str) -> Any:
    """A real `PostgresResults` that records the transaction each image row is written in."""
    from sogni_coordinator.results.postgres import PostgresResults

    class TxResults(PostgresResults):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.row_tx: dict[int, int] = {}

        def write_rows(self, conn: Any, items: list[StagedImage]) -> None:
            super().write_rows(conn, items)
            (tx,) = conn.execute("SELECT txid_current()").fetchone()
            for item in items:
                self.row_tx[item.key.index] = int(tx)

    return TxResults(pg_url)


async def test_an_image_row_commits_in_its_receipts_transaction(pg_url: str) -> None:
    """With the result store on the coordinator's own PostgreSQL, `call_staged` writes the
    image row after the receipt, in the receipt's savepoint: one transaction for both,
    a receipt that fails writes no image row, and an image row that fails takes its
    receipt with it without failing the rest of the group."""
    db = Database(pg_url, component="write_path", migrations=PG_MIGRATIONS)
    results = _pg_results(pg_url)
    await trio.to_thread.run_sync(results.open)
    assert results.joins(db.location) and not FolderResults(Path("unused")).joins(db.location)
    keys = [results.key(bytes([i]) * 32, i, b"\x02" * 32) for i in range(6)]
    images = [job_image(i) for i in range(6)]
    outcome: dict[str, BaseException | None] = {}
    receipt_tx: dict[int, int] = {}

    def insert(key: ResultKey, fail: bool) -> bool:  # the receipt's write
        with db._tx() as conn:
            conn.execute("INSERT INTO receipt_rows VALUES (?)", (key.name,))
            (tx,) = conn.execute("SELECT txid_current()").fetchone()
        receipt_tx[key.index] = int(tx)
        if fail:
            raise ValueError("the receipt's write failed")
        return True

    async def write(i: int, *, fail: bool = False, bad_image: bool = False) -> None:
        stage = results.staged(keys[i], images[i])
        if bad_image:  # a NULL frame: the row's insert fails (NOT NULL)
            stage = (results, StagedImage(keys[i], None, images[i]))  # type: ignore[arg-type]
        try:
            await db.call_staged(stage, insert, keys[i], fail)
            outcome[keys[i].name] = None
        except (OSError, ValueError) as exc:
            outcome[keys[i].name] = exc

    for writer_running in (True, False):
        base = 0 if writer_running else 3
        async with trio.open_nursery() as nursery:
            if writer_running:
                nursery.start_soon(db.run_writer)
                await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as calls:
                calls.start_soon(write, base)
                calls.start_soon(functools.partial(write, base + 1, fail=True))
                calls.start_soon(functools.partial(write, base + 2, bad_image=True))
            nursery.cancel_scope.cancel()
        good, failed, bad = (keys[base + j].name for j in range(3))
        assert outcome[good] is None
        assert isinstance(outcome[failed], ValueError)
        assert isinstance(outcome[bad], OSError)  # as a failed image file: StorageFault
        assert await results.get(keys[base]) is images[base]  # kept in memory, as staged
        assert results.row_tx[base] == receipt_tx[base]  # one transaction for both
    assert set(results.row_tx) == {0, 3}  # a receipt that failed wrote no image row

    def read() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            receipts = conn.execute("SELECT name FROM receipt_rows ORDER BY name").fetchall()
            rows = conn.execute("SELECT idx FROM result_images ORDER BY idx").fetchall()
        return receipts, rows

    receipts, rows = await trio.to_thread.run_sync(read)
    # the receipts whose image rows failed were rolled back with them
    assert receipts == sorted([(keys[0].name,), (keys[3].name,)])
    assert rows == [(0,), (3,)]  # no image row without its receipt
    results.close()
    db.close()


async def test_a_refused_receipt_writes_no_image_row_and_leaves_its_twins(pg_url: str) -> None:
    """A receipt the store refuses (False: the job had one or ended) writes no image row,
    and a refused duplicate of a committed receipt (same request, index and offer) leaves
    the committed image as it was, in the database and in memory. Before, the row was
    written first and committed whatever the receipt's answer: an image row without its
    receipt, or the committed image overwritten by the duplicate's."""
    db = Database(pg_url, component="write_path", migrations=PG_MIGRATIONS)
    results = _pg_results(pg_url)
    await trio.to_thread.run_sync(results.open)
    committed = {"request": False}

    def store(key: ResultKey) -> bool:  # store_receipt's answer: one receipt per key
        with db._tx() as conn:
            conn.execute("INSERT INTO receipt_rows VALUES (?) ON CONFLICT DO NOTHING", (key.name,))
        if committed["request"]:
            return False
        committed["request"] = True
        return True

    first, twin, lone = job_image(1), job_image(2), job_image(3)
    assert first.image != twin.image
    key = results.key(b"\x01" * 32, 1, b"\x02" * 32)
    refused_key = results.key(b"\x03" * 32, 0, b"\x02" * 32)
    for writer_running in (True, False):
        committed["request"] = False
        async with trio.open_nursery() as nursery:
            if writer_running:
                nursery.start_soon(db.run_writer)
                await trio.testing.wait_all_tasks_blocked()
            assert await db.call_staged(results.staged(key, first), store, key) is True
            assert await db.call_staged(results.staged(key, twin), store, key) is False
            committed["request"] = True  # a job that ended: refused, never stored
            assert await db.call_staged(results.staged(refused_key, lone), store, key) is False
            nursery.cancel_scope.cancel()
        assert await results.get(key) is first  # memory: the committed image

        def frames() -> list[tuple[Any, ...]]:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                return conn.execute(
                    "SELECT request_id, frame FROM result_images ORDER BY request_id"
                ).fetchall()

        rows = await trio.to_thread.run_sync(frames)
        assert [(bytes(r), bytes(f)) for r, f in rows] == [(key.request_id, encode_message(first))]
    results.close()
    db.close()


# --- the sweep -------------------------------------------------------------------------------
async def test_the_sweep_asks_each_request_once_however_many_jobs_it_has(
    coord: Harness,
) -> None:
    asked: list[str] = []
    can_serve = coord.dispatcher.can_serve

    def counting(network: str, want: Any) -> bool:
        asked.append(network)
        return can_serve(network, want)

    coord.dispatcher.can_serve = counting  # type: ignore[method-assign]
    for _ in range(3):
        await coord.submit(request(40))
    coord.node(0)
    coord.dispatcher.match()  # one job offered, 119 queued
    coord.dispatcher.sweep()
    assert len(asked) == 3


async def test_a_stale_deadline_does_not_cancel_a_later_offer(coord: Harness) -> None:
    """The heap keeps the first offer's deadline after a hand-back; it must not cut the
    second offer of the same job short."""
    sub = await coord.submit(request(1))
    (job_id,) = sub.accepted.job_ids
    a = coord.node(0)
    coord.dispatcher.match()
    assert len(a.offers()) == 1
    coord.clock.advance(FLOOR / 2)
    coord.dispatcher.handed_back(a.link, job_id, "busy")
    coord.dispatcher.ready(a.link, 1)
    coord.dispatcher.match()
    assert len(a.offers()) == 1
    coord.clock.advance(FLOOR / 2 + 1)  # the first offer's deadline has passed
    coord.dispatcher.sweep()
    assert a.cancels() == [] and coord.dispatcher.jobs[job_id].state is JobState.RUNNING
    coord.clock.advance(FLOOR / 2)  # and now the second's
    coord.dispatcher.sweep()
    assert [c.job_id for c in a.cancels()] == [job_id]
    assert coord.dispatcher.jobs[job_id].state is JobState.QUEUED


async def test_an_offered_job_gets_a_fresh_grace_when_it_comes_back(coord: Harness) -> None:
    """A job whose grace clock ran, then was offered, starts a new grace if its node goes."""
    sub = await coord.submit(request(1))
    (job_id,) = sub.accepted.job_ids
    coord.dispatcher.sweep()  # no node: the grace starts
    coord.clock.advance(coord.dispatcher.no_node_grace - 1)
    a = coord.node(0)
    coord.dispatcher.match()
    assert len(a.offers()) == 1
    coord.dispatcher.node_left(a.link, "killed")  # back in the queue, no node again
    coord.clock.advance(2)
    coord.dispatcher.sweep()
    assert not any(isinstance(m, JobFailed) for m in await events(sub))
    assert coord.dispatcher.jobs[job_id].state is JobState.QUEUED
    coord.clock.advance(coord.dispatcher.no_node_grace + 1)
    coord.dispatcher.sweep()
    assert coord.store.job_state(job_id) is JobState.FAILED


def test_new_images_are_written_in_place_with_one_sync_and_a_taken_name_is_replaced_whole(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A group of new images over several requests' folders costs one `syncfs` (no
    temporary names, no renames); an image whose name exists (the same result sent again)
    is never rewritten in place: it is renamed over, whole, and the renames synced."""
    from sogni_coordinator.results import folder as folder_mod

    if folder_mod._SYNCFS is None:
        pytest.skip("no syncfs on this platform")
    store = FolderResults(tmp_path / "results")
    syncs: list[Path] = []
    real_syncfs = folder_mod._syncfs

    def counted_syncfs(path: Path) -> None:
        syncs.append(path)
        real_syncfs(path)

    monkeypatch.setattr(folder_mod, "_syncfs", counted_syncfs)
    keys = [ResultKey(bytes([r]) * 32, i, b"o" * 32) for r in (1, 2, 3) for i in range(3)]
    assert (
        folder_mod._write_files([(store.path_of(k), b"new" + bytes([k.index])) for k in keys]) == {}
    )
    assert len(syncs) == 1
    assert all(store.path_of(k).read_bytes() == b"new" + bytes([k.index]) for k in keys)
    assert not list((tmp_path / "results").rglob("*.tmp"))

    replaced: list[str] = []
    real_replace = folder_mod.os.replace

    def counted_replace(src: str, dst: str) -> None:
        replaced.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(folder_mod.os, "replace", counted_replace)
    again = [keys[0], keys[3], ResultKey(b"\x04" * 32, 0, b"o" * 32)]
    assert folder_mod._write_files([(store.path_of(k), b"again") for k in again]) == {}
    assert replaced == [str(store.path_of(keys[0])), str(store.path_of(keys[3]))]
    assert len(syncs) == 3  # the group's, then the renames' (two folders)
    assert all(store.path_of(k).read_bytes() == b"again" for k in again)
    assert not list((tmp_path / "results").rglob(".*.tmp"))


async def test_on_sqlite_an_image_row_commits_with_its_receipt_in_one_group(
    tmp_path: Path,
) -> None:
    """`result_store = "database"` on a SQLite coordinator: the image rows are written in
    their receipts' savepoints (no staging step, no `syncfs`), a group of them in one
    commit; a receipt that fails writes no image row, and an image row that fails takes
    its receipt with it and leaves the rest of the group in."""
    path = tmp_path / "coordinator.db"
    db = Database(path, component="write_path", migrations=MIGRATIONS)
    results = SqliteResults(path)
    assert results.joins(db.location) and not SqliteResults(tmp_path / "b.db").joins(db.location)
    keys = [results.key(bytes([i]) * 32, i, b"\x02" * 32) for i in range(8)]
    images = [job_image(i) for i in range(8)]
    outcome: dict[int, BaseException | None] = {}

    def insert(key: ResultKey, fail: bool) -> bool:  # the receipt's write
        with db._tx() as conn:
            conn.execute("INSERT INTO rows VALUES (?, 1)", (key.name,))
        if fail:
            raise ValueError("the receipt's write failed")
        return True

    async def write(i: int) -> None:
        stage = results.staged(keys[i], images[i])
        if i == 6:  # a NULL frame: the row's insert fails (NOT NULL)
            stage = (results, StagedImage(keys[i], None, images[i]))  # type: ignore[arg-type]
        try:
            await db.call_staged(stage, insert, keys[i], i == 5)
            outcome[i] = None
        except (OSError, ValueError) as exc:
            outcome[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as calls:
            for i in range(len(keys)):
                calls.start_soon(write, i)
        nursery.cancel_scope.cancel()
    assert isinstance(outcome.pop(5), ValueError) and isinstance(outcome.pop(6), OSError)
    assert set(outcome) == {0, 1, 2, 3, 4, 7} and not any(outcome.values())
    stats = db.write_stats()
    assert stats.stages == 0 and stats.writes == len(keys)  # nothing staged: one step
    assert 1 <= stats.groups < len(keys)  # grouped: fewer commits than receipts
    names = {r[0] for r in db._db.execute("SELECT name FROM rows")}
    assert names == {keys[i].name for i in outcome}  # 5 and 6 rolled back alone
    assert set(results.stored_keys()) == {keys[i] for i in outcome}  # no image without its receipt
    reader = SqliteResults(path, memory_bytes=0)  # nothing in memory: read from the rows
    for i in outcome:
        assert await reader.get(keys[i]) == images[i]
        assert await results.get(keys[i]) is images[i]  # kept in memory once committed
    reader.close()
    results.close()
    db.close()
