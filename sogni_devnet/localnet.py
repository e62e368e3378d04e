"""A whole Supernet on 127.0.0.1: one coordinator and N nodes as separate processes.

`make demo` runs `python -m sogni_devnet.localnet --images 8 --out out`; tests and benchmarks
use `LocalNet` directly. Each process logs (JSON lines) to its own file under the work
folder, so a test can read every line that every process wrote. Readiness is never guessed:
each daemon prints one JSON line per event on stdout (`ready`, `connected`) and the launcher
reads them with a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from sogni_wallet.keystore import create_keystore

DEMO_PASSWORD = "localnet-demo-password"
DEMO_KDF_N = 2**14
DEMO_MODEL = "sogni-shapes-64"  # the trained embedded default: follows colour prompts
DEMO_STEPS = 8
DEMO_GUIDANCE = 5.0
"""The model's own default (sogni_node.models.registry.SHAPES_DEFAULT_GUIDANCE), as
`sogni render` asks for it."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        # A thread reads stdout line by line: select() on a buffered pipe misses lines that
        # were read ahead into the buffer.
        threading.Thread(target=self._pump, name=f"{self.name}-stdout", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def seen(self, event: str) -> int:
        """How many times this process has announced `event` so far (without waiting)."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return sum(1 for e in self.events if e.get("event") == event)

    def wait_event(self, event: str, timeout: float, *, nth: int = 1) -> dict[str, Any]:
        """Wait until this process announces `event` on stdout for the `nth` time (or dies, or
        times out): a node says `connected` again after each reconnect."""
        count = 0
        for seen in self.events:
            if seen.get("event") == event:
                count += 1
                if count == nth:
                    return seen
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"{self.name} did not report {event!r} within {timeout:.0f} s; "
                    f"see {self.log_path}"
                ) from None
            if line is None:
                self._lines.put(None)
                raise RuntimeError(
                    f"{self.name} exited (code {self.popen.wait()}) before {event!r}; "
                    f"see {self.log_path}"
                )
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(msg)
            if msg.get("event") == event:
                count += 1
                if count == nth:
                    return msg

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


@dataclass
class LocalNet:
    workdir: Path
    coordinator: Proc
    nodes: list[Proc]
    coordinator_addr: str

    def log_files(self) -> list[Path]:
        return [self.coordinator.log_path, *(n.log_path for n in self.nodes)]


def _spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Proc:
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("w")
    popen = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        text=True,
        cwd=workdir,
    )
    log_file.close()
    return Proc(name, popen, log_path)


def _base_env(log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    env["SOGNI_NODE_PASSWORD"] = DEMO_PASSWORD
    env["SOGNI_COORDINATOR_PASSWORD"] = DEMO_PASSWORD
    env["SOGNI_NODE_LOG_LEVEL"] = log_level
    env["SOGNI_COORDINATOR_LOG_LEVEL"] = log_level
    env["SOGNI_NODE_LOG_JSON"] = "true"
    env["SOGNI_COORDINATOR_LOG_JSON"] = "true"
    # Free ports for the HTTP listeners: several daemons (and test runs) share one machine.
    # Each daemon's `http_started` log event names its URL.
    env["SOGNI_NODE_HTTP_LISTEN"] = "127.0.0.1:0"
    env["SOGNI_COORDINATOR_HTTP_LISTEN"] = "127.0.0.1:0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextmanager
def start_localnet(
    workdir: Path,
    *,
    nodes: int = 2,
    log_level: str = "info",
    models_dir: Path | None = None,
    node_env: dict[str, str] | None = None,
    coordinator_env: dict[str, str] | None = None,
    addresses_file: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[LocalNet]:
    """Start a coordinator and `nodes` nodes, wait until every node is connected, then yield."""
    workdir.mkdir(parents=True, exist_ok=True)
    models_dir = models_dir or workdir / "models"
    env = _base_env(log_level)
    if addresses_file is not None:  # receipts bound to the deployed reward distributor
        env["SOGNI_COORDINATOR_ADDRESSES_FILE"] = str(addresses_file)
        env["SOGNI_NODE_ADDRESSES_FILE"] = str(addresses_file)
    cdir = workdir / "coordinator"
    signer = create_keystore(cdir / "signer.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True)
    cenv = {
        **env,
        "SOGNI_COORDINATOR_DATA_DIR": str(cdir),
        "SOGNI_COORDINATOR_LISTEN": "/ip4/127.0.0.1/tcp/0",
        **(coordinator_env or {}),
    }
    procs: list[Proc] = []
    try:
        coordinator = _spawn(
            "coordinator", ["sogni_coordinator.cli", "start", "--announce"], cenv, workdir
        )
        procs.append(coordinator)
        ready = coordinator.wait_event("ready", timeout)
        addr = str(ready["addrs"][0])
        node_procs = []
        for i in range(nodes):
            ndir = workdir / f"node{i}"
            create_keystore(ndir / "wallet.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True)
            nenv = {
                **env,
                "SOGNI_NODE_DATA_DIR": str(ndir),
                "SOGNI_NODE_MODELS_DIR": str(models_dir),
                "SOGNI_NODE_COORDINATORS": addr,
                "SOGNI_NODE_TRUSTED_COORDINATORS": signer,
                "SOGNI_NODE_THREADS": "1",
                **(node_env or {}),
            }
            proc = _spawn(f"node{i}", ["sogni_node.cli", "start", "--announce"], nenv, workdir)
            procs.append(proc)
            node_procs.append(proc)
        for proc in node_procs:
            proc.wait_event("connected", timeout)
        yield LocalNet(workdir, coordinator, node_procs, addr)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _credited_payer(database: Path, images: int) -> LocalAccount:
    """A fresh payer wallet with bought Spark in the coordinator's ledger (what a card
    purchase does), so the demo's requests are paid and its epoch pays the nodes."""
    from sogni_coordinator.ledger import Ledger

    payer: LocalAccount = Account.create()
    ledger = Ledger(database)
    try:
        ledger.credit_purchase(payer.address, max(1, images))
    finally:
        ledger.close()
    return payer


def _copy_verifications(log: Path, out: Path) -> list[dict[str, object]]:
    """Copy the coordinator's check log to `out/verifications.jsonl`; its lines."""
    target = out / "verifications.jsonl"
    target.unlink(missing_ok=True)
    if not log.exists():
        return []
    shutil.copyfile(log, target)
    return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]


def _demo(images: int, out: Path, prompt: str, model: str) -> int:
    from sogni_app.api import render_sync, save
    from sogni_app.cli import charged_micro, cost_summary
    from sogni_devnet.settlement_demo import embedded_deployment, settle_and_claim
    from sogni_protocol.eip712 import Domain
    from sogni_protocol.messages import RenderRequest
    from sogni_wallet.keystore import load_wallet

    out.mkdir(parents=True, exist_ok=True)
    (out / "receipts.jsonl").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sogni-localnet-"))
    cache = Path(os.environ.get("SOGNI_CACHE", ".cache")).resolve()
    print("deploying SOGNI token, staking, licence and reward distributor on the embedded EVM")
    deployment = embedded_deployment(work / "addresses.json")
    print(f"starting a coordinator and 2 nodes on 127.0.0.1 (logs in {work}/logs)")
    # every receipt is checked: each node re-runs a step of the other's (two wallets)
    verify_all = {"SOGNI_COORDINATOR_VERIFICATION__RATE": "1"}
    with start_localnet(
        work,
        nodes=2,
        models_dir=cache / "models",
        addresses_file=work / "addresses.json",
        coordinator_env=verify_all,
    ) as net:
        print(f"coordinator {net.coordinator_addr}")
        payer = _credited_payer(work / "coordinator" / "coordinator.db", images)
        request = RenderRequest(
            model_id=model,
            positive_prompt=prompt,
            seed=42,
            width=64,
            height=64,
            steps=DEMO_STEPS,
            guidance=DEMO_GUIDANCE,
            number_of_images=images,
        )
        domain = Domain(deployment.addresses.chain_id, deployment.addresses.distributor)
        result = render_sync(
            net.coordinator_addr, request, payer_key=bytes(payer.key), domain=domain
        )
        paths = save(result, out)
        workers = {im.receipt.worker for im in result.images}
        print(f"{len(paths)} images from {len(workers)} nodes in {out}/ (receipts.jsonl)")
        charged = charged_micro(result, images, DEMO_STEPS)
        print(f"  paid by {payer.address}: {cost_summary(result.cost_micro, charged, 'Spark')}")
        keys = [
            load_wallet(work / f"node{i}" / "wallet.json", DEMO_PASSWORD).private_key
            for i in range(2)
        ]
        settled = settle_and_claim(work / "coordinator" / "coordinator.db", deployment, keys)
    checks = _copy_verifications(work / "coordinator" / "verifications.jsonl", out)
    passed = sum(c.get("verdict") == "pass" for c in checks)
    print(f"{passed} of {len(checks)} receipt checks passed (re-run on the other node; see")
    print(f"  {out}/verifications.jsonl)")
    published = out / "epochs"
    shutil.rmtree(published, ignore_errors=True)
    epoch = settled.epoch
    if epoch is None:  # nothing rendered: the coordinator published no epoch folder
        print(f"no epoch closed: no receipts to settle (see the logs in {work}/logs)")
        return 1
    shutil.copytree(work / "coordinator" / "epochs", published)
    print(
        f"epoch {epoch.epoch} settled on chain: root 0x{epoch.root.hex()[:16]}..., "
        f"{epoch.paid_receipts} receipts, batch {epoch.receipts_file}"
    )
    print(
        f"  published epochs copied to {published}/ (check: sogni-coordinator epoch audit "
        f"--published {published})"
    )
    for address, amount in settled.claimed.items():
        balance = deployment.token.balance_of(address)
        print(
            f"  node {address} claimed {amount / 10**18:.6f} SOGNI "
            f"(wallet now holds {balance / 10**18:.6f} SOGNI)"
        )
    claimed_by_all = all(v > 0 for v in settled.claimed.values())
    return 0 if len(paths) == images and claimed_by_all else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--model", default=DEMO_MODEL)
    args = parser.parse_args(argv)
    return _demo(args.images, args.out, args.prompt, args.model)


if __name__ == "__main__":
    raise SystemExit(main())
