"""A coordinator restart mid-project: the re-sent jobRequest resumes, never re-submits.

The coordinator (real, in-process, SQLite on disk) is stopped while the node renders the
second image of an SDK project, whose first image the app already got; it is started again on
the same data dir and ports, the app reconnects and re-sends the same jobRequest, as the SDKs
do. The project completes with exactly its two results (the first replayed from the record
the gateway kept, the second from the resumed request), the account is charged once, and no
second request exists. Another key re-sending the same jobID gets nothing of the first's.
The app's own socket after the restart is told the project still runs
(`authenticated.activeProjects`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from eth_account import Account

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.service import Signer, run_coordinator
from tests.e2e.conftest import MODEL, CountingSlowBackend, Net, free_port

from .conftest import create_key, spark_of
from .sdk_wire import connect, job_request


def _credit(database: Path, account: str, spark: int) -> None:
    ledger = Ledger(database)
    try:
        ledger.credit_purchase(account, spark)
    finally:
        ledger.close()


async def _active(url: str, key: str) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as http:
        got = await http.get(url + "/api/v1/artist/projects/active", headers={"api-key": key})
    assert got.status_code == 200
    return [p["id"] for p in got.json()["projects"]]


async def test_restart_mid_project_resumes_the_resent_job_request_and_charges_once(
    tmp_path: Path, backend: Any
) -> None:
    acct = Account.create()
    signer = Signer(acct.address, bytes(acct.key))
    http_port = free_port()
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        listen=f"/ip4/127.0.0.1/tcp/{free_port()}",
        models=[MODEL],
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
        http_listen=f"127.0.0.1:{http_port}",
    )
    url = f"http://127.0.0.1:{http_port}"
    slow = CountingSlowBackend(backend, step_seconds=0.4, nth=2)
    req = job_request(MODEL, 2, steps=4, sizePreset="custom", width=64, height=64, seed=3)
    job = req["jobID"]
    async with trio.open_nursery() as nodes:
        async with trio.open_nursery() as first:
            running = await first.start(run_coordinator, config, signer)
            key, account = create_key(config.database)
            other, other_account = create_key(config.database, "other")
            _credit(config.database, account, 1)
            before = spark_of(config.database, account)
            node = await Net(tmp_path, nodes, running, signer, config).add_node(slow, "node0")
            async with connect(url, key) as ws:
                await ws.send("jobRequest", req)
                got = await ws.until("jobResult", jobID=job)  # image 1 delivered
                with trio.fail_after(30):
                    await slow.nth_started.wait()  # image 2 mid-render
                assert await _active(url, key) == [job]
                first.cancel_scope.cancel()  # the coordinator dies here
        held = before - spark_of(config.database, account)
        assert held > 0

        async with trio.open_nursery() as second:
            running = await second.start(run_coordinator, config, signer)
            store = running.dispatcher.store
            assert await _active(url, key) == [job]  # known from the database
            async with connect(url, key) as ws:  # the app's socket is told what still runs
                kind, hello = await ws.next()
                assert kind == "authenticated"
                (entry,) = hello["activeProjects"]  # what the database does not keep (the
                assert entry["id"] == job and entry["status"] == "active"  # model, steps)
                assert entry["model"]["id"] == MODEL and entry["stepCount"] == 4  # is the
                assert entry["imageCount"] == 2 and entry["network"] == "fast"  # dispatcher's
            async with connect(url, other) as thief:  # same jobID, other key: its own project
                await thief.send("jobRequest", req)
                stolen = await thief.project(job)
                assert [k for k, _ in stolen] == ["jobError"]
                assert stolen[0][1]["error"] == 4024  # submitted for the other key: no funds
            # another appId: nothing is pushed to it, the re-sent jobRequest alone resumes
            async with connect(url, key, app_id="after-restart") as ws:
                await ws.send("jobRequest", req)  # the SDK re-sends its project
                frames = await ws.project(job)
                results = [d for k, d in frames if k == "jobResult"]
                assert frames[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
                assert not any(k == "jobError" for k, _ in frames)
                assert len(results) == 2 and results[0]["imgID"] == got["imgID"]
                assert len({r["imgID"] for r in results}) == 2
                async with httpx.AsyncClient(timeout=10) as plain:
                    for result in results:  # both downloadable, the first saved before the stop
                        image = await plain.get(result["resultUrl"])
                        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
                # once more after the end: replayed, not rendered or charged again
                spent = before - spark_of(config.database, account)
                await ws.send("jobRequest", req)
                again = await ws.project(job)
                assert [d["imgID"] for k, d in again if k == "jobResult"] == [
                    r["imgID"] for r in results
                ]
            assert await _active(url, key) == []
            counts = store.counts()
            second.cancel_scope.cancel()

        receipts = counts.pop("receipts")
        assert counts == {"done": 2} and receipts == 2  # one request of 2 jobs, each paid once
        assert slow.calls == 2  # neither image rendered twice
        assert 0 < spent <= held  # charged once: the reservation, less any refund
        assert before - spark_of(config.database, account) == spent
        assert spark_of(config.database, other_account) == 0
        node.stop.set()
        with trio.fail_after(20):
            await node.done.wait()
