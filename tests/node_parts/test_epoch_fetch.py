"""Published epochs served by a coordinator (libp2p and HTTP) and fetched by a node.

Real parts: a folder published by the `Settler` on the embedded chain, the coordinator's
`EpochFolder` behind a libp2p host on 127.0.0.1 and its HTTP app (hypercorn), the node's
`fetch_epochs` with its cache and check. Rogue servers show the cut-offs and deadlines.
"""

from __future__ import annotations

import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio

from sogni_chain import connect
from sogni_coordinator.epoch_serving import EpochFileError, EpochFolder, serve_epochs
from sogni_coordinator.http_api import CoordinatorView, build_app
from sogni_coordinator.store import Store
from sogni_net import Channel, Handler, open_host, serve_http
from sogni_net.errors import ReadTimeout, TransportError
from sogni_node.epoch_fetch import EpochFetchError, EpochsRejected, fetch_epochs, source_key
from sogni_protocol import ids
from sogni_protocol.epoch_files import decode_epoch, encode, epoch_filename
from sogni_protocol.relay_messages import (
    EpochFileChunk,
    EpochFileRequest,
    EpochFileStart,
    EpochIndex,
    EpochRefused,
    EpochSummary,
    check_file_name,
    decode,
)
from sogni_protocol.relay_messages import encode as encode_message

from ..settlement.settle_env import make_net, settler, signed_receipt, store_receipts, worker


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs closed on the embedded chain: the coordinator's publish folder."""
    tmp = tmp_path_factory.mktemp("coordinator")
    net = make_net("embedded", connect())
    store = Store(tmp / "coordinator.db")
    try:
        store_receipts(store, [signed_receipt(worker(1), net.domain) for _ in range(2)])
        s = settler(store, net, tmp)
        assert s.close_epoch() is not None
        store_receipts(store, [signed_receipt(worker(2), net.domain)])
        assert s.close_epoch() is not None
    finally:
        store.close()
    return tmp / "epochs"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@asynccontextmanager
async def serving(folder: Path, **kw: int) -> AsyncIterator[tuple[str, str]]:
    """The coordinator's two ways of serving `folder`: (libp2p address, HTTP url)."""
    epochs = EpochFolder(folder, **kw)
    view = CoordinatorView("peer", "0x" + "00" * 20, None, epochs=epochs)  # type: ignore[arg-type]
    handlers = {ids.EPOCHS_PROTOCOL: partial(serve_epochs, folder=epochs)}
    async with open_host(key_path=None, handlers=handlers) as host, trio.open_nursery() as n:
        url = await n.start(serve_http, build_app(view), "127.0.0.1:0")
        yield host.addrs[0], url
        n.cancel_scope.cancel()


@asynccontextmanager
async def rogue(handler: Handler) -> AsyncIterator[str]:
    async with open_host(key_path=None, handlers={ids.EPOCHS_PROTOCOL: handler}) as host:
        yield host.addrs[0]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_libp2p_and_http_fetch_identical_checked_files(
    published: Path, tmp_path: Path
) -> None:
    async with serving(published) as (addr, url):
        by_p2p = await fetch_epochs([addr], tmp_path / "a")
        by_http = await fetch_epochs([url], tmp_path / "b")
        again = await fetch_epochs([addr], tmp_path / "a")  # cached: nothing downloaded
        index = msgspec.json.decode((await trio.to_thread.run_sync(_get, url + "/epochs"))[1])
    original = _files(published)
    assert _files(by_p2p.path) == original == _files(by_http.path)
    assert by_p2p.epochs == by_http.epochs == 2 and len(by_p2p.fetched) == len(original)
    assert again.fetched == [] and _files(again.path) == original
    assert by_p2p.path == tmp_path / "a" / source_key(addr)
    [first, second] = msgspec.convert(index["epochs"], list[EpochSummary])
    ef = decode_epoch(original["epoch-000002.json"])
    assert (second.epoch, second.root, second.total) == (2, ef.root, ef.total)
    assert second.receipts_file == ef.receipts_file and first.tree_file == "epoch-000001.tree.json"


async def test_a_tampered_served_file_is_refused_and_the_cache_kept(
    published: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "served"
    shutil.copytree(published, folder)
    async with serving(folder) as (addr, url):
        good = await fetch_epochs([addr], tmp_path / "cache")
        before = _files(good.path)
        # a coordinator that pays worker 2 a wei more in epoch 2 than its receipts give
        path = folder / epoch_filename(2)
        ef = decode_epoch(path.read_bytes())
        leaves = [(a, str(int(v) + 1) if a == worker(2).address else v) for a, v in ef.leaves]
        path.write_bytes(encode(msgspec.structs.replace(ef, leaves=leaves)))
        with pytest.raises(EpochsRejected, match=r"epoch 2: .*leaf is") as p2p:
            await fetch_epochs([addr], tmp_path / "cache")
        with pytest.raises(EpochsRejected, match=r"epoch 2: .*leaf is"):
            await fetch_epochs([url], tmp_path / "cache")
        # a receipts batch edited in place no longer hashes to its name
        path.write_bytes(encode(ef))
        batch = next((folder / "receipts").iterdir())
        raw = batch.read_bytes()
        assert b'"workUnits":43200' in raw
        batch.write_bytes(raw.replace(b'"workUnits":43200', b'"workUnits":43201'))
        tampered = batch.read_bytes()
        with pytest.raises(EpochsRejected, match="does not hash to its name"):
            await fetch_epochs([addr], tmp_path / "fresh")
        # the cached copy of that batch is still the one its name proves: it is not fetched
        assert (await fetch_epochs([addr], tmp_path / "cache")).fetched == []
        assert tampered != (good.path / "receipts" / batch.name).read_bytes()
    assert worker(2).address in str(p2p.value)
    assert _files(good.path) == before  # the last checked copy is untouched
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_only_published_names_are_served(published: Path, tmp_path: Path) -> None:
    folder = EpochFolder(published)
    for bad in (
        "../coordinator.db",
        "/etc/passwd",
        "receipts/../epoch-000001.json",
        "epoch-1.json",
        "epoch-0000001.json",
        "epoch-000000.json",
        "receipts/0xABC.json",
        "receipts\\0x" + "00" * 32 + ".json",
        "",
    ):
        with pytest.raises(ValueError):
            check_file_name(bad)
        with pytest.raises(EpochFileError) as err:
            folder.read(bad)
        assert err.value.code == "bad_name"
    assert folder.read("epoch-000001.json") == (published / "epoch-000001.json").read_bytes()
    with pytest.raises(EpochFileError, match="no published file"):
        folder.read("epoch-000009.json")
    # a symlink inside the folder is never followed out of it
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    linked = tmp_path / "linked"
    shutil.copytree(published, linked)
    (linked / "epoch-000003.json").symlink_to(outside)
    with pytest.raises(EpochFileError) as err:
        EpochFolder(linked).read("epoch-000003.json")
    assert err.value.code == "not_found"
    assert [s.epoch for s in EpochFolder(linked).index()[0]] == [1, 2]


async def test_bad_names_are_refused_over_both_transports(published: Path) -> None:
    async with serving(published) as (addr, url), open_host(key_path=None, listen=()) as client:
        channel = await client.open_channel(addr, ids.EPOCHS_PROTOCOL)
        for bad in ("../coordinator.db", "/etc/passwd", "receipts/../../x.json"):
            await channel.send_raw(encode_message(EpochFileRequest(name=bad)))
            answer = decode(await channel.receive_raw(limit=ids.EPOCHS_FRAME_LIMIT, timeout=5))
            assert isinstance(answer, EpochRefused) and answer.code == "bad_name"
        await channel.close()
        for path in (
            "/epochs/..%2Fcoordinator.db",
            "/epochs/..%2F..%2Fetc%2Fpasswd",
            "/epochs/%2Fetc%2Fpasswd",
            "/epochs/receipts/..%2F..%2Fcoordinator.db",
            "/epochs/x",
        ):
            status, body = await trio.to_thread.run_sync(_get, url + path)
            assert status == 400, (path, status, body)
            assert msgspec.json.decode(body)["error"] == "bad_name"


async def test_oversize_answers_are_cut_off(published: Path, tmp_path: Path) -> None:
    async with serving(published) as (addr, url):
        for source in (addr, url):  # announced (or declared) over the node's limit
            with pytest.raises(EpochFetchError, match="over"):
                await fetch_epochs([source], tmp_path / "small", file_limit=200)

    entry = EpochFolder(published).index()[0][0]  # a real index entry

    async def liar(channel: Channel) -> None:
        """Announces 10 bytes of the epoch file, then sends more."""
        while True:
            request = decode(await channel.receive_raw(timeout=5))
            if isinstance(request, EpochFileRequest):
                start = EpochFileStart(name=request.name, size=10, digest=b"\0" * 32)
                await channel.send_raw(encode_message(start), limit=ids.EPOCHS_FRAME_LIMIT)
                chunk = EpochFileChunk(data=b"x" * 4096)
                await channel.send_raw(encode_message(chunk), limit=ids.EPOCHS_FRAME_LIMIT)
            else:
                index = EpochIndex(epochs=[entry])
                await channel.send_raw(encode_message(index), limit=ids.EPOCHS_FRAME_LIMIT)

    async with rogue(liar) as addr:
        with pytest.raises(EpochFetchError, match="cut off"):
            await fetch_epochs([addr], tmp_path / "liar")

    async def flood(channel: Channel) -> None:
        """A frame bigger than the protocol allows: refused from its header."""
        await channel.receive_raw(timeout=5)
        await channel.send_unframed((ids.EPOCHS_FRAME_LIMIT + 1).to_bytes(4, "big"))
        await trio.sleep(5)

    async with rogue(flood) as addr:
        with pytest.raises(EpochFetchError, match=r"exceeds|limit|large"):
            await fetch_epochs([addr], tmp_path / "flood")


async def test_reads_have_deadlines(tmp_path: Path) -> None:
    async def silent(channel: Channel) -> None:
        await trio.sleep(30)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts (in the kernel), never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with rogue(silent) as addr:
            started = time.monotonic()
            with pytest.raises(EpochFetchError, match=r"within|timed out") as err:
                await fetch_epochs([addr, url], tmp_path / "cache", timeout=0.5)
            assert time.monotonic() - started < 5
    finally:
        listener.close()
    assert addr in str(err.value) and url in str(err.value)


async def test_a_peer_fetches_one_file_at_a_time_and_a_late_transfer_is_cut(
    published: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four readers trickling bytes held every transfer slot (each send met its deadline),
    and every node's fetch was refused "busy": now one transfer per peer, and a file must
    go at `MIN_TRANSFER_RATE` on average or its stream is reset (its slot freed)."""
    epochs = EpochFolder(published)
    handlers = {ids.EPOCHS_PROTOCOL: partial(serve_epochs, folder=epochs)}
    name = next(n for n in _files(published) if n.startswith("epoch-") and n.endswith(".json"))
    request = encode_message(EpochFileRequest(name=name))
    async with (
        open_host(key_path=None, handlers=handlers) as host,
        open_host(key_path=None, listen=()) as client,
    ):

        async def ask() -> object:
            channel = await client.open_channel(host.addrs[0], ids.EPOCHS_PROTOCOL)
            await channel.send_raw(request)
            answer = decode(await channel.receive_raw(limit=ids.EPOCHS_FRAME_LIMIT, timeout=3))
            if isinstance(answer, EpochFileStart):  # the file follows, whole
                chunk = decode(await channel.receive_raw(limit=ids.EPOCHS_FRAME_LIMIT, timeout=3))
                assert isinstance(chunk, EpochFileChunk) and len(chunk.data) == answer.size
            return answer

        assert epochs.hold(client.peer_id)  # this peer's transfer runs on another stream
        answer = await ask()
        assert isinstance(answer, EpochRefused) and "one file at a time" in answer.reason
        epochs.let_go(client.peer_id)
        assert isinstance(await ask(), EpochFileStart)
        monkeypatch.setattr(EpochFolder, "transfer_deadline", staticmethod(lambda size: 0.0))
        with pytest.raises((ReadTimeout, TransportError)):  # cut: reset (or a silent end)
            await ask()
        assert epochs.fetching == set() and epochs.transfers.value == 4  # all given back
