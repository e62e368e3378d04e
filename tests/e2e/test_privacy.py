"""Prompts never reach a log line, a metric or a file in the clear: three real processes,
debug level, a sentinel prompt that passes the prompt policy and the image check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from sogni_app.api import render_sync
from sogni_devnet.localnet import start_localnet
from sogni_protocol.messages import RenderRequest

SENTINEL = "zebra-sentinel-7f3a"


def test_sentinel_prompt_is_in_no_log_line_of_any_process(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with start_localnet(
        tmp_path / "net",
        nodes=2,
        log_level="debug",
        node_env={"SOGNI_NODE_TEST_MODEL": "true"},
    ) as net:
        request = RenderRequest(
            model_id="sogni-tiny-sd",
            positive_prompt=f"a red circle {SENTINEL}",
            negative_prompt=f"blurry {SENTINEL}",
            style_prompt=SENTINEL,
            steps=3,
            width=64,
            height=64,
            number_of_images=4,
        )
        result = render_sync(net.coordinator_addr, request)
        logs = net.log_files()
        pages = [httpx.get(f"{url}/metrics", timeout=10).text for url in _http_urls(logs)]
    assert len(result.images) == 4
    lines = [line for path in logs for line in path.read_text().splitlines()]
    # the daemons really logged at debug level, including the work on this request
    assert any('"level": "debug"' in line for line in lines)
    assert any("job_finished" in line for line in lines)
    assert not [line for line in lines if SENTINEL in line]
    captured = capfd.readouterr()
    assert SENTINEL not in captured.out + captured.err
    assert SENTINEL not in caplog.text
    # every daemon's metrics, including the image check's counters, are free of it
    assert len(pages) == 3 and any("image_checks_total" in page for page in pages)
    assert not [page for page in pages if SENTINEL in page]
    # the coordinator keeps prompts sealed: no file under its data folder holds one in the clear
    stored = [p for p in (tmp_path / "net").rglob("*") if p.is_file() and p.suffix != ".log"]
    assert any(p.suffix == ".db" for p in stored)
    assert not [p for p in stored if SENTINEL.encode() in p.read_bytes()]


def _http_urls(logs: list[Path]) -> list[str]:
    urls = []
    for path in logs:
        for line in path.read_text().splitlines():
            if '"http_started"' in line:
                urls.append(json.loads(line)["url"])
    return urls
