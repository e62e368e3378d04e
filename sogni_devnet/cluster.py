"""A local network whose processes can be killed and restarted: the crash matrix and the chaos
soak run on it.

Unlike `start_localnet`, every process here can die (a crash point, SIGKILL from a supervisor)
and come back on the same data: the coordinator listens on a fixed port with a persisted peer
key, so nodes and clients reconnect to the same multiaddr; a node restarts with its journal.
Each (re)start gets its own log file, `logs/<name>.<n>.log`.
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sogni_coordinator.ledger import Ledger
from sogni_devnet.localnet import DEMO_KDF_N, DEMO_PASSWORD, Proc, _base_env, _spawn
from sogni_protocol.crashpoints import CRASHPOINT_ENV
from sogni_wallet.keystore import create_keystore

__all__ = ["Cluster", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _crash_env(crashpoint: str | None, skip: int) -> dict[str, str]:
    if crashpoint is None:
        return {}
    return {CRASHPOINT_ENV: crashpoint, "SOGNI_CRASHPOINT_SKIP": str(skip)}


@dataclass
class Cluster:
    """One coordinator and `nodes` nodes under `workdir`, each restartable."""

    workdir: Path
    models_dir: Path
    nodes: int = 1
    node_env: dict[str, str] = field(default_factory=dict)
    coordinator_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0
    node_command: list[str] = field(
        default_factory=lambda: ["sogni_node.cli", "start", "--announce"]
    )
    """`python -m` arguments of a node: the chaos soak runs `bench._chaos_node` (a stub
    backend) in its place; it reads the same `SOGNI_NODE_*` env and announces `connected`."""
    coordinator: Proc | None = None
    node_procs: dict[int, Proc] = field(default_factory=dict)
    addr: str = ""
    signer: str = ""
    _starts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.env = _base_env("info")
        self.cdir = self.workdir / "coordinator"
        self.signer = create_keystore(
            self.cdir / "signer.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True
        )
        for i in range(self.nodes):
            create_keystore(
                self.node_dir(i) / "wallet.json", DEMO_PASSWORD, kdf_n=DEMO_KDF_N, force=True
            )

    @property
    def database(self) -> Path:
        return self.cdir / "coordinator.db"

    def node_dir(self, i: int) -> Path:
        return self.workdir / f"node{i}"

    def fund(self, payer: str, spark: int) -> None:
        """Credit `payer` with paid Spark in the coordinator's ledger (before it starts)."""
        ledger = Ledger(self.database)
        try:
            ledger.credit_purchase(payer, spark)
        finally:
            ledger.close()

    def _name(self, base: str) -> str:
        n = self._starts.get(base, 0)
        self._starts[base] = n + 1
        return f"{base}.{n}"

    # --- processes ---------------------------------------------------------------------------
    def start_coordinator(self, crashpoint: str | None = None, *, skip: int = 0) -> Proc:
        """Start (or restart, on the same port, key and database) the coordinator."""
        env = {
            **self.env,
            "SOGNI_COORDINATOR_DATA_DIR": str(self.cdir),
            "SOGNI_COORDINATOR_LISTEN": f"/ip4/127.0.0.1/tcp/{self.port}",
            **self.coordinator_env,
            **_crash_env(crashpoint, skip),
        }
        args = ["sogni_coordinator.cli", "start", "--announce"]
        proc = _spawn(self._name("coordinator"), args, env, self.workdir)
        self.coordinator = proc
        ready = proc.wait_event("ready", self.timeout)
        self.addr = next(a for a in ready["addrs"] if f"/tcp/{self.port}/" in a)
        return proc

    def start_node(self, i: int, crashpoint: str | None = None, *, skip: int = 0) -> Proc:
        """Start (or restart, on the same data and journal) node `i`; wait until connected."""
        if not self.addr:
            raise RuntimeError("start the coordinator first: nodes need its address")
        env = {
            **self.env,
            "SOGNI_NODE_DATA_DIR": str(self.node_dir(i)),
            "SOGNI_NODE_MODELS_DIR": str(self.models_dir),
            "SOGNI_NODE_COORDINATORS": self.addr,
            "SOGNI_NODE_TRUSTED_COORDINATORS": self.signer,
            "SOGNI_NODE_THREADS": "1",
            **self.node_env,
            **_crash_env(crashpoint, skip),
        }
        proc = _spawn(self._name(f"node{i}"), list(self.node_command), env, self.workdir)
        self.node_procs[i] = proc
        proc.wait_event("connected", self.timeout)
        return proc

    def kill(self, proc: Proc) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()

    def alive(self) -> bool:
        procs = [self.coordinator, *self.node_procs.values()]
        return all(p is not None and p.popen.poll() is None for p in procs)

    def stop(self) -> None:
        for proc in self.node_procs.values():
            proc.stop()
        if self.coordinator is not None:
            self.coordinator.stop()

    def log_files(self) -> list[Path]:
        return sorted((self.workdir / "logs").glob("*.log"))
