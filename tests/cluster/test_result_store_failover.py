"""`result_store = "database"`: two coordinators on one PostgreSQL and no shared folder.

A renders a request through its real node and stores the images as rows; the client acks
one and A is killed; the client resumes at B, which serves the other image from the
database (it never saw it); the client's acks delete the rows; no image file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import trio

from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    ImageAck,
    JobImage,
    RequestDone,
    RequestResumed,
    ResumeRequest,
)

from ..e2e.conftest import tiny_request
from .conftest import MODEL, start_cluster, submit


def _rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM result_images").fetchone()
        return int(row[0]) if row else 0


async def test_an_image_stored_at_a_is_served_by_b_from_the_database(
    tmp_path: Path, backend: Any, pg_url: str
) -> None:
    async with (
        start_cluster(
            tmp_path,
            pg_url,
            ["a", "b"],
            lease_seconds=2.0,
            models=[MODEL],
            result_store="database",
        ) as members,
        open_host(key_path=None, listen=()) as client,
    ):
        a, b = members["a"], members["b"]
        await a.net.add_node(backend, "node-a")
        channel, accepted = await submit(client, a, tiny_request(2, seed=11))
        rid = accepted.request_id
        from_a: dict[bytes, JobImage] = {}
        with trio.fail_after(90):
            while True:
                frame = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=90)
                if isinstance(frame, JobImage):
                    from_a[frame.job_id] = frame
                if isinstance(frame, RequestDone):
                    break
        assert sorted(from_a) == sorted(accepted.job_ids) and frame.delivered == 2
        assert await trio.to_thread.run_sync(_rows, pg_url) == 2
        first, second = accepted.job_ids
        await channel.send(ImageAck(request_id=rid, job_ids=[first]))
        with trio.fail_after(20):  # acknowledged: its row is deleted
            while await trio.to_thread.run_sync(_rows, pg_url) != 1:
                await trio.sleep(0.05)
        await a.kill()

        moved = await client.open_channel(b.addr, CLIENT_PROTOCOL)
        await moved.send(ResumeRequest(request_id=rid, token=accepted.resume_token))
        reply = await moved.receive(timeout=20)
        assert isinstance(reply, RequestResumed) and reply.acked == [first]
        frames: list[Any] = []
        with trio.fail_after(30):
            while not frames or not isinstance(frames[-1], RequestDone):
                frames.append(await moved.receive(limit=RESULT_FRAME_LIMIT, timeout=30))
        images = [f for f in frames if isinstance(f, JobImage)]
        assert [i.job_id for i in images] == [second]
        assert images[0] == from_a[second]  # the frame A stored, byte for byte
        await moved.send(ImageAck(request_id=rid, job_ids=[second]))
        with trio.fail_after(20):
            while await trio.to_thread.run_sync(_rows, pg_url) != 0:
                await trio.sleep(0.05)
    assert not list(tmp_path.rglob("*.jobimage"))  # no folder held an image


async def test_a_gateway_image_saved_at_a_downloads_from_b_out_of_the_database(
    tmp_path: Path, pg_url: str
) -> None:
    """The SDK gateway's downloadable image goes to `gateway_images` at A; A dies and B
    serves the signed URL A issued (one key per network), with no shared folder."""
    import httpx
    from eth_account import Account

    from tests.gateway.sdk_wire import connect, job_request

    from .conftest import Rogue, funded_key, png

    key, _ = funded_key(pg_url)
    image = png(64, 64, (10, 120, 240))
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], gateways=True, models=[MODEL], result_store="database"
        ) as m,
        open_host(key_path=None, listen=()) as host,
        httpx.AsyncClient(timeout=10) as http,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        await node.connect(a)
        req = job_request(MODEL, 1, steps=4, sizePreset="custom", width=64, height=64, seed=3)
        async with connect(a.http_url, key) as ws:
            await ws.send("jobRequest", req)
            await node.deliver(await node.offer(), a.net.domain, image)
            url = (await ws.until("jobResult", jobID=req["jobID"]))["resultUrl"]
            await ws.until("jobState", type="jobCompleted")
        assert (await http.get(url)).content == image
        await a.kill()
        at_b = await http.get(url.replace(urlsplit(a.http_url).netloc, urlsplit(b.http_url).netloc))
        assert at_b.status_code == 200, at_b.text
        assert at_b.content == image and at_b.headers["content-type"] == "image/png"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".jobimage")]
