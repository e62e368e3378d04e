"""A real `Dispatcher` on a real SQLite store, without libp2p: nodes are memory channels.

Time is a fake clock the test advances; matching and sweeping run when the test calls
`match()` / `sweep()`, so nothing depends on sleeps. The group commit task runs in the
test's nursery, so `accept_result` commits receipts exactly as in production.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from PIL import Image

from sogni_coordinator.billing import Billing
from sogni_coordinator.dispatch import Dispatcher, Resumed, Submission
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.results import SqliteResults
from sogni_coordinator.routing import Router
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_net import ChannelClosed
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Cancel,
    Capabilities,
    Message,
    Offer,
    Receipt,
    RenderMeta,
    RenderRequest,
    RequestDone,
    Result,
    decode,
    encode,
)

MODEL = "sogni-tiny-sd"
DOMAIN = Domain(8453, "0x" + "42" * 20)
SIGNER = Account.from_key(b"\x05" * 32)


@functools.lru_cache(maxsize=8)
def _png(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
"""A real 64x64 PNG: every delivered image must decode at the job's size."""
FLOOR = 10.0
"""Deadline floor: every test job (64x64, few steps) gets exactly this budget."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def request(n: int = 1, **kw: Any) -> RenderRequest:
    fields: dict[str, Any] = {
        "model_id": MODEL,
        "positive_prompt": "a red circle",
        "steps": 10,
        "guidance": 4.0,
        "width": 64,
        "height": 64,
        "seed": 1,
        "number_of_images": n,
    }
    return RenderRequest(**(fields | kw))


@dataclass
class FakeNode:
    """A node as the dispatcher sees it: a link, and the outbox's other end."""

    link: NodeLink
    key: bytes
    inbox: trio.MemoryReceiveChannel[Message]
    seen: list[Message] = field(default_factory=list)
    clock: Callable[[], float] = lambda: 1_700_000_000.0
    """The coordinator's: a receipt's `completed_at` is its time (a render just finished)."""

    @property
    def wallet(self) -> str:
        return self.link.wallet

    def drain(self) -> list[Message]:
        """Everything the dispatcher sent since the last call."""
        out = []
        while True:
            try:
                out.append(self.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self.seen.extend(out)
        return out

    def offers(self) -> list[Offer]:
        return [m for m in self.drain() if isinstance(m, Offer)]

    def cancels(self) -> list[Cancel]:
        self.drain()
        return [m for m in self.seen if isinstance(m, Cancel)]

    def result(
        self,
        offer: Offer,
        *,
        steps_done: int | None = None,
        image: bytes = PNG,
        completed_at: int | None = None,
    ) -> Result:
        """A correctly signed result; `steps_done` below the job's steps: a partial one;
        `completed_at` (default: now) long before the offer: a result kept from before."""
        o = offer.offer
        done = o.steps if steps_done is None else steps_done
        if done < o.steps and image is PNG:
            image = b""
        elif image is PNG:
            image = _png(o.width, o.height)  # the job's size
        receipt = Receipt(
            job_id=o.job_id,
            offer_hash=eip712.offer_hash(DOMAIN, o),
            worker=self.wallet,
            coordinator=o.coordinator,
            model_id=o.model_id,
            result_hash=hashlib.sha256(image).digest(),
            steps_done=done,
            work_units=o.work_units * done // o.steps,
            completed_at=int(self.clock()) if completed_at is None else completed_at,
            price_factor_bps=o.price_factor_bps,
        )
        return Result(
            job_id=o.job_id,
            image=image,
            receipt=receipt,
            signature=eip712.sign_receipt(self.key, DOMAIN, receipt),
            meta=RenderMeta(backend="test", device="cpu", dtype="fp32", threads=1),
        )


class Harness:
    def __init__(
        self,
        path: Path | str,
        nursery: trio.Nursery,
        *,
        billing: bool = False,
        verification: VerificationConfig | None = None,
        folder: Path | None = None,
        results: str = "folder",
    ) -> None:
        self.path = path
        self.results = results
        """Where images wait: "folder" (beside the database) or "database" (a SQLite
        file's own rows: `SqliteResults`)."""
        """The database: a SQLite file, or a PostgreSQL URL (then `folder` is needed)."""
        self.folder = folder if folder is not None else Path(path).parent
        """Results and the verification log (beside a SQLite database by default)."""
        self.verification = verification
        """`[verification]` policy (None: off); checks log to `verifications.jsonl` beside
        the database."""
        self.nursery = nursery
        self.clock = FakeClock()
        self.store = Store(path)
        self.reputation = Reputation(path, clock=self.clock)
        self.ledger = Ledger(path) if billing else None
        self._start()

    def _start(self) -> None:
        """A dispatcher, and its group commit task (the rest of `run` the test drives)."""
        self.dispatcher = self._dispatcher()
        _RUNNING.add(self)
        self._commits = scope = trio.CancelScope()
        receipts = self.dispatcher.receipts

        checks = self.dispatcher.checks

        async def commit_receipts() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(checks.run)  # held receipts' check tasks (`checks.py`)
                    await receipts.run()

        self.nursery.start_soon(commit_receipts)

    def _dispatcher_type(self) -> Callable[..., Dispatcher]:
        """What `_dispatcher` builds (the service's metered one: `metrics.metered`)."""
        return Dispatcher

    def _dispatcher(self) -> Dispatcher:
        router = Router(self.reputation, rng=random.Random(7), clock=self.clock)
        return self._dispatcher_type()(
            self.store,
            signer_key=bytes(SIGNER.key),
            signer_address=SIGNER.address,
            domain=DOMAIN,
            router=router,
            deadline_floor=FLOOR,
            deadline_base=0.0,
            clock=self.clock,
            billing=None if self.ledger is None else Billing(self.ledger, DOMAIN),
            verification=self.verification,
            verification_log=self.folder / "verifications.jsonl",
            results_dir=self.folder / "results",
            results=SqliteResults(self.path) if self.results == "database" else None,
        )

    def restart(self) -> None:
        """Stop and start the coordinator on the same database (nodes and clients gone)."""
        self.close()
        self.store = Store(self.path)
        self.reputation = Reputation(self.path, clock=self.clock)
        self.ledger = None if self.ledger is None else Ledger(self.path)
        self._start()

    def close(self) -> None:
        _RUNNING.discard(self)
        self._commits.cancel()
        self.dispatcher.results.close()
        for db in (self.store, self.reputation, self.ledger):
            if db is not None:
                db.close()

    def node(self, n: int, *, slots: int = 1, ready: bool = True, **caps_kw: Any) -> FakeNode:
        key = bytes([n + 1]) * 32
        wallet = Account.from_key(key).address
        send, inbox = trio.open_memory_channel[Message](1000)
        caps = Capabilities(
            peer_id=f"peer-{n}",
            wallet=wallet,
            expiry=0,
            models=[MODEL],
            slots=slots,
            backend="test",
            device="cpu",
            max_pixels=0,
            **caps_kw,
        )
        link = self.dispatcher.node_joined(f"peer-{n}", caps, send)
        if ready:
            self.dispatcher.ready(link, slots)
        return FakeNode(link, key, inbox, clock=self.clock)

    async def submit(self, req: RenderRequest) -> Submission:
        return await self.dispatcher.submit(req, client_peer="client", allowed_models={MODEL})

    async def deliver(self, node: FakeNode, offer: Offer, **kw: Any) -> None:
        await self.dispatcher.accept_result(node.link, node.result(offer, **kw))


_RUNNING: weakref.WeakSet[Harness] = weakref.WeakSet()
"""Harnesses whose writer runs: `events` waits for what they queued."""


async def events(sub: Submission | Resumed) -> list[Message]:
    """What the client stream would send now (images read from disk), without `RequestDone`
    (see `sub.events.finished`); each message once per attachment. What the coordinator
    tells once its writes commit (a failure, the end: `Store.after_queued`) is waited for."""
    for h in list(_RUNNING):
        await h.dispatcher.durable()
    out: list[Message] = []
    while (msg := await sub.events.next()) is not None:
        if not isinstance(msg, RequestDone):
            out.append(msg)
    return out


@pytest.fixture
async def coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


@pytest.fixture
async def coord_any(database: str, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """`coord` on each engine (SQLite, PostgreSQL: tests/conftest.py's `database`)."""
    h = Harness(database, nursery, folder=tmp_path)
    yield h
    h.close()


@pytest.fixture
async def paid_any(database: str, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """`paid` on each engine."""
    h = Harness(database, nursery, billing=True, folder=tmp_path)
    yield h
    h.close()


@pytest.fixture
async def paid(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """A coordinator that charges: ledger and billing on the same database."""
    h = Harness(tmp_path / "coordinator.db", nursery, billing=True)
    yield h
    h.close()


class ScriptedChannel:
    """Receives the given frames (decoded as a real channel does), records what is sent."""

    def __init__(self, *frames: bytes, peer: str = "peer-x") -> None:
        self.remote_peer_id = peer
        self.frames = list(frames)
        self.sent: list[Message] = []
        self.closed = False

    async def receive(self, *, limit: int = 0, timeout: float = 0) -> Message:
        if not self.frames:  # the script is over: the peer closed
            raise ChannelClosed("closed by peer")
        return decode(self.frames.pop(0))

    async def send(self, message: Message, **_: Any) -> None:
        self.sent.append(decode(encode(message)))

    async def send_many(self, frames: Sequence[tuple[Message, int]], **_: Any) -> None:
        """As the real channel's: all the frames, in order."""
        self.sent.extend(decode(encode(message)) for message, _ in frames)

    async def close(self, **_: Any) -> None:
        self.closed = True
