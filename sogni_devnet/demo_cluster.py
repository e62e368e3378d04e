"""`make demo-cluster`: one network of 3 coordinators on one PostgreSQL, 4 nodes, one coordinator
SIGKILLed mid-run, every image delivered exactly once.

What it starts, all on 127.0.0.1 (separate processes, logs in a temp folder): a throwaway
PostgreSQL (`sogni_devnet.pg_cluster`); 3 coordinators sharing its database, one results
folder, one result-URL HMAC key and the list of the network's offer keys
(`network_signers`); 4 nodes that list all 3 coordinators and trust them through the set of
their offer keys signed by the network's operator (`sogni_protocol.signer_set`), not by
key. Three clients (one paying wallet) each send a third of the images to a different
coordinator, naming the other two for failover. After `--kill-after` images, the first
coordinator is SIGKILLed: its client resumes at the next coordinator with its ticket, its
leased jobs go back to the queue when their leases expire, and nodes deliver results kept
for it to another coordinator.

`--result-store database` keeps the result images as rows of the network's PostgreSQL
(`result_store = "database"`) instead of one shared results folder: each coordinator gets a
folder of its own, and the demo checks that no image file was written to any of them.

Writes `<out>/receipts.jsonl` (the `make demo` line format: `sogni_app.api.save_image`) and
the images, checks every receipt with eth-account (a standard EIP-712 library), and prints
one summary line: images delivered, duplicates, coordinators that signed offers. Exit 0 only
if every image arrived once, every receipt verifies and nothing was charged twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from sogni_devnet.cluster import free_port
from sogni_devnet.localnet import (
    DEMO_GUIDANCE,
    DEMO_KDF_N,
    DEMO_MODEL,
    DEMO_PASSWORD,
    Proc,
    _base_env,
    _spawn,
)

__all__ = ["ClusterRun", "main", "run_cluster_demo", "verify_receipts"]

COORDINATORS = 3
NODES = 4
LEASE_SECONDS = 5
"""Short leases: a killed coordinator's jobs are back in the queue within seconds."""
RESULT_STORES = ("folder", "database")
"""`--result-store`: one shared results folder, or the images as rows of the database."""


@dataclass
class ClusterRun:
    """What the demo measured (also what its test asserts)."""

    images: int = 0
    duplicates: int = 0
    signers: list[str] = field(default_factory=list)
    """Coordinators named in the receipts (the offer signers), sorted."""
    problems: list[str] = field(default_factory=list)
    """Receipt lines that do not verify (empty: all do)."""
    killed_after: int = 0
    resumed: list[str] = field(default_factory=list)
    """`clientN at ADDR` for each resume (after a break: the killed coordinator's client)."""
    charged_micro: int = 0
    quoted_micro: int = 0
    seconds: float = 0.0
    result_store: str = "folder"
    image_files: int = 0
    """`.jobimage` files the coordinators wrote (none may exist with the database store)."""
    rows_left: int = 0
    """Result images still in the database at the end (acknowledged ones are deleted)."""
    forwarded: dict[str, int] = field(default_factory=dict)
    """Nodes' `forwarded_result_accepted` / `_refused` lines: results kept for the killed
    coordinator and delivered to another (timing decides whether any is)."""

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.duplicates == 0
            and self.charged_micro <= self.quoted_micro
            and (self.result_store != "database" or self.image_files == 0)
        )


def verify_receipts(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every line of `<out>/receipts.jsonl` checked with eth-account, as `make demo`'s test
    does: the signature recovers the worker, the image's sha256 is the `resultHash`. Returns
    the lines and one problem per line that fails."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    lines = [json.loads(x) for x in (out / "receipts.jsonl").read_text().splitlines() if x.strip()]
    problems: list[str] = []
    for line in lines:
        typed = {k: line[k] for k in ("domain", "types", "primaryType", "message")}
        signer = Account.recover_message(
            encode_typed_data(full_message=typed), signature=line["signature"]
        )
        image = (out / line["image"]).read_bytes()
        if signer != line["message"]["worker"]:
            problems.append(f"{line['image']}: signed by {signer}, not its worker")
        elif line["message"]["resultHash"] != "0x" + hashlib.sha256(image).hexdigest():
            problems.append(f"{line['image']}: the image is not the one its receipt names")
    return lines, problems


def _signer_set(path: Path, signers: list[str], network_id: str) -> str:
    """Sign the network's set of offer keys with a fresh operator key; its address."""
    from eth_account import Account

    from sogni_app.api import DEFAULT_DOMAIN
    from sogni_protocol.signer_set import NetworkSignerSet, encode_signer_set, sign_signer_set

    operator = Account.create()
    unsigned = NetworkSignerSet(
        network_id=network_id, serial=1, signers=signers, issued_at=int(time.time())
    )
    signed = sign_signer_set(bytes(operator.key), DEFAULT_DOMAIN, unsigned)
    path.write_bytes(encode_signer_set(signed))
    return str(operator.address)


def _spread(images: int, parts: int) -> list[int]:
    return [images // parts + (1 if i < images % parts else 0) for i in range(parts)]


def run_cluster_demo(
    images: int,
    out: Path,
    *,
    kill_after: int = 4,
    prompt: str = "a red circle on a blue background",
    deadline: float = 150.0,
    result_store: str = "folder",
) -> ClusterRun:
    """Start everything, render, kill, collect, verify; stop everything. Raises on a failure
    to start (naming the log to read)."""
    from eth_account import Account

    from sogni_app.api import RenderedImage, ResumeTicket, render, save_image
    from sogni_coordinator.ledger import Ledger
    from sogni_devnet.pg_cluster import start_cluster
    from sogni_protocol.messages import DEFAULT_NETWORK_ID, RenderRequest
    from sogni_wallet.keystore import create_keystore

    out.mkdir(parents=True, exist_ok=True)
    (out / "receipts.jsonl").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sogni-cluster-"))
    cache = Path(os.environ.get("SOGNI_CACHE", ".cache")).resolve()
    if result_store not in RESULT_STORES:
        raise ValueError(f"result store {result_store!r}: choose one of {', '.join(RESULT_STORES)}")
    run = ClusterRun(result_store=result_store)
    from sogni_app.api import quiet_unconfigured_logging

    quiet_unconfigured_logging()  # the launcher's own lines only (keystores, the host)
    print(
        f"starting PostgreSQL, {COORDINATORS} coordinators ({result_store} result store), "
        f"{NODES} nodes (logs in {work}/logs)"
    )
    pg = start_cluster(owner_pid=os.getpid())  # its own temp folder (postgres must reach it)
    procs: list[Proc] = []
    try:
        url = pg.create_database("sogni")
        env = _base_env("info")
        shared = work / "shared"
        shared.mkdir()
        keys = [
            create_keystore(
                work / f"coordinator{i}" / "signer.json",
                DEMO_PASSWORD,
                kdf_n=DEMO_KDF_N,
                force=True,
            )
            for i in range(COORDINATORS)
        ]
        set_file = shared / "network_signers.json"
        operator = _signer_set(set_file, keys, DEFAULT_NETWORK_ID)
        ports = [free_port() for _ in range(COORDINATORS)]
        coordinators: list[Proc] = []
        for i in range(COORDINATORS):
            cdir = work / f"coordinator{i}"
            (cdir / "network_signers.json").write_bytes(set_file.read_bytes())  # served
            cenv = {
                **env,
                "SOGNI_COORDINATOR_DATA_DIR": str(cdir),
                "SOGNI_COORDINATOR_LISTEN": f"/ip4/127.0.0.1/tcp/{ports[i]}",
                "SOGNI_COORDINATOR_DATABASE": url,
                # one folder for the network, or one each beside the images in the database
                "SOGNI_COORDINATOR_RESULTS_DIR": str(
                    shared / "results" if result_store == "folder" else cdir / "results"
                ),
                "SOGNI_COORDINATOR_RESULT_STORE": result_store,
                "SOGNI_COORDINATOR_RESULT_URL_KEY_FILE": str(shared / "result-url.key"),
                "SOGNI_COORDINATOR_NETWORK_SIGNERS": ",".join(keys),
                "SOGNI_COORDINATOR_LEASE_SECONDS": str(LEASE_SECONDS),
                "SOGNI_COORDINATOR_HEARTBEAT_INTERVAL": "1",
                "SOGNI_COORDINATOR_HEARTBEAT_TIMEOUT": "4",
            }
            proc = _spawn(
                f"coordinator{i}", ["sogni_coordinator.cli", "start", "--announce"], cenv, work
            )
            procs.append(proc)
            coordinators.append(proc)
        addrs = []
        for i, proc in enumerate(coordinators):
            ready = proc.wait_event("ready", 120)
            addrs.append(next(a for a in ready["addrs"] if f"/tcp/{ports[i]}/" in a))
        for i in range(NODES):
            ndir = work / f"node{i}"
            create_keystore(ndir / "wallet.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True)
            nenv = {
                **env,
                "SOGNI_NODE_DATA_DIR": str(ndir),
                "SOGNI_NODE_MODELS_DIR": str(cache / "models"),
                "SOGNI_NODE_COORDINATORS": ",".join(addrs),
                "SOGNI_NODE_TRUSTED_COORDINATORS": "",
                "SOGNI_NODE_NETWORK_OPERATORS": operator,
                "SOGNI_NODE_NETWORK_SIGNERS_FILE": str(set_file),
                "SOGNI_NODE_FORWARD_RESULTS_AFTER": "2",
                "SOGNI_NODE_HEARTBEAT_INTERVAL": "1",
                "SOGNI_NODE_HEARTBEAT_TIMEOUT": "4",
                "SOGNI_NODE_THREADS": "1",
            }
            procs.append(_spawn(f"node{i}", ["sogni_node.cli", "start", "--announce"], nenv, work))
        for proc in procs[COORDINATORS:]:
            proc.wait_event("connected", 180, nth=COORDINATORS)  # one per coordinator
        payer = Account.create()
        ledger = Ledger(url)
        try:
            ledger.credit_purchase(payer.address, max(1, images))
            before = _spendable(ledger, payer.address)
        finally:
            ledger.close()
        print(f"coordinators {', '.join(keys)}; nodes trust them via operator {operator}")

        counts = _spread(images, COORDINATORS)
        delivered: list[int] = [0]
        seen_jobs: dict[bytes, int] = {}
        tickets: dict[int, ResumeTicket] = {}
        victim = coordinators[0]

        def on_image(client: int, image: RenderedImage) -> None:
            seen_jobs[image.job_id] = seen_jobs.get(image.job_id, 0) + 1
            save_image(tickets[client].request_id, image, out)
            delivered[0] += 1
            if delivered[0] >= kill_after and not run.killed_after:
                victim.popen.send_signal(signal.SIGKILL)
                run.killed_after = delivered[0]
                print(f"SIGKILL coordinator0 after {delivered[0]} images")

        async def client(i: int, quoted: list[int]) -> None:
            order = [addrs[(i + k) % COORDINATORS] for k in range(COORDINATORS)]
            request = RenderRequest(
                model_id=DEMO_MODEL,
                positive_prompt=prompt,
                seed=100 * i,
                width=64,
                height=64,
                steps=8,
                guidance=DEMO_GUIDANCE,
                number_of_images=counts[i],
            )
            result = await render(
                order,
                request,
                payer_key=bytes(payer.key),
                on_accepted=lambda t: tickets.__setitem__(i, t),
                on_image=lambda im: on_image(i, im),
                reconnect_for=90.0,
                idle_timeout=120.0,
                on_resumed=lambda addr: run.resumed.append(f"client{i} at {addr}"),
            )
            quoted.append(result.cost_micro)

        async def all_clients() -> list[int]:
            quoted: list[int] = []
            try:
                with trio.fail_after(deadline):  # then everything is stopped, one line said
                    async with trio.open_nursery() as nursery:
                        for i in range(COORDINATORS):
                            if counts[i]:
                                nursery.start_soon(client, i, quoted)
            except trio.TooSlowError:
                raise TimeoutError(
                    f"{delivered[0]} of {images} images within {deadline:.0f} s; see {work}/logs"
                ) from None
            return quoted

        started = time.monotonic()
        quoted = trio.run(all_clients)
        run.seconds = time.monotonic() - started
        run.quoted_micro = sum(quoted)
        run.duplicates = sum(n - 1 for n in seen_jobs.values()) + _db_duplicates(url)
        lines, run.problems = verify_receipts(out)
        run.images = len({line["message"]["jobId"] for line in lines})
        run.duplicates += len(lines) - run.images
        run.signers = sorted({line["message"]["coordinator"] for line in lines})
        ledger = Ledger(url)
        try:
            run.charged_micro = before - _spendable(ledger, payer.address)
        finally:
            ledger.close()
        run.image_files = sum(1 for _ in work.rglob("*.jobimage"))
        run.forwarded = _forwarded(work / "logs")
        if result_store == "database":
            run.rows_left = _db_count(url, "result_images")
    finally:
        for proc in reversed(procs):
            proc.stop()
        pg.stop()
    return run


def _spendable(ledger: Any, payer: str) -> int:
    """Paid Spark the payer still has, held reservations included (not yet spent)."""
    return int(ledger.balance(payer)["spark_paid"] + ledger.reserved_for(payer)["spark_paid"])


def _forwarded(logs: Path) -> dict[str, int]:
    """Count the nodes' forwarding outcomes in their JSON log lines."""
    counts = {"accepted": 0, "refused": 0}
    for log_file in logs.glob("node*.log"):
        for line in log_file.read_text(errors="replace").splitlines():
            for outcome in counts:
                if f'"forwarded_result_{outcome}"' in line:
                    counts[outcome] += 1
    return counts


def _db_count(url: str, table: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # a fixed name
    return int(row[0]) if row else 0


def _db_duplicates(url: str) -> int:
    """Jobs with more than one receipt in the shared database (its primary key allows none)."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) - count(DISTINCT job_id) FROM receipts").fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("out-cluster"))
    parser.add_argument("--kill-after", type=int, default=4, help="images before the SIGKILL")
    parser.add_argument(
        "--deadline", type=float, default=150.0, help="seconds for the clients, after start-up"
    )
    parser.add_argument(
        "--result-store",
        choices=RESULT_STORES,
        default="folder",
        help="one shared results folder (default) or the images as rows of the database",
    )
    args = parser.parse_args(argv)
    from sogni_devnet.pg_cluster import PgClusterError

    try:
        run = run_cluster_demo(
            args.images,
            args.out,
            kill_after=args.kill_after,
            deadline=args.deadline,
            result_store=args.result_store,
        )
    except (PgClusterError, RuntimeError, TimeoutError, OSError) as exc:  # one line, no trace
        print(f"error: {exc}")
        return 1
    for resumed in run.resumed:
        print(f"resumed: {resumed}")
    if run.problems:
        print("receipts that do not verify: " + "; ".join(run.problems[:5]))
    if run.forwarded:
        print(
            f"results nodes kept for coordinator0 and delivered to another: "
            f"{run.forwarded['accepted']} accepted, {run.forwarded['refused']} refused"
        )
    if run.result_store == "database":
        print(
            f"result store: database ({run.rows_left} images left unacknowledged there, "
            f"{run.image_files} image files written)"
        )
    print(
        f"charged {run.charged_micro / 1e6:.6f} Spark for a quote of "
        f"{run.quoted_micro / 1e6:.6f} ({run.seconds:.1f} s)"
    )
    print(
        f"{run.images} of {args.images} images delivered, {run.duplicates} duplicates, "
        f"{len(run.signers)} coordinators signed offers ({', '.join(run.signers)}); "
        f"every receipt verifies: {'yes' if not run.problems else 'NO'}"
    )
    return 0 if run.ok and run.images == args.images else 1


if __name__ == "__main__":
    raise SystemExit(main())
