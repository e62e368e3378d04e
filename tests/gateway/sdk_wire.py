"""A small client of the SDKs' wire protocol, written from SOGNI_SDK_PROTOCOL.md.

What the official SDKs do on the wire, for the image flow: `api-key` header on REST and on the
upgrade, `appId` in the query, frames of JSON with base64 JSON payloads.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

__all__ = ["SdkSocket", "decode", "encode", "job_request"]


def encode(name: str, data: Any) -> str:
    payload = base64.b64encode(json.dumps(data).encode()).decode()
    return json.dumps({"type": name, "data": payload})


def decode(text: str) -> tuple[str, dict[str, Any]]:
    outer = json.loads(text)
    data = json.loads(base64.b64decode(outer["data"], validate=True))
    assert isinstance(data, dict), "every server frame carries an object"
    return outer["type"], data


def job_request(model: str, n: int = 2, **frame: Any) -> dict[str, Any]:
    """What the SDKs send for `createProject({modelId, positivePrompt, numberOfMedia: n})`."""
    return {
        "jobID": str(uuid.uuid4()).upper(),
        "numberOfImages": n,
        "previews": 0,
        "outputFormat": "png",
        "disableSafety": False,
        "keyFrames": [
            {
                "modelID": model,
                "positivePrompt": "a red circle",
                "negativePrompt": "",
                "stylePrompt": "",
                "scheduler": None,
                "timeStepSpacing": None,
                **frame,
            }
        ],
    }


class SdkSocket:
    """One SDK socket; `frames` keeps every frame received, in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[str, dict[str, Any]]] = []

    @staticmethod
    def url(http_url: str, app_id: str = "test-app") -> str:
        base = http_url.replace("http://", "ws://")
        return f"{base}/?appId={app_id}&clientName=test&clientType=artist&forceWorkerId=fast"

    async def send(self, name: str, data: Any) -> None:
        await self.ws.send_message(encode(name, data))

    async def next(self, timeout: float = 30.0) -> tuple[str, dict[str, Any]]:
        with trio.fail_after(timeout):
            text = await self.ws.get_message()
        assert isinstance(text, str)
        frame = decode(text)
        self.frames.append(frame)
        return frame

    async def until(self, name: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        """The next frame of type `name` whose fields equal `match`."""
        with trio.fail_after(timeout):
            while True:
                kind, data = await self.next(timeout)
                if kind == name and all(data.get(k) == v for k, v in match.items()):
                    return data

    async def project(self, job_id: str, timeout: float = 90.0) -> list[tuple[str, dict[str, Any]]]:
        """This project's frames until `jobCompleted` or a project-level `jobError`."""
        out: list[tuple[str, dict[str, Any]]] = []
        with trio.fail_after(timeout):
            while True:
                kind, data = await self.next(timeout)
                if data.get("jobID") != job_id:
                    continue
                out.append((kind, data))
                if kind == "jobState" and data.get("type") == "jobCompleted":
                    return out
                if kind == "jobError" and "imgID" not in data:
                    return out

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; its close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code
        return None


def connect(http_url: str, key: str, app_id: str = "test-app") -> Any:
    """`async with connect(...) as ws`: an `SdkSocket` (trio-websocket underneath)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def opened() -> Any:
        async with open_websocket_url(
            SdkSocket.url(http_url, app_id), extra_headers=[(b"api-key", key.encode())]
        ) as ws:
            yield SdkSocket(ws)

    return opened()
