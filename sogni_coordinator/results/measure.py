"""Images per second into a result store, as the dispatcher stores them (docs/SCALING.md).

    python -m sogni_coordinator.results.measure --store folder --dir /tmp/x
    python -m sogni_coordinator.results.measure --store database --url postgresql://...
    python -m sogni_coordinator.results.measure --store sqlite --dir /tmp/x

`--concurrent` images are put at once (the dispatcher's receipts arrive together: `put`
groups them into one write), `--images` in all, each `--kb` of random bytes (incompressible,
as PNGs are); then every image is read back through a second handle (another coordinator:
nothing in its memory) and removed, as the clients' acknowledgements do. Prints one JSON
line per run; the median of `--runs`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import trio

from sogni_coordinator.results.base import ResultKey, ResultStore
from sogni_coordinator.results.folder import FolderResults
from sogni_coordinator.results.sqlite import SqliteResults
from sogni_protocol.messages import JobImage, Receipt, RenderMeta


def _image(i: int, size: int) -> JobImage:
    receipt = Receipt(
        job_id=i.to_bytes(32, "big"),
        offer_hash=b"\x02" * 32,
        worker="0x" + "11" * 20,
        coordinator="0x" + "22" * 20,
        model_id="m",
        result_hash=b"\x03" * 32,
        steps_done=20,
        work_units=1000,
        completed_at=1_700_000_000,
    )
    return JobImage(
        job_id=receipt.job_id,
        index=i % 10_000,
        seed=i,
        image=os.urandom(size),
        receipt=receipt,
        signature=b"\x04" * 65,
        meta=RenderMeta(backend="cpu", device="bench", dtype="fp32", threads=1),
    )


def _open(args: argparse.Namespace) -> ResultStore:
    if args.store == "folder":
        return FolderResults(Path(args.dir) / "results")
    if args.store == "sqlite":  # the coordinator's SQLite file (`result_store = "database"`)
        return SqliteResults(Path(args.dir) / "coordinator.db")
    from sogni_coordinator.results.postgres import PostgresResults

    store = PostgresResults(args.url)
    store.open()
    return store


async def _run(args: argparse.Namespace, run: int) -> dict[str, float]:
    writer = await trio.to_thread.run_sync(_open, args)
    reader = await trio.to_thread.run_sync(_open, args)
    rid = run.to_bytes(32, "big")
    images = [_image(i, args.kb * 1024) for i in range(args.images)]
    keys = [ResultKey(rid, i % 10_000, i.to_bytes(32, "big")) for i in range(args.images)]
    started = time.perf_counter()
    for first in range(0, args.images, args.concurrent):
        async with trio.open_nursery() as nursery:
            for i in range(first, min(first + args.concurrent, args.images)):
                nursery.start_soon(writer.put, keys[i], images[i])
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    for key in keys:
        assert await reader.get(key) is not None
    get_s = time.perf_counter() - started
    started = time.perf_counter()
    await trio.to_thread.run_sync(reader.remove, keys)
    remove_s = time.perf_counter() - started
    await trio.to_thread.run_sync(writer.close)
    await trio.to_thread.run_sync(reader.close)
    return {
        "put_per_s": args.images / put_s,
        "get_per_s": args.images / get_s,
        "remove_per_s": args.images / remove_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["folder", "database", "sqlite"], default="folder")
    parser.add_argument(
        "--dir", default=None, help="the folder's or SQLite file's parent (a temp one)"
    )
    parser.add_argument("--url", default="", help="the database store's postgresql:// URL")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--kb", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.store == "database" and not args.url:
        parser.error("--store database needs --url")
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = args.dir or tmp
        runs = [trio.run(_run, args, r + 1) for r in range(args.runs)]
    out: dict[str, object] = {
        "store": args.store,
        "images": args.images,
        "concurrent": args.concurrent,
        "kb": args.kb,
    }
    for name in runs[0]:
        values = sorted(r[name] for r in runs)
        out[name] = round(statistics.median(values), 1)
        out[name + "_range"] = [round(values[0], 1), round(values[-1], 1)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
