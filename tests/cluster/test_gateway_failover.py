"""The SDK gateway across coordinators of one network (issue #18): an app whose coordinator
dies finishes its project at another, and a result URL one coordinator signed works at all.

Two in-process coordinators on one real PostgreSQL, each serving its gateway on 127.0.0.1
with the network's one result-URL key and one result folder (`start_cluster(gateways=True)`).
The app speaks the SDKs' wire protocol (`tests/gateway/sdk_wire.py`): the official SDKs keep
one endpoint per client, so "moving to B" is what an app does with a new client at B's URL
and the same key and appId. Rogue nodes (real libp2p, real signed receipts) decide which
coordinator gets which result, and when.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio
from eth_account import Account
from trio_websocket import ConnectionClosed

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.ledger import ASSETS, Ledger, reserved_account
from sogni_coordinator.result_urls import ResultUrls, load_key
from sogni_net import open_host
from tests.gateway.conftest import spark_of as _spark
from tests.gateway.sdk_wire import SdkSocket, connect, job_request

from .conftest import MODEL, Member, Rogue, png, start_cluster
from .conftest import funded_key as _funded_key
from .conftest import pg_rows as _pg_rows

TINY = {"steps": 4, "sizePreset": "custom", "width": 64, "height": 64, "seed": 11}


def _at(url: str, member: Member) -> str:
    """The same URL (path, query) on `member`'s gateway."""
    split = urlsplit(url)
    return urlunsplit(split._replace(netloc=urlsplit(member.http_url).netloc))


async def _socket_dropped(ws: SdkSocket) -> None:
    """Read until the dead coordinator's socket is gone (no frame of it may be missed)."""
    with trio.fail_after(10):
        try:
            while True:
                await ws.next()
        except ConnectionClosed:
            return


async def _queued_then_killed(a: Member, key: str, images: int) -> str:
    """An app's project of `images` queued at A's gateway, then A killed (its socket gone);
    the project's jobID."""
    req = job_request(MODEL, images, **TINY)
    async with connect(a.http_url, key) as ws:
        await ws.send("jobRequest", req)
        await ws.until("jobState", type="queued", jobID=req["jobID"])
        await a.kill()
        await _socket_dropped(ws)
    return str(req["jobID"])


async def test_an_app_whose_coordinator_dies_finishes_its_project_at_another(
    tmp_path: Path, pg_url: str
) -> None:
    """A 3-image project at A's gateway: image 1 reaches the app from A, A is killed while
    nodes hold its offers for images 2 and 3. One node delivers image 2 to B; the app
    connects to B's gateway with the same key and appId and, without re-sending anything,
    gets the project pushed (B adopts the request through `resume_anywhere`): image 1
    replayed, image 2, then image 3, which B's node renders once A's lease on it lapsed.
    Each image rendered and billed once; a re-sent jobRequest replays, never resubmits."""
    key, account = _funded_key(pg_url)
    before = _spark(pg_url, account)
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], gateways=True, lease_seconds=2.0, models=[MODEL]
        ) as m,
        open_host(key_path=None, listen=()) as host1,
        open_host(key_path=None, listen=()) as host2,
        open_host(key_path=None, listen=()) as host3,
        open_host(key_path=None, listen=()) as host4,
        httpx.AsyncClient(timeout=10) as http,
    ):
        a, b = m["a"], m["b"]
        domain = a.net.domain
        first, held = Rogue(host1, Account.create()), Rogue(host2, Account.create())
        stuck = Rogue(host4, Account.create())  # takes A's third offer, never answers
        for node in (first, held, stuck):
            await node.connect(a)
        req = job_request(MODEL, 3, **TINY)
        job = req["jobID"]
        async with connect(a.http_url, key) as ws:
            await ws.send("jobRequest", req)
            offer1, offer2, lost = await first.offer(), await held.offer(), await stuck.offer()
            await first.deliver(offer1, domain, png(64, 64, colors[0]))
            got_a = await ws.until("jobResult", jobID=job)
            await a.kill()  # mid-project: a node holds A's offer for image 2
            await _socket_dropped(ws)
        from_a = [d for k, d in ws.frames if k == "jobResult"]
        assert [d["imgID"] for d in from_a] == [got_a["imgID"]]

        # the node holding A's offer delivers its result to B (A is gone)
        await held.connect(b, credit=0)
        await held.deliver(offer2, domain, png(64, 64, colors[1]))

        async with connect(b.http_url, key) as ws:  # same key, same appId: pushed, not re-sent
            results: dict[str, dict[str, Any]] = {}
            with trio.fail_after(30):
                while len(results) < 2:
                    kind, data = await ws.next()
                    assert kind != "jobError", data
                    if kind == "jobResult":
                        assert data["jobID"] == job and data["imgID"] not in results
                        results[data["imgID"]] = data
            assert got_a["imgID"] in results  # image 1 replayed from the shared record
            # image 3: A's lease on it lapses (2 s) and a node at B renders it
            late = Rogue(host3, Account.create())
            await late.connect(b)
            offer3 = await late.offer(timeout=30)
            assert offer3.offer.coordinator == b.signer.address
            assert offer3.offer.job_id == lost.offer.job_id
            await late.deliver(offer3, domain, png(64, 64, colors[2]))
            rest = await ws.project(job, timeout=30)
            assert rest[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
            for kind, data in rest:
                assert kind != "jobError", data
                if kind == "jobResult":
                    assert data["imgID"] not in results  # each image once on this socket
                    results[data["imgID"]] = data
            assert len(results) == 3
            # every image downloads from B, the bytes its node rendered
            bodies = set()
            for data in results.values():
                got = await http.get(data["resultUrl"])
                assert got.status_code == 200, got.text
                bodies.add(got.content)
            assert bodies == {png(64, 64, c) for c in colors}

            # the SDK re-sends its project: replayed, never submitted or charged again
            spent = before - _spark(pg_url, account)
            await ws.send("jobRequest", req)
            again = await ws.project(job, timeout=30)
            assert sorted(d["imgID"] for k, d in again if k == "jobResult") == sorted(results)

    # one request, one receipt and one ledger charge per job, the payer charged once
    (rid,) = (bytes(r[0]) for r in _pg_rows(pg_url, "SELECT request_id FROM requests"))
    receipts = _pg_rows(pg_url, "SELECT job_id, result_hash FROM receipts")
    assert {bytes(h) for _, h in receipts} == {
        hashlib.sha256(png(64, 64, c)).digest() for c in colors
    }
    charged = _pg_rows(
        pg_url,
        "SELECT count(*), sum(spark_free + spark_paid) FROM ledger_jobs WHERE request_id = %s",
        rid.hex(),
    )
    (reservation,) = _pg_rows(
        pg_url, "SELECT amount, state FROM ledger_reservations WHERE request_id = %s", rid.hex()
    )
    assert charged == [(3, reservation[0])] and reservation[1] == "closed"
    assert spent == reservation[0] == before - _spark(pg_url, account)
    ledger = Ledger(pg_url)
    try:
        assert sum(ledger.balance(reserved_account(rid)).values()) == 0
        assert ledger.totals() == dict.fromkeys(ASSETS, 0)
    finally:
        ledger.close()
    assert _pg_rows(pg_url, "SELECT owner FROM cluster_requests") == [(b.signer.address.lower(),)]
    (attempts,) = _pg_rows(
        pg_url, "SELECT attempts FROM queue_jobs WHERE job_id = %s", lost.offer.job_id
    )
    assert attempts[0] >= 2  # leased by A, then again by B once A's lease lapsed


async def test_an_app_that_lands_on_a_b_then_a_again_gets_each_image_once(
    tmp_path: Path, pg_url: str
) -> None:
    """Behind one public address each reconnect may land on another coordinator: the app
    gets image 1 at A, image 2 at B (B adopts the request), then comes back to A, which
    adopts it again. A's memory of the project is stale (image 2 was recorded at B): it
    re-reads the shared record, so the app gets the end with image 2 replayed, not an error."""
    key, _ = _funded_key(pg_url)
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], gateways=True, lease_seconds=30.0, models=[MODEL]
        ) as m,
        open_host(key_path=None, listen=()) as host1,
        open_host(key_path=None, listen=()) as host2,
        open_host(key_path=None, listen=()) as host3,
    ):
        a, b = m["a"], m["b"]
        domain = a.net.domain
        req = job_request(MODEL, 3, **TINY)
        job = req["jobID"]
        seen: list[str] = []

        async def render_one(node: Rogue, at: Member, ws: SdkSocket) -> None:
            await node.connect(at)
            await node.deliver(await node.offer(), domain)
            got = await ws.until("jobResult", jobID=job)
            while got["imgID"] in seen:  # a replay of what the app already has
                got = await ws.until("jobResult", jobID=job)
            seen.append(got["imgID"])

        async with connect(a.http_url, key) as ws:
            await ws.send("jobRequest", req)
            await render_one(Rogue(host1, Account.create()), a, ws)
        async with connect(b.http_url, key) as ws:  # pushed at once: B adopts it
            await ws.until("jobResult", jobID=job, imgID=seen[0])
            await render_one(Rogue(host2, Account.create()), b, ws)
        (rid,) = (bytes(r[0]) for r in _pg_rows(pg_url, "SELECT request_id FROM requests"))
        with trio.fail_after(10):  # A saw its claim go to B
            while rid in a.running.dispatcher.requests:
                await trio.sleep(0.05)
        async with connect(a.http_url, key) as ws:  # and back at A
            with trio.fail_after(10):
                while len([f for f in ws.frames if f[0] == "jobResult"]) < 2:
                    await ws.next()
            await render_one(Rogue(host3, Account.create()), a, ws)
            rest = await ws.project(job, timeout=30)
            frames = ws.frames
        assert rest[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
        assert not [d for k, d in frames if k == "jobError"]  # no image reported lost
        assert sorted({d["imgID"] for k, d in frames if k == "jobResult"}) == sorted(seen)
        assert len(seen) == 3
    assert _pg_rows(pg_url, "SELECT count(*) FROM receipts") == [(3,)]


async def test_an_app_that_comes_back_after_the_takeover_collects_its_project(
    tmp_path: Path, pg_url: str
) -> None:
    """A dies right after accepting a 2-image project and the app stays away: B's node
    renders both images from the shared queue, B takes the orphaned request over once A's
    heartbeat lapsed and bills it. The app's next socket, at B, gets both images and the
    project's end; nothing is charged again."""
    key, account = _funded_key(pg_url)
    before = _spark(pg_url, account)
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], gateways=True, lease_seconds=1.0, models=[MODEL]
        ) as m,
        open_host(key_path=None, listen=()) as host,
        httpx.AsyncClient(timeout=10) as http,
    ):
        a, b = m["a"], m["b"]
        job = await _queued_then_killed(a, key, 2)
        node = Rogue(host, Account.create())
        await node.connect(b, credit=2)
        for offer in [await node.offer(), await node.offer()]:
            await node.deliver(offer, b.net.domain)
        (rid,) = (bytes(r[0]) for r in _pg_rows(pg_url, "SELECT request_id FROM requests"))
        with trio.fail_after(30):  # A's heartbeat lapses after 5 s: B bills, nothing held
            while _pg_rows(
                pg_url,
                "SELECT 1 FROM ledger_reservations WHERE request_id = %s AND state = 'open'",
                rid.hex(),
            ):
                await trio.sleep(0.1)
        charged = before - _spark(pg_url, account)
        assert charged > 0

        async with connect(b.http_url, key) as ws:
            frames = await ws.project(job, timeout=30)
            assert frames[-1] == ("jobState", {"type": "jobCompleted", "jobID": job})
            results = [d for k, d in frames if k == "jobResult"]
            assert len({d["imgID"] for d in results}) == len(results) == 2
            for data in results:
                assert (await http.get(data["resultUrl"])).content == png()
            # a fresh download URL for one of them, from B's REST: as the SDKs ask (jobId and
            # imageId: one lookup of the key's project, recalled from the database if need
            # be), and by the image id alone
            for params in (
                {"jobId": job, "imageId": results[0]["imgID"]},
                {"imageId": results[0]["imgID"]},
            ):
                got = await http.get(
                    b.http_url + "/v1/image/downloadUrl", params=params, headers={"api-key": key}
                )
                assert got.status_code == 200, got.text
                assert (await http.get(got.json()["data"]["downloadUrl"])).content == png()
            wrong = {"jobId": job, "imageId": "NOT-AN-IMAGE-OF-IT"}
            got = await http.get(
                b.http_url + "/v1/image/downloadUrl", params=wrong, headers={"api-key": key}
            )
            assert got.status_code == 404
    assert before - _spark(pg_url, account) == charged  # collecting charged nothing more
    assert _pg_rows(pg_url, "SELECT count(*) FROM ledger_jobs") == [(2,)]


async def test_a_cancel_at_another_coordinator_stops_the_project_and_refunds_it(
    tmp_path: Path, pg_url: str
) -> None:
    """A dies with a project queued; the app cancels it at B from a socket that re-attached
    nothing (another appId): B takes the request over to cancel it, the queued jobs are
    buried in the shared queue and the whole reservation comes back."""
    key, account = _funded_key(pg_url)
    before = _spark(pg_url, account)
    async with start_cluster(
        tmp_path, pg_url, ["a", "b"], gateways=True, lease_seconds=30.0, models=[MODEL]
    ) as m:
        a, b = m["a"], m["b"]
        job = await _queued_then_killed(a, key, 2)
        assert before - _spark(pg_url, account) > 0  # reserved at A
        async with connect(b.http_url, key, app_id="another-app") as ws:
            await ws.send("jobError", {"jobID": job, "error": "artistCanceled"})
            confirmed = await ws.until("artistCancelConfirmation", jobID=job)
            assert confirmed["didCancel"] is True
        with trio.fail_after(20):  # B ends the request: everything refunded
            while _spark(pg_url, account) != before:
                await trio.sleep(0.1)
    assert {r[0] for r in _pg_rows(pg_url, "SELECT state FROM jobs")} == {"cancelled"}
    assert {r[0] for r in _pg_rows(pg_url, "SELECT state FROM queue_jobs")} == {"dead"}
    assert _pg_rows(pg_url, "SELECT count(*) FROM ledger_jobs") == [(0,)]


async def test_a_result_url_signed_by_a_dead_coordinator_is_served_by_another(
    tmp_path: Path, pg_url: str
) -> None:
    """A signs a result URL and dies; B serves the same bytes for it (one key, one folder per
    network). An expired, tampered or foreign-key URL is refused at B as it was at A."""
    key, _ = _funded_key(pg_url)
    image = png(64, 64, (10, 120, 240))
    async with (
        start_cluster(tmp_path, pg_url, ["a", "b"], gateways=True, models=[MODEL]) as m,
        open_host(key_path=None, listen=()) as host,
        httpx.AsyncClient(timeout=10) as http,
    ):
        a, b = m["a"], m["b"]
        node = Rogue(host, Account.create())
        await node.connect(a)
        req = job_request(MODEL, 1, **TINY)
        async with connect(a.http_url, key) as ws:
            await ws.send("jobRequest", req)
            await node.deliver(await node.offer(), a.net.domain, image)
            url = (await ws.until("jobResult", jobID=req["jobID"]))["resultUrl"]
            await ws.until("jobState", type="jobCompleted")
        assert urlsplit(url).netloc == urlsplit(a.http_url).netloc
        at_a = await http.get(url)
        assert at_a.status_code == 200 and at_a.content == image
        split = urlsplit(url)
        image_id = split.path.rsplit("/", 1)[1]
        query = dict(p.split("=", 1) for p in split.query.split("&"))
        shared = ResultUrls(load_key(tmp_path / "shared-result-url.key"))
        expired = shared.sign(image_id, base_url=a.http_url, ttl=60, now=time.time() - 3600)
        sig = query["sig"]
        tampered = url.replace(sig, ("B" if sig[0] == "A" else "A") + sig[1:])
        foreign = ResultUrls(b"x" * 32).sign(image_id, base_url=a.http_url)
        for bad in (expired, tampered, foreign):
            assert (await http.get(bad)).status_code == 403

        await a.kill()
        at_b = await http.get(_at(url, b))
        assert at_b.status_code == 200, at_b.text
        assert at_b.content == image and at_b.headers["content-type"] == "image/png"
        for bad in (expired, tampered, foreign):
            refused = await http.get(_at(bad, b))
            assert refused.status_code == 403 and image not in refused.content
        unknown = shared.sign("6F1D2C0A-8E7B-4C3D-9A1B-0E2F3A4B5C6D", base_url=b.http_url)
        assert (await http.get(unknown)).status_code == 404  # signed, but no such image


def test_an_api_keys_daily_spend_counts_on_the_shared_database(pg_url: str) -> None:
    """Every coordinator of a network counts a key's spend in one row per day: its upserts
    run on PostgreSQL (a bare `micro` in them was ambiguous there), refunds floor at 0."""
    keys, other = ApiKeys(pg_url), ApiKeys(pg_url)  # two coordinators' connections
    try:
        _, account = keys.create("limited", daily_limit_spark=1)
        assert keys.try_spend(account, 600_000, 1_000_000)
        assert not other.try_spend(account, 600_000, 1_000_000)  # sees the first's spend
        assert other.try_spend(account, 400_000, 1_000_000)
        assert keys.spent_today(account) == 1_000_000
        other.record_spend(account, -250_000)
        assert keys.spent_today(account) == 750_000
        keys.record_spend(account, -10_000_000)  # no headroom below zero
        assert other.spent_today(account) == 0
    finally:
        keys.close()
        other.close()
