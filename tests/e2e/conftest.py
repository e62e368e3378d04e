"""An in-process Supernet on 127.0.0.1: real libp2p, real diffusers, real SQLite.

Coordinator and nodes run as trio tasks in the test's nursery (the multi-process layout is
covered by the privacy test, which uses the launcher). Rogue peers speak the wire protocol
directly to show what the coordinator and the nodes refuse.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from eth_account import Account

from sogni_chain.anvil import Anvil, find_anvil
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator
from sogni_net import Channel, Host, open_host
from sogni_node.config import NodeConfig
from sogni_node.daemon import ShutdownReport, run_node
from sogni_node.models import ModelRegistry
from sogni_node.models.defaults import default_registry
from sogni_node.render.backend import Backend, RenderJob, RenderOutput
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CONTROL_FRAME_LIMIT, JOBS_PROTOCOL
from sogni_protocol.messages import Capabilities, NodeHello, RenderRequest, Welcome
from sogni_wallet.keystore import Wallet

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from sogni_chain import Chain, Deployment

MODEL = "sogni-tiny-sd"


def tiny_request(n: int = 2, **kw: Any) -> RenderRequest:
    """A small request for the tiny model (3 steps, 64x64); `kw` overrides any field."""
    fields: dict[str, Any] = {
        "model_id": MODEL,
        "positive_prompt": "a red circle",
        "steps": 3,
        "guidance": 4.0,
        "width": 64,
        "height": 64,
        "seed": 1,
        "number_of_images": n,
    }
    fields.update(kw)
    return RenderRequest(**fields)


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    """A fresh anvil per test module (chain tests assume their own deployments)."""
    if find_anvil() is None:
        pytest.skip("anvil binary not installed (npm ci --prefix contracts)")
    with Anvil() as node:
        yield node


def deploy_for_coordinator(
    url: str, path: Path, **deploy: Any
) -> tuple[Chain, LocalAccount, LocalAccount, Deployment]:
    """The contracts deployed on the chain at ``url`` (addresses written to ``path``) for a
    coordinator whose fresh offer key ``signer`` settles, funded with 1 ETH for gas; the
    treasury is the chain's first account. ``deploy``: more `deploy_all` settings."""
    from sogni_chain import Addresses, Deployment, connect, deploy_all

    chain = connect(url)
    treasury = chain.accounts[0]
    signer = Account.create()
    chain.send_eth(signer.address, 10**18, sender=treasury)
    deploy_all(
        chain, treasury, coordinator=signer.address, distributor_funding=10**24, path=path, **deploy
    )
    return chain, treasury, signer, Deployment(chain, Addresses.load(path), treasury)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return default_registry(tmp_path_factory.mktemp("models"), test_model=True)


@pytest.fixture(scope="session")
def backend(registry: ModelRegistry) -> DiffusersBackend:
    return DiffusersBackend(registry, device="cpu", threads=1)


class SlowBackend:
    """The real backend, throttled per step so a test can act while a job is mid-render."""

    def __init__(self, inner: Backend, step_seconds: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.supports_loras = inner.supports_loras
        self.step_seconds = step_seconds
        self.started = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        self._token.run_sync_soon(self.started.set)

        def step(i: int) -> None:
            time.sleep(self.step_seconds)
            on_step(i)

        return self.inner.render(job, step, should_cancel)

    def close(self) -> None:
        pass


class CountingSlowBackend(SlowBackend):
    """`SlowBackend` that counts renders and says when the `nth` one starts."""

    def __init__(self, inner: Backend, step_seconds: float, nth: int) -> None:
        super().__init__(inner, step_seconds)
        self.calls = 0
        self.nth_started = trio.Event()
        self._nth = nth

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        self.calls += 1
        if self.calls == self._nth:
            self._token.run_sync_soon(self.nth_started.set)
        return super().render(job, on_step, should_cancel)


def free_port() -> int:
    """A free port on 127.0.0.1, for a daemon that must listen on the same address twice
    (across a restart: its peers dial the same address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], bool], seconds: float) -> None:
    """Wait for `condition`, failing after `seconds`."""
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.05)


@dataclass
class NodeHandle:
    wallet: Wallet
    stop: trio.Event
    connected: trio.Event
    report: list[ShutdownReport]
    done: trio.Event
    http: str | None = None
    """The node's HTTP listener URL (port 0 in tests), from its `ready` announcement."""


@dataclass
class Net:
    tmp: Path
    nursery: trio.Nursery
    coordinator: RunningCoordinator
    signer: Signer
    config: CoordinatorConfig

    @property
    def addr(self) -> str:
        return self.coordinator.addrs[0]

    @property
    def domain(self) -> Domain:
        return Domain(self.config.chain_id, self.config.verifying_contract)

    async def add_node(
        self, backend: Backend, name: str, *, trusted: list[str] | None = None, **cfg: Any
    ) -> NodeHandle:
        acct = Account.create()
        wallet = Wallet(acct.address, bytes(acct.key))
        settings: dict[str, Any] = {
            "threads": 1,
            "heartbeat_interval": 0.5,
            "heartbeat_timeout": 3.0,
            "http_listen": "127.0.0.1:0",  # a free port: tests run side by side
            **cfg,
        }
        config = NodeConfig(
            data_dir=self.tmp / name,
            coordinators=[self.addr],
            trusted_coordinators=trusted if trusted is not None else [self.signer.address],
            **settings,
        )
        handle = NodeHandle(wallet, trio.Event(), trio.Event(), [], trio.Event())

        def on_event(event: dict[str, object]) -> None:
            if event["event"] == "ready":
                url = event.get("http")
                handle.http = url if isinstance(url, str) else None
            elif event["event"] == "connected":
                handle.connected.set()

        async def run() -> None:
            try:
                handle.report.append(
                    await run_node(
                        config, wallet, backend, [MODEL], stop=handle.stop, on_event=on_event
                    )
                )
            finally:
                handle.done.set()

        self.nursery.start_soon(run)
        if trusted is None:
            with trio.fail_after(20):
                await handle.connected.wait()
        return handle


@asynccontextmanager
async def start_net(
    tmp: Path, *, signer_key: bytes | None = None, **cfg: Any
) -> AsyncIterator[Net]:
    acct = Account.from_key(signer_key) if signer_key else Account.create()
    signer = Signer(acct.address, bytes(acct.key))
    settings: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 3.0,
        "http_listen": "127.0.0.1:0",  # a free port: tests run side by side
        **cfg,
    }
    config = CoordinatorConfig(
        data_dir=tmp / "coordinator", listen="/ip4/127.0.0.1/tcp/0", **settings
    )
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_coordinator, config, signer)
        yield Net(tmp, nursery, running, signer, config)
        nursery.cancel_scope.cancel()


@pytest.fixture
def net_factory(tmp_path: Path) -> Callable[..., Any]:
    def make(**cfg: Any) -> Any:
        return start_net(tmp_path, **cfg)

    return make


async def send_node_hello(
    host: Host, net: Net, acct: Any, models: tuple[str, ...] = (MODEL,)
) -> Channel:
    """Open a jobs stream from ``host`` and send ``acct``'s signed `NodeHello` (one slot, CPU);
    what the coordinator answers is the caller's to read."""
    channel = await host.open_channel(net.addr, JOBS_PROTOCOL)
    caps = Capabilities(
        peer_id=host.peer_id,
        wallet=acct.address,
        expiry=int(time.time()) + 600,
        models=list(models),
        slots=1,
        backend="rogue",
        device="cpu",
        max_pixels=1 << 20,
    )
    sig = eip712.sign_binding(bytes(acct.key), net.domain, caps)
    await channel.send(NodeHello(capabilities=caps, binding_signature=sig))
    return channel


@asynccontextmanager
async def rogue_node(
    net: Net, *, wallet: Any = None, models: tuple[str, ...] = (MODEL,)
) -> AsyncIterator[tuple[Channel, Any]]:
    """A node that completes the handshake and then does whatever the test says."""
    acct = wallet or Account.create()
    async with open_host(key_path=None, listen=()) as host:
        channel = await send_node_hello(host, net, acct, models)
        welcome = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(welcome, Welcome)
        yield channel, acct


async def receive_skipping(
    channel: Channel,
    kinds: tuple[type, ...],
    timeout: float = 20.0,
    limit: int = CONTROL_FRAME_LIMIT,
) -> Any:
    """Next message that is one of `kinds`, skipping heartbeats and progress."""
    with trio.fail_after(timeout):
        while True:
            msg = await channel.receive(limit=limit, timeout=timeout)
            if isinstance(msg, kinds):
                return msg


Waiter = Callable[[], Awaitable[None]]


async def run_sogni(home: Path, *args: str, password: str | None = None) -> tuple[int, str, str]:
    """Run the `sogni` CLI as a user would: its own process and HOME, no stray `SOGNI_*`
    defaults from the test environment; `password` for the payer keystore."""
    env = {**os.environ, "HOME": str(home)}
    for name in ("SOGNI_COORDINATOR_ADDR", "SOGNI_KEYSTORE", "SOGNI_CHAIN_ID"):
        env.pop(name, None)
    if password is not None:
        env["SOGNI_PASSWORD"] = password
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "sogni_app.cli", *args],
            env=env,
            cwd=home,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()
