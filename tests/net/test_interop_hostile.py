"""A libp2p client of another implementation (js-libp2p) sends malformed frames on every
protocol a live coordinator and a live node announce; both keep answering and rendering.

`interop/hostile.mjs` dials over TCP + Noise + yamux, reads the protocol list from identify
(`--all`), and reports per protocol how the daemon ended each stream. Installed by
`npm ci --prefix interop` (the Makefile's `test` target does it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import render
from sogni_net import open_host
from tests.e2e.conftest import tiny_request
from tests.fuzz.test_live_daemons import LIBP2P_PROTOCOLS, backend, live_pair

__all__ = ["backend"]  # the module-scoped fixture, shared with the live fuzz test

REPO = Path(__file__).resolve().parents[2]
INTEROP = REPO / "interop"
FRAMES = int(os.environ.get("SOGNI_INTEROP_FRAMES", "60"))

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (INTEROP / "node_modules").is_dir(),
    reason="js-libp2p client not installed: run `npm ci --prefix interop` (Node >= 20)",
)


async def hostile(addr: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    done = await trio.run_process(
        [
            node,
            str(INTEROP / "hostile.mjs"),
            "--addr",
            addr,
            "--all",
            f"--frames={FRAMES}",
            "--wait-ms=1000",
            "--concurrency=8",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


async def test_js_libp2p_hostile_client_leaves_both_daemons_answering(
    tmp_path: Path, backend: Any
) -> None:
    async with live_pair(tmp_path, backend) as (net, node_host):
        for addr in (net.addr, node_host.addrs[0]):
            with trio.fail_after(240):
                report = await hostile(addr)
            assert set(report["announced"]) >= LIBP2P_PROTOCOLS
            for protocol, counts in report["protocols"].items():
                assert counts["streams"] == FRAMES, protocol
                # Each stream ended in a refusal, a close, or waited on a valid prefix;
                # never a dial failure (the daemon stayed up throughout).
                assert counts["dial_failed"] == 0, (protocol, counts)
            assert report["answering"], report.get("pingError")
        async with open_host(key_path=None, listen=()) as probe:
            for addr in (net.addr, node_host.addrs[0]):
                assert await probe.ping(addr, timeout=10) < 5
        with trio.fail_after(60):
            result = await render(net.addr, tiny_request(1, seed=11))
        assert len(result.images) == 1 and not result.failed
