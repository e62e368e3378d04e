"""Clients survive the coordinator: a cut stream or a restarted coordinator is resumed with the
request's token, every image arrives exactly once, nothing is charged twice; `sogni collect`
fetches a request whose client went away; a wrong token gets nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import msgspec
import trio
from eth_account import Account

from sogni_app.api import RenderedImage, ResumeTicket, authorize, collect, render, save_ticket
from sogni_coordinator.ledger import ISSUERS, Ledger, reserved_account
from sogni_coordinator.service import run_coordinator
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, RESULT_FRAME_LIMIT
from sogni_protocol.messages import (
    ImageAck,
    JobImage,
    RequestAccepted,
    RequestDone,
    RequestRefused,
    RequestResumed,
    ResumeRequest,
)
from sogni_protocol.pricing import quote

from .conftest import MODEL, Net, SlowBackend, receive_skipping, run_sogni, start_net, tiny_request

SPARK = 1_000_000  # micro


async def _wait(condition: Any, seconds: float = 60.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.05)


def _assert_conserved(ledger: Ledger) -> None:
    assert set(ledger.totals().values()) == {0}
    for account, amounts in ledger.balances().items():
        if account not in ISSUERS:
            assert min(amounts.values()) >= 0, account
        assert not account.startswith("reserved:"), f"{account} still holds {amounts}"


async def _resume(client: Any, addr: str, request_id: bytes, token: bytes) -> list[Any]:
    """A raw resume: every frame up to `RequestDone` (or the refusal)."""
    channel = await client.open_channel(addr, CLIENT_PROTOCOL)
    await channel.send(ResumeRequest(request_id=request_id, token=token))
    frames = [await channel.receive(timeout=10)]
    while not isinstance(frames[-1], RequestDone | RequestRefused):
        frames.append(await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=30))
    await channel.close()
    return frames


async def test_a_cut_stream_resumes_with_exactly_the_missing_images_and_no_double_charge(
    net_factory: Any, backend: Any
) -> None:
    payer = Account.create()
    req = tiny_request(4, seed=0)
    per_image = quote(req).per_image.spark_micro
    async with net_factory() as net, open_host(key_path=None, listen=()) as client:
        await net.add_node(SlowBackend(backend, step_seconds=0.2), "node0")
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(authorize(req, bytes(payer.key), net.domain))
            accepted = await channel.receive(timeout=10)
            assert isinstance(accepted, RequestAccepted)
            rid, token = accepted.request_id, accepted.resume_token
            first = await receive_skipping(channel, (JobImage,), 60, RESULT_FRAME_LIMIT)
            await channel.send(ImageAck(request_id=rid, job_ids=[first.job_id]))
            second = await receive_skipping(channel, (JobImage,), 60, RESULT_FRAME_LIMIT)
            await channel.reset()  # cut mid-request: the second image was never acknowledged
            store = net.coordinator.dispatcher.store
            await _wait(lambda: first.job_id in _acked(store, rid))

            # a forged resume (right id, wrong token) gets nothing and changes nothing
            (refused,) = await _resume(client, net.addr, rid, os.urandom(32))
            assert isinstance(refused, RequestRefused) and refused.code == "unauthorized"
            (refused,) = await _resume(client, net.addr, os.urandom(32), token)
            assert isinstance(refused, RequestRefused) and refused.code == "unauthorized"

            seen: list[int] = []
            with trio.fail_after(90):
                result = await collect(
                    ResumeTicket(net.addr, rid, token), on_image=lambda im: seen.append(im.index)
                )
            assert (
                sorted(seen)
                == [i.index for i in result.images]
                == [i for i in range(4) if i != first.index]
            )
            assert second.index in seen  # sent before the cut, not acknowledged: sent again
            assert len(store.receipts()) == 4
            # charged once per image, the rest of the reservation is gone, nothing created
            assert ledger.balance(payer.address)["spark_paid"] == SPARK - 4 * per_image
            assert sum(ledger.balance(reserved_account(rid)).values()) == 0
            _assert_conserved(ledger)
            before = ledger.balances()

            # everything is acknowledged now: a replayed resume gets no image and no charge
            await _wait(lambda: store.pending_deliveries() == [])
            frames = await _resume(client, net.addr, rid, token)
            assert [type(f) for f in frames] == [RequestResumed, RequestDone]
            assert set(frames[0].acked) == set(accepted.job_ids)
            assert frames[1].delivered == 4
            assert ledger.balances() == before
            # the last ack's file removal may still be in its worker thread
            await _wait(lambda: not net.coordinator.dispatcher.results.folder(rid).exists(), 10)
        finally:
            ledger.close()


def _acked(store: Any, rid: bytes) -> list[bytes]:
    record = store.delivery(rid)
    return [] if record is None else record.acked


async def test_a_restarted_coordinator_is_resumed_and_every_image_arrives_once(
    tmp_path: Path, backend: Any
) -> None:
    handed: list[RenderedImage] = []
    first_image = trio.Event()
    results: list[Any] = []

    def on_image(image: RenderedImage) -> None:
        handed.append(image)
        first_image.set()

    async with trio.open_nursery() as outer:
        async with start_net(tmp_path, models=[MODEL]) as net:
            await net.add_node(SlowBackend(backend, step_seconds=0.3), "node0")
            addr = net.addr

            async def client() -> None:
                results.append(
                    await render(addr, tiny_request(4, seed=3), on_image=on_image, reconnect_for=60)
                )

            outer.start_soon(client)
            with trio.fail_after(60):
                await first_image.wait()
            # the coordinator (and its node) stop here, mid-request
        assert len(handed) < 4 and not results
        config = msgspec.structs.replace(net.config, listen=addr.split("/p2p/")[0])
        async with trio.open_nursery() as nursery:
            running = await nursery.start(run_coordinator, config, net.signer)
            assert running.addrs[0] == addr  # same identity, same port: the client redials it
            await Net(tmp_path, nursery, running, net.signer, config).add_node(backend, "node1")
            store = running.dispatcher.store
            await _wait(lambda: bool(results), 90)
            await _wait(lambda: store.pending_deliveries() == [], 10)
            nursery.cancel_scope.cancel()
    (result,) = results
    assert [im.index for im in result.images] == [0, 1, 2, 3]
    assert sorted(im.index for im in handed) == [0, 1, 2, 3]  # each handed over once
    assert len({im.job_id for im in handed}) == 4
    receipts = {r.receipt.job_id: r for r in store_receipts(config.database)}
    assert set(receipts) == {im.job_id for im in result.images}
    for image in result.images:  # the receipt the client holds is the one stored
        assert receipts[image.job_id].receipt == image.receipt


def store_receipts(path: Path) -> list[Any]:
    from sogni_coordinator.store import Store

    store = Store(path)
    try:
        return store.receipts()
    finally:
        store.close()


async def _sogni(home: Path, *args: str) -> tuple[int, str, str]:
    return await run_sogni(home, *args)


async def test_sogni_collect_fetches_a_request_whose_client_went_away(
    net_factory: Any, backend: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    async with net_factory() as net, open_host(key_path=None, listen=()) as client:
        await net.add_node(backend, "node0")
        channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
        await channel.send(tiny_request(2, seed=5))
        accepted = await channel.receive(timeout=10)
        assert isinstance(accepted, RequestAccepted)
        await channel.close()  # the client goes away; the request runs on
        store = net.coordinator.dispatcher.store
        rid = accepted.request_id
        await _wait(lambda: len(store.pending_deliveries()) == 2)

        code, out, err = await _sogni(
            home, "collect", rid.hex(), "--token", os.urandom(32).hex(),
            "--out", str(tmp_path / "stolen"), "--coordinator", net.addr,
        )  # fmt: skip
        assert code == 3, err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "stolen").exists() or not list((tmp_path / "stolen").iterdir())
        assert len(store.pending_deliveries()) == 2  # nothing leaked, nothing acknowledged

        out_dir = tmp_path / "out"
        ticket = save_ticket(ResumeTicket(net.addr, rid, accepted.resume_token), out_dir)
        assert stat.S_IMODE(ticket.stat().st_mode) == 0o600
        code, out, err = await _sogni(home, "collect", rid.hex(), "--out", str(out_dir))
        assert code == 0, err
        assert "2 images" in out
        images = sorted(p.name for p in out_dir.glob(f"{rid.hex()[:12]}-*.png"))
        assert images == [f"{rid.hex()[:12]}-000.png", f"{rid.hex()[:12]}-001.png"]
        assert len((out_dir / "receipts.jsonl").read_text().splitlines()) == 2
        await _wait(lambda: store.pending_deliveries() == [], 10)
        assert not net.coordinator.dispatcher.results.folder(rid).exists()


async def test_sogni_render_losing_its_coordinator_says_so_in_one_line_and_collect_finishes(
    tmp_path: Path, backend: Any
) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    outcome: list[tuple[int, str, str]] = []
    async with trio.open_nursery() as outer:
        async with start_net(tmp_path, models=[MODEL]) as net:
            await net.add_node(SlowBackend(backend, step_seconds=0.5), "node0")
            addr = net.addr

            async def sogni_render() -> None:
                outcome.append(
                    await _sogni(
                        home,
                        "render",
                        "a red circle",
                        "--model",
                        MODEL,
                        "--steps",
                        "3",
                        "-n",
                        "3",
                        "--out",
                        str(out),
                        "--coordinator",
                        addr,
                        "--reconnect-for",
                        "1",
                    )
                )

            outer.start_soon(sogni_render)
            # the request is accepted (its ticket saved) and running: the coordinator dies
            await _wait(lambda: (out / "request.json").exists() and not outcome)
            assert stat.S_IMODE((out / "request.json").stat().st_mode) == 0o600
        await _wait(lambda: bool(outcome), 60)
    code, _, err = outcome[0]
    assert code == 4, err
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith("error: lost the coordinator") and "sogni collect" in line
    assert "Traceback" not in err
    ticket = ResumeTicket.from_json((out / "request.json").read_text())
    assert ticket.request_id.hex() in line

    config = msgspec.structs.replace(net.config, listen=addr.split("/p2p/")[0])
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_coordinator, config, net.signer)
        await Net(tmp_path, nursery, running, net.signer, config).add_node(backend, "node1")
        code, _, err = await _sogni(home, "collect", ticket.request_id.hex(), "--out", str(out))
        nursery.cancel_scope.cancel()
    assert code == 0, err
    saved = sorted(p.name for p in out.glob(f"{ticket.request_id.hex()[:12]}-*.png"))
    assert saved == [f"{ticket.request_id.hex()[:12]}-{i:03d}.png" for i in range(3)]
    assert len((out / "receipts.jsonl").read_text().splitlines()) == 3
