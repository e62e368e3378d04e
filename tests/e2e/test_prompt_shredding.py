"""Prompts at rest are sealed with a per-request key that is shredded when the request ends:
a sentinel prompt rendered through a real coordinator and node is in no file afterwards
(database, WAL, node journal, results folder) and in no log line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import ResumeTicket, render
from sogni_protocol.logs import configure_logging

from .conftest import tiny_request

SENTINEL = "okapi-sentinel-5c1d"


def _files_with(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_a_sentinel_prompt_is_in_no_file_or_log_and_its_key_is_shredded(
    net_factory: Any,
    backend: Any,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_logging("debug", json=True)  # as the daemons log (tests/conftest.py restores it)
    caplog.set_level(logging.DEBUG)
    request = tiny_request(
        2,
        positive_prompt=f"a red circle {SENTINEL}",
        negative_prompt=f"blurry {SENTINEL}",
        style_prompt=SENTINEL,
    )
    async with net_factory(prompt_retention_seconds=0) as net:
        await net.add_node(backend, "node0")
        store = net.coordinator.dispatcher.store
        keys_while_live: list[bool] = []

        def on_accepted(ticket: ResumeTicket) -> None:
            keys_while_live.append(store.has_key(ticket.request_id))

        with trio.fail_after(60):
            result = await render(net.addr, request, on_accepted=on_accepted)
        assert len(result.images) == 2
        assert keys_while_live == [True]  # the prompt was readable while the jobs ran
        with trio.fail_after(10):  # retention 0: shredded as the request ends
            while store.has_key(result.request_id):
                await trio.sleep(0.05)
        needle = SENTINEL.encode()
        # coordinator.db, -wal, -shm, the node's journal, results folders: all of tmp_path
        assert _files_with(tmp_path, needle) == []
    assert _files_with(tmp_path, needle) == []
    captured = capfd.readouterr()
    lines = (captured.out + captured.err + caplog.text).splitlines()
    assert any("offer_received" in line for line in lines)  # the node logged the offer...
    assert [line[:200] for line in lines if SENTINEL in line] == []  # ...without its prompt
