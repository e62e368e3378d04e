"""Delivered images kept for download by their image id, deleted after `retention`.

Files are named `<imgID>.<ext>` by this module only; a URL's id is checked against the index
(built from the folder listing), so no part of a URL ever becomes a path. With the
coordinator's `result_store = "database"` the images are rows in the network's PostgreSQL
instead (`results.postgres.PostgresResults`, table `gateway_images`, read and written in
worker threads), so any coordinator of the network serves a signed URL another one issued,
with no shared folder.

A file is written with `sogni_protocol.atomic` (temporary file, fsync, rename, fsync of the
folder): an image an app was told about survives a power cut. Temporary files a crash left
behind are deleted at start (`STALE_TMP`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.image_types import format_of

if TYPE_CHECKING:
    from sogni_coordinator.results import ResultStore
    from sogni_coordinator.results.postgres import PostgresResults

__all__ = ["ImageStore", "StoredImage"]

IMAGE_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_TMP = re.compile(r"^(\.[0-9A-F-]{36}\.(png|jpg|webp)\..+|[0-9A-F-]{36})\.tmp$")
"""A save's temporary file: `atomic_write_bytes`' `.<id>.<ext>.<random>.tmp`, or the
`<id>.tmp` of earlier versions."""
STALE_TMP = 600.0
"""Age (seconds) past which a temporary file is a crash's leftover, not another
coordinator's save in progress (a shared folder): `load` deletes it."""


@dataclass(frozen=True)
class StoredImage:
    path: Path | None
    """The file (a folder store); None for a database row."""
    media_type: str
    created: float
    data: bytes | None = None
    """The image, when read from the database (`find(..., data=True)`)."""


class ImageStore:
    def __init__(self, folder: Path, retention: float, results: ResultStore | None = None):
        self.folder = folder
        self.retention = retention
        self._index: dict[str, StoredImage] = {}
        self.database: PostgresResults | None = None
        """The network's PostgreSQL when the coordinator's result store is the database."""
        if results is not None and results.shared:
            from sogni_coordinator.results.postgres import PostgresResults

            if isinstance(results, PostgresResults):
                self.database = results

    def load(self) -> int:
        """Index what an earlier run left (blocking: call off the loop at start)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kinds = {ext: kind for kind, ext in _EXT.items()}
        now = time.time()
        for path in self.folder.iterdir():
            if _TMP.match(path.name):
                with contextlib.suppress(OSError):  # gone already, or not ours to delete
                    if now - path.stat().st_mtime > STALE_TMP:
                        path.unlink()
                continue
            stem, _, ext = path.name.partition(".")
            if IMAGE_ID.match(stem) and ext in kinds:
                created = path.stat().st_mtime
                self._index[stem] = StoredImage(path, _TYPES[kinds[ext]], created)
        return len(self._index)

    def get(self, image_id: str) -> StoredImage | None:
        """The image, also when another coordinator sharing the folder saved it (the id is
        checked against `IMAGE_ID` first: it never becomes an arbitrary path)."""
        if not IMAGE_ID.match(image_id):
            return None
        found = self._index.get(image_id)
        if found is None:
            for kind, ext in _EXT.items():
                path = self.folder / f"{image_id}.{ext}"
                try:
                    created = path.stat().st_mtime
                except OSError:
                    continue
                found = self._index[image_id] = StoredImage(path, _TYPES[kind], created)
                break
        return found

    async def find(self, image_id: str, *, data: bool = False) -> StoredImage | None:
        """`get`, or the database row (with the image itself if `data`) of any coordinator."""
        db = self.database
        if db is None:
            return self.get(image_id)
        if not IMAGE_ID.match(image_id):
            return None
        row = await trio.to_thread.run_sync(functools.partial(db.named, image_id, data=data))
        if row is None:
            return None
        media_type, created, image = row
        return StoredImage(None, media_type, created, image)

    async def save(self, image_id: str, image: bytes) -> StoredImage:
        """Write the image durably under its id; raises ValueError for an unknown format
        (and OSError if it could not be stored)."""
        kind = format_of(image)
        if kind is None or not IMAGE_ID.match(image_id):
            raise ValueError("not a png, jpeg or webp image")
        if self.database is not None:
            db = self.database
            await trio.to_thread.run_sync(db.save_named, image_id, _TYPES[kind], image)
            return StoredImage(None, _TYPES[kind], time.time())
        path = self.folder / f"{image_id}.{_EXT[kind]}"
        await trio.to_thread.run_sync(atomic_write_bytes, path, image)
        stored = StoredImage(path, _TYPES[kind], time.time())
        self._index[image_id] = stored
        return stored

    async def sweep(self, now: float | None = None) -> int:
        """Delete images older than the retention; returns how many."""
        now = time.time() if now is None else now
        old = [i for i, s in self._index.items() if now - s.created > self.retention]
        paths = [p for i in old if (p := self._index.pop(i).path) is not None]

        def remove() -> None:
            for p in paths:
                p.unlink(missing_ok=True)

        await trio.to_thread.run_sync(remove)
        swept = len(old)
        if self.database is not None:  # every coordinator's, by the database's clock
            swept += await trio.to_thread.run_sync(self.database.sweep_named, self.retention)
        return swept
