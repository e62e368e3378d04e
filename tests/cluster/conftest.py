"""Several coordinators of one network on one real PostgreSQL, in-process, on 127.0.0.1.

Each coordinator runs in a cancel scope of its own, so a test can kill one mid-request (its
leases are not released, its streams drop: what a crash leaves). They share the database
(each on a connection of its own: the URL names it), the result folder and the network's
signer list. Rogue nodes speak the real wire protocol and sign real receipts, so a test
decides when a result arrives and at which coordinator.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio
from eth_account import Account

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator
from sogni_net import Channel, Host, open_host
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT
from sogni_protocol.messages import (
    Cancel,
    CancelRequest,
    HandBack,
    Offer,
    Ready,
    RenderMeta,
    RenderRequest,
    RequestAccepted,
    RequestDone,
    Result,
    ResultAck,
    Welcome,
)

from ..e2e.conftest import (  # noqa: F401  (fixtures)
    MODEL,
    Net,
    backend,
    receive_skipping,
    registry,
    send_node_hello,
)
from ..gateway.conftest import create_key


@dataclass
class Member:
    name: str
    config: CoordinatorConfig
    signer: Signer
    running: RunningCoordinator
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def addr(self) -> str:
        return self.running.addrs[0]

    @property
    def http_url(self) -> str:
        """Its gateway's base URL (`start_cluster(..., gateways=True)`)."""
        assert self.running.http_url is not None, "started without gateways=True"
        return self.running.http_url

    @property
    def net(self) -> Net:
        """The e2e helpers' view of this coordinator (to add nodes to it)."""
        return Net(
            self.config.data_dir.parent, self._nursery, self.running, self.signer, self.config
        )

    _nursery: Any = None

    async def kill(self) -> None:
        """Stop it as a crash would: nothing released, every stream dropped."""
        self.scope.cancel()
        await self.stopped.wait()


@asynccontextmanager
async def start_cluster(
    tmp: Path, pg_url: str, names: list[str], *, gateways: bool = False, **cfg: Any
) -> AsyncIterator[dict[str, Member]]:
    if gateways:  # one network: one result-URL key, one result folder, for every gateway
        cfg = {
            "http_listen": "127.0.0.1:0",
            "result_url_key_file": tmp / "shared-result-url.key",
            **cfg,
        }
    cfg.setdefault("http_listen", "off")
    cfg.setdefault("heartbeat_timeout", 3.0)
    accounts = {name: Account.create() for name in names}
    signers = [a.address for a in accounts.values()]
    members: dict[str, Member] = {}
    async with trio.open_nursery() as nursery:
        for name in names:
            acct = accounts[name]
            config = CoordinatorConfig(
                data_dir=tmp / name / "coordinator",
                listen="/ip4/127.0.0.1/tcp/0",
                database=f"{pg_url}?application_name={name}",  # type: ignore[arg-type]
                results_dir=tmp / "shared-results",
                network_signers=signers,
                heartbeat_interval=0.5,
                **cfg,
            )
            signer = Signer(acct.address, bytes(acct.key))
            scope = trio.CancelScope()
            stopped = trio.Event()

            async def run(
                config: CoordinatorConfig = config,
                signer: Signer = signer,
                scope: trio.CancelScope = scope,
                stopped: trio.Event = stopped,
                *,
                task_status: Any = trio.TASK_STATUS_IGNORED,
            ) -> None:
                try:
                    with scope:
                        await run_coordinator(config, signer, task_status=task_status)
                finally:
                    stopped.set()

            running = await nursery.start(run)
            member = Member(name, config, signer, running, scope, stopped)
            member._nursery = nursery
            members[name] = member
        yield members
        nursery.cancel_scope.cancel()


def png(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


class Rogue:
    """A node that takes offers and answers them when the test says, at any coordinator."""

    def __init__(self, host: Host, acct: Any) -> None:
        self.host = host
        self.acct = acct
        self.channel: Channel | None = None

    async def connect(self, member: Member, credit: int = 1) -> None:
        self.channel = await send_node_hello(self.host, member.net, self.acct)
        welcome = await self.channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(welcome, Welcome)
        await self.channel.send(Ready(slots=credit))

    async def offer(self, timeout: float = 20.0) -> Offer:
        assert self.channel is not None
        msg: Offer = await receive_skipping(self.channel, (Offer,), timeout)
        return msg

    def result(self, offer: Offer, domain: Domain, image: bytes | None = None) -> Result:
        """A signed result for `offer` (`image`: its bytes, a red square by default)."""
        image = image or png(offer.offer.width, offer.offer.height)
        o = offer.offer
        from sogni_protocol.messages import Receipt

        receipt = Receipt(
            job_id=o.job_id,
            offer_hash=eip712.offer_hash(domain, o),
            worker=self.acct.address,
            coordinator=o.coordinator,
            model_id=o.model_id,
            result_hash=hashlib.sha256(image).digest(),
            steps_done=o.steps,
            work_units=o.work_units,
            completed_at=int(time.time()),
            price_factor_bps=o.price_factor_bps,
        )
        return Result(
            job_id=o.job_id,
            image=image,
            receipt=receipt,
            signature=eip712.sign_receipt(bytes(self.acct.key), domain, receipt),
            meta=RenderMeta(backend="rogue", device="cpu", dtype="float32", threads=1),
        )

    async def deliver(self, offer: Offer, domain: Domain, image: bytes | None = None) -> None:
        """Send the signed result for `offer` (see `result`) and see it accepted."""
        assert self.channel is not None
        await self.channel.send(self.result(offer, domain, image))
        ack = await receive_skipping(self.channel, (ResultAck,), 20)
        assert ack.accepted, ack.reason


def pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """`sql`'s rows in the network's database, read on a connection of the test's own."""
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]


def funded_key(pg_url: str) -> tuple[str, str]:
    """An API key of the network (shared database) and its account, credited 1 Spark."""
    key, account = create_key(pg_url)
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(account, 1)
    finally:
        ledger.close()
    return key, account


async def submit(
    client: Host, member: Member, request: RenderRequest
) -> tuple[Channel, RequestAccepted]:
    """Send `request` to `member` from a client stream of its own; the stream and the answer,
    which must be an acceptance."""
    channel = await client.open_channel(member.addr, CLIENT_PROTOCOL)
    await channel.send(request)
    accepted = await channel.receive(timeout=10)
    assert isinstance(accepted, RequestAccepted), accepted
    return channel, accepted


async def cancel_while_rendered(
    channel: Channel, accepted: RequestAccepted, node: Rogue, offer: Offer
) -> None:
    """The client cancels its request while `node` holds `offer`: the node is told to stop
    (a partial receipt paid), hands the job back, and the request ends counted cancelled."""
    assert node.channel is not None
    await channel.send(CancelRequest(request_id=accepted.request_id))
    cancel = await receive_skipping(node.channel, (Cancel,), 20)
    assert cancel.job_id == offer.offer.job_id and cancel.pay_partial
    await node.channel.send(HandBack(job_id=offer.offer.job_id, steps_done=0, reason="cancelled"))
    done = await receive_skipping(channel, (RequestDone,), 20)
    assert (done.delivered, done.cancelled) == (0, 1)


__all__ = [
    "MODEL",
    "Member",
    "Rogue",
    "cancel_while_rendered",
    "funded_key",
    "pg_rows",
    "png",
    "start_cluster",
    "submit",
]


def paying_account(pg_url: str, spark: int = 1) -> Any:
    """A new payer with `spark` Spark bought, in the cluster's ledger."""
    payer = Account.create()
    ledger = Ledger(pg_url)
    try:
        ledger.credit_purchase(payer.address, spark)
    finally:
        ledger.close()
    return payer


@asynccontextmanager
async def two_and_a_node(
    tmp_path: Path, pg_url: str, lease_seconds: float
) -> AsyncIterator[tuple[Member, Member, Host, Rogue]]:
    """Coordinators a and b on one database, a client's host, and a node connected to b."""
    async with (
        start_cluster(
            tmp_path, pg_url, ["a", "b"], lease_seconds=lease_seconds, models=[MODEL]
        ) as m,
        open_host(key_path=None, listen=()) as client,
        open_host(key_path=None, listen=()) as host,
    ):
        node = Rogue(host, Account.create())
        await node.connect(m["b"])
        assert node.channel is not None
        yield m["a"], m["b"], client, node
