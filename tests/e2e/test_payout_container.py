"""An ephemeral container's node (issue #14): a throwaway signing key, rewards to a payout
address, its Salad machine id in its advert. Real coordinator, node, diffusers and SQLite on
127.0.0.1; the in-process EVM for the epoch and the claim; a fake Salad metadata service on
127.0.0.1 (the real one cannot exist here; never 169.254.169.254)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_app.api import render
from sogni_chain import connect
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_node.journal import Journal
from sogni_node.partner import IMDS_URL_ENV
from sogni_node.rewards import audit, claim, load_published
from sogni_protocol.epoch_files import decode_batch
from sogni_protocol.payout_rules import SettlementConfig

from ..settlement.settle_env import make_net
from .conftest import start_net, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def salad_imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Salad's env and its metadata service, faked on 127.0.0.1; yields the paths asked."""
    asked: list[str] = []
    claims = {"salad_machine_id": "salad-m-42", "salad_container_group_id": "g-1"}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    body = json.dumps({"jwt": f"e30.{payload}.c2ln"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            ok = self.path == "/v1/token" and self.headers.get("Metadata") == "true"
            self.send_response(200 if ok else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if ok else 2))
            self.end_headers()
            self.wfile.write(body if ok else b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    monkeypatch.setenv("SALAD_MACHINE_ID", "from-env-not-used")
    monkeypatch.setenv(IMDS_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_an_ephemeral_key_renders_and_its_payout_address_is_paid_and_claims(
    tmp_path: Path, backend: Any, salad_imds: list[str]
) -> None:
    chain = await trio.to_thread.run_sync(connect)
    net_chain = await trio.to_thread.run_sync(make_net, "embedded", chain)
    operator = chain.accounts[5]  # the operator's own wallet, outside the container
    payout = operator.address
    payer = Account.create()
    domain = net_chain.domain
    where = {"chain_id": domain.chain_id, "verifying_contract": domain.verifying_contract}
    async with start_net(tmp_path, **where) as net:
        node = await net.add_node(
            backend, "container", payout_address=payout.lower(), advert_interval=1.0, **where
        )
        peer = next(iter(net.coordinator.dispatcher.nodes))
        with trio.fail_after(20):  # the advert carries the machine id IMDS gave
            while peer not in net.coordinator.adverts.adverts:
                await trio.sleep(0.05)
        assert net.coordinator.adverts.adverts[peer].machine_id == "salad-m-42"
        assert salad_imds == ["/v1/token"]
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(payer.address, 1)
        finally:
            ledger.close()
        with trio.fail_after(90):
            result = await render(
                net.addr, tiny_request(2), payer_key=bytes(payer.key), domain=domain
            )
        assert len(result.images) == 2
        assert all(i.receipt.payout == payout for i in result.images)  # signed into each
        node.stop.set()
        with trio.fail_after(30):
            await node.done.wait()

    ephemeral = node.wallet.address
    store = Store(net.config.database)
    try:
        settler = Settler(
            store,
            net_chain.d,
            sender=net_chain.settler,
            rules=SettlementConfig().rules(local=True),
            publish_dir=tmp_path / "epochs",
        )
        closed = settler.close_epoch()
    finally:
        store.close()
    assert closed is not None and closed.paid_receipts == 2, closed
    assert set(closed.payouts) == {payout}  # the signing key earns nothing
    batch = decode_batch(closed.receipts_file.read_bytes())
    assert {(e.worker, e.payout) for e in batch.receipts} == {(ephemeral, payout)}

    epochs = load_published(tmp_path / "epochs")
    d = net_chain.d.distributor
    with Journal(tmp_path / "container" / "journal.db") as journal:
        report = audit(payout, journal.receipts(), epochs, distributor=d, worker=ephemeral)
    assert report.ok, report.problems
    assert report.verified == 2 and report.claimable == closed.payouts[payout]

    paid = await trio.to_thread.run_sync(claim, d, operator, epochs)  # the payout account claims
    assert paid == closed.payouts[payout]
    assert net_chain.d.token.balance_of(payout) == paid
    assert net_chain.d.token.balance_of(ephemeral) == 0 and d.claimed(ephemeral) == 0
