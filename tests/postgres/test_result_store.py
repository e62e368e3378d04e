"""The result store (`sogni_coordinator.results`): the same tests on every store.

`folder`: files in a folder (the default); `database`: rows in a real PostgreSQL (the
session's server, a fresh database per test); `sqlite`: rows in the coordinator's own
SQLite file. A second handle on the same folder or database stands for a second
coordinator of the network (for `sqlite`, a second component of one coordinator on the
file): what one stores, the other reads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_coordinator.results import (
    FolderResults,
    ResultKey,
    ResultStore,
    SqliteResults,
    StoreError,
    open_results,
)
from sogni_coordinator.results.postgres import DEFAULT_RETENTION, PostgresResults
from sogni_protocol.settings import SettingsError
from tests.coordinator._helpers import job_image

RID = b"\x09" * 32
OFFER = b"\x02" * 32


class Kind:
    """How to open a store of one kind twice (two coordinators) and age an image in it."""

    def __init__(self, name: str, tmp: Path, url: str | None) -> None:
        self.name = name
        self.tmp = tmp
        self.url = url
        self.opened: list[ResultStore] = []

    def open(self, memory_bytes: int = 64 * 1024 * 1024) -> ResultStore:
        store: ResultStore
        if self.name == "folder":
            store = FolderResults(self.tmp / "results", memory_bytes)
        elif self.name == "sqlite":
            store = SqliteResults(self.tmp / "coordinator.db", memory_bytes)
        else:
            assert self.url is not None
            store = PostgresResults(self.url, memory_bytes)
        self.opened.append(store)
        return store

    def age(self, key: ResultKey, seconds: float) -> None:
        """Make `key`'s image look stored `seconds` ago (in the store's own clock)."""
        if self.name == "folder":
            path = FolderResults(self.tmp / "results").path_of(key)
            then = time.time() - seconds
            os.utime(path, (then, then))
        elif self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.tmp / "coordinator.db")) as db:
                db.execute(  # on a connection of its own, as another process would
                    "UPDATE result_images SET stored_at = stored_at - ?"
                    " WHERE request_id = ? AND idx = ? AND offer_hash = ?",
                    (seconds, *key),
                )
                db.commit()
        else:
            assert self.url is not None
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE result_images SET stored_at = stored_at - %s"
                    " WHERE request_id = %s AND idx = %s AND offer_hash = %s",
                    (seconds, *key),
                )


@pytest.fixture(params=["folder", "database", "sqlite"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    url = request.getfixturevalue("pg_url") if request.param == "database" else None
    k = Kind(request.param, tmp_path, url)
    yield k
    for store in k.opened:
        store.close()


async def test_an_image_put_through_one_handle_is_read_through_another(kind: Kind) -> None:
    a, b = kind.open(), kind.open()
    images = {a.key(RID, i, OFFER): job_image(i) for i in range(1, 21)}
    async with trio.open_nursery() as nursery:  # written together: grouped in one call
        for key, image in images.items():
            nursery.start_soon(a.put, key, image)
    for key, image in images.items():
        assert await a.get(key) is image  # from memory: no read
        assert await b.get(key) == image  # another coordinator reads it from the store
    assert await b.get(a.key(RID, 99, OFFER)) is None
    assert await b.get(a.key(RID, 1, b"\x07" * 32)) is None  # another offer: another image


async def test_remove_deletes_for_every_handle(kind: Kind) -> None:
    a, b = kind.open(), kind.open()
    keep, gone = a.key(RID, 1, OFFER), a.key(RID, 2, OFFER)
    await a.put(keep, job_image(1))
    await a.put(gone, job_image(2))
    await trio.to_thread.run_sync(b.remove, [gone])  # acknowledged at B
    assert await b.get(gone) is None
    assert await kind.open().get(gone) is None  # a third coordinator: gone from the store
    if kind.name == "folder":  # A's memory copy is sent only while its file exists; the
        assert await a.get(gone) is None  # database stores trust their memory (no round trip)
    await a.discard([keep])  # from the event loop
    assert await b.get(keep) is None and await a.get(keep) is None


async def test_a_second_put_of_one_key_replaces_it(kind: Kind) -> None:
    a, b = kind.open(), kind.open()
    key = a.key(RID, 1, OFFER)
    await a.put(key, job_image(1))
    second = job_image(1, size=2000)
    await b.put(key, second)
    assert await kind.open().get(key) == second


async def test_images_past_memory_are_read_back(kind: Kind) -> None:
    a = kind.open(memory_bytes=1500)  # room for one image of ~1 KB
    first, second = a.key(RID, 1, OFFER), a.key(RID, 2, OFFER)
    one, two = job_image(1), job_image(2)
    await a.put(first, one)
    await a.put(second, two)
    assert await a.get(first) is one
    got = await a.get(second)
    assert got == two and got is not two  # read from the store


async def test_the_sweep_deletes_old_images_and_keeps_new_ones(kind: Kind) -> None:
    a, b = kind.open(), kind.open()
    old, new = a.key(RID, 1, OFFER), a.key(RID, 2, OFFER)
    await a.put(old, job_image(1))
    await a.put(new, job_image(2))
    kind.age(old, 7200)
    assert await trio.to_thread.run_sync(b.sweep, 3600) == 1
    assert await b.get(old) is None and await b.get(new) is not None
    assert await a.get(new) is not None
    assert await trio.to_thread.run_sync(b.sweep, 3600) == 0


async def test_the_retention_task_sweeps_in_the_nursery(kind: Kind) -> None:
    a = kind.open()
    a.retention = 3600.0
    old, new = a.key(RID, 1, OFFER), a.key(RID, 2, OFFER)
    await a.put(old, job_image(1))
    await a.put(new, job_image(2))
    kind.age(old, 7200)
    reader = kind.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(20):
            while await reader.get(old) is not None:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert await reader.get(new) is not None


async def test_a_failed_write_raises_oserror(kind: Kind, tmp_path: Path) -> None:
    if kind.name == "folder":
        store: ResultStore = FolderResults(tmp_path / "blocker")
        (tmp_path / "blocker").write_bytes(b"")  # a file where the folder should be
    elif kind.name == "sqlite":
        store = kind.open()
        assert isinstance(store, SqliteResults)
        with store.db._tx() as conn:  # the table gone: every write and read of it fails
            conn.execute("DROP TABLE result_images")
    else:
        assert kind.url is not None
        store = PostgresResults(kind.url.rsplit("/", 1)[0] + "/no_such_database")
    with pytest.raises(OSError):
        await store.put(store.key(RID, 1, OFFER), job_image(1))
    if kind.name != "database":  # unreadable: reported missing
        assert await store.get(store.key(RID, 1, OFFER)) is None
    else:  # a database that cannot be asked: "try later" (`StoreError`), not "missing"
        with pytest.raises(StoreError):
            await store.get(store.key(RID, 1, OFFER))


def test_the_gateways_images_are_kept_until_the_sweep_passes_their_age(pg_url: str) -> None:
    store = PostgresResults(pg_url)
    try:
        store.save_named("img", "image/png", b"png")
        assert store.sweep_named(3600) == 0  # younger than an hour: kept
        assert store.named("img", data=True) is not None
        assert store.sweep_named(-60) == 1  # "stored over -60 s ago": every row
        assert store.named("img", data=False) is None
    finally:
        store.close()


def test_the_database_store_never_runs_on_the_event_loop(pg_url: str) -> None:
    store = PostgresResults(pg_url)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="worker thread"):
            store.sweep(60)

    try:
        trio.run(main)
    finally:
        store.close()


def test_config_chooses_the_store_and_refuses_database_in_memory(
    pg_url: str, tmp_path: Path
) -> None:
    env = {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "c")}
    assert load_coordinator_config(env=env).result_store == "folder"
    on_file = load_coordinator_config(env={**env, "SOGNI_COORDINATOR_RESULT_STORE": "database"})
    rows = open_results(on_file)  # the coordinator's SQLite file
    try:
        assert isinstance(rows, SqliteResults) and not rows.shared
        assert rows.joins(str(tmp_path / "c" / "coordinator.db"))
        assert not rows.joins(str(tmp_path / "other.db")) and not rows.joins(pg_url)
    finally:
        rows.close()
    with pytest.raises(SettingsError) as refused:
        load_coordinator_config(
            env={
                **env,
                "SOGNI_COORDINATOR_RESULT_STORE": "database",
                "SOGNI_COORDINATOR_DATABASE": ":memory:",
            }
        )
    message = str(refused.value)
    assert ":memory:" in message and "\n" not in message
    with pytest.raises(SettingsError, match="RESULT_STORE"):
        load_coordinator_config(env={**env, "SOGNI_COORDINATOR_RESULT_STORE": "s3"})
    cfg = load_coordinator_config(
        env={
            **env,
            "SOGNI_COORDINATOR_DATABASE": pg_url,
            "SOGNI_COORDINATOR_RESULT_STORE": "database",
            "SOGNI_COORDINATOR_RESULT_RETENTION": "86400",
        }
    )
    store = open_results(cfg)
    try:
        assert isinstance(store, PostgresResults) and store.retention == 86400
        assert store.shared
    finally:
        store.close()
    folder = open_results(CoordinatorConfig(data_dir=tmp_path / "c"))
    assert isinstance(folder, FolderResults) and folder.retention is None  # as before
    assert folder.root == tmp_path / "c" / "results"
    default = PostgresResults(pg_url)
    assert default.retention == DEFAULT_RETENTION


async def test_a_database_away_delays_an_image_and_never_reports_it_lost(pg_url: str) -> None:
    """The client's stream waits for the database (`StoreError`), then sends the image: a
    store that cannot be asked is not a lost image (`JobFailed`)."""
    from structlog.testing import capture_logs

    from sogni_coordinator.delivery import Mailbox

    url = pg_url.rsplit("/", 1)[0] + "/created_later"
    reader, writer = PostgresResults(url), PostgresResults(url)
    image = job_image(1)
    key = reader.key(RID, 1, OFFER)
    try:
        with pytest.raises(StoreError):
            await reader.get(key)
        box = Mailbox(RID, [image.job_id])
        box.add_image(image.job_id, key)
        cursor = box.attach(reader)
        got: list[Any] = []
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    got.append(await cursor.next())

                nursery.start_soon(read)
                with trio.fail_after(20):
                    while not any(e["event"] == "result_read_failed" for e in logs):
                        await trio.sleep(0.02)
                assert got == []  # still waiting: nothing reported
                admin = pg_url.rsplit("/", 1)[0] + "/postgres"

                def create() -> None:
                    with psycopg.connect(admin, autocommit=True) as conn:
                        conn.execute("CREATE DATABASE created_later")

                await trio.to_thread.run_sync(create)
                await writer.put(key, image)
                with trio.fail_after(20):
                    while not got:
                        await trio.sleep(0.02)
        assert got == [image]
    finally:
        reader.close()
        writer.close()
