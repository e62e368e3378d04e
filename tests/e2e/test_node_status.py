"""`sogni-node status`: read from a live node daemon and its journal after real renders, and
one clear line for each part that is missing (daemon stopped, no epochs, no wallet)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from sogni_app.api import render
from sogni_node.cli import app as node_app
from sogni_node.config import NodeConfig
from sogni_node.status_view import collect
from sogni_node.status_view import render as render_view

from .conftest import MODEL, start_net, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")


async def test_status_reads_the_running_daemon_and_todays_jobs(
    tmp_path: Path, backend: Any
) -> None:
    async with start_net(tmp_path) as net:
        node = await net.add_node(backend, "n")
        with trio.fail_after(90):
            result = await render(net.addr, tiny_request(2))
        assert len(result.images) == 2 and node.http is not None
        cfg = NodeConfig(
            data_dir=tmp_path / "n",
            coordinators=[net.addr],
            http_listen=node.http.removeprefix("http://"),
        )
        live = await trio.to_thread.run_sync(collect, cfg, node.wallet.address)
        node.stop.set()
        with trio.fail_after(20):
            await node.done.wait()

    assert live.daemon is not None and live.daemon_error is None
    assert live.daemon["coordinators"] == 1 and live.daemon["wallet"] == node.wallet.address
    assert live.jobs_today == 2 and live.models_today == {MODEL: 2}
    assert live.work_units_today > 0 and live.speed_today is not None and live.speed_today > 0
    assert live.unacked == 0
    assert live.rewards_error is not None and "no published epochs" in live.rewards_error

    stopped = collect(cfg, node.wallet.address, timeout=0.5)  # the daemon is gone now
    assert stopped.daemon is None and stopped.daemon_error is not None
    assert "sogni-node start" in stopped.daemon_error
    assert stopped.jobs_today == 2  # the journal still tells
    render_view(stopped)  # renders without the daemon's part
    with _timezone("Pacific/Kiritimati"):  # UTC+14: "today" is the local day, as it reads
        assert collect(cfg, node.wallet.address, timeout=0.5).jobs_today == 2


@contextlib.contextmanager
def _timezone(name: str) -> Iterator[None]:
    """Now in another time zone (an operator east of UTC counted 0 jobs from 10:00 UTC on:
    a local date at UTC midnight lay in the future)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_status_command_without_a_daemon_or_wallet(tmp_path: Path) -> None:
    env = {
        "SOGNI_NODE_DATA_DIR": str(tmp_path),
        "SOGNI_NODE_HTTP_LISTEN": "127.0.0.1:9",  # nothing listens there
    }
    out = CliRunner().invoke(node_app, ["status", "--once"], env=env)
    assert out.exit_code == 4, out.output  # no daemon: a script can tell (it was 0)
    assert "no node daemon answers on 127.0.0.1:9" in out.output
    assert "Traceback" not in out.output
    as_json = CliRunner().invoke(node_app, ["status", "--json"], env=env)
    assert as_json.exit_code == 4
    data = json.loads(as_json.stdout)
    assert data["wallet"] is None and data["jobs_today"] == 0 and data["daemon"] is None
