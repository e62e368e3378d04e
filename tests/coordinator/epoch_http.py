"""Driving `GET /epochs/{name}` as an ASGI app, without a listener: a published file, one
client's answer (status, headers, size, hash) and the request that reads it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.types import Message

from sogni_coordinator.epoch_serving import EpochFolder


def published(tmp_path: Path, name: str, size: int) -> tuple[EpochFolder, bytes]:
    """A folder publishing `size` random bytes as `name`; and their sha256."""
    data = os.urandom(size)
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
    return EpochFolder(tmp_path), hashlib.sha256(data).digest()


class Answer:
    """What the app sent one client. `hold`: its first body write waits for it (`shield`:
    shielded, as hypercorn's socket writes are: no deadline of the app reaches them).
    `pause`: seconds each body write takes (a slow reader)."""

    def __init__(
        self, hold: trio.Event | None = None, *, pause: float = 0.0, shield: bool = False
    ) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.size = 0
        self.largest = 0
        self.digest = hashlib.sha256()
        self.body = b""
        self.started = trio.Event()
        self.ended = trio.Event()
        self.hold, self.pause, self.shield = hold, pause, shield

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
            self.started.set()
            return
        with trio.CancelScope(shield=self.shield):
            if self.hold is not None:
                await self.hold.wait()
            if self.pause:
                await trio.sleep(self.pause)
        chunk = message.get("body", b"")
        self.size += len(chunk)
        self.largest = max(self.largest, len(chunk))
        self.digest.update(chunk)
        if self.size < 4096:
            self.body += chunk


async def get(
    app: Starlette, path: str, answer: Answer, *, method: str = "GET", client: str = "127.0.0.1"
) -> None:
    """One request from `client`; `answer.ended` is set however it ends."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"x")],
        "client": (client, 40000),
        "server": ("127.0.0.1", 80),
    }
    sent = False
    never = trio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()
        raise AssertionError("unreachable")

    try:
        await app(scope, receive, answer.send)
    finally:
        answer.ended.set()
