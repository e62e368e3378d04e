"""`sogni report` over the libp2p client protocol, on a real local network (tiny model): only
the payer may report, once; the report keeps the evidence and no prompt text; resolving it
with `block-payer` refuses the payer's next request before anything is reserved, and
`block-node` drops a connected node with a `Goodbye` and refuses its next handshake."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_app.api import AccountRefused, RenderRefused, render, report
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.reports import OPERATOR, PAYER_BLOCKED, Reports
from sogni_net import open_host
from sogni_protocol.ids import CLIENT_PROTOCOL, CONTROL_FRAME_LIMIT
from sogni_protocol.messages import (
    Goodbye,
    HelloRefused,
    RequestRefused,
)
from sogni_protocol.report_signing import sign_report
from sogni_wallet.keystore import create_keystore
from tests.e2e.conftest import (
    receive_skipping,
    rogue_node,
    run_sogni,
    send_node_hello,
    start_net,
    tiny_request,
    until,
)

SENTINEL = "quokka-sentinel-7731"
NOTE = "gecko-note-5150"


def _joined(dispatcher: Any, wallet: str) -> bool:
    return any(link.wallet == wallet for link in dispatcher.nodes.values())


def _all_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


async def test_payer_reports_once_and_a_block_refuses_its_next_request(
    tmp_path: Path, backend: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    payer, stranger = Account.create(), Account.create()
    async with start_net(tmp_path) as net:
        node = await net.add_node(backend, "node0")
        database = net.config.database
        ledger = Ledger(database)
        try:
            ledger.credit_purchase(payer.address, 1)
        finally:
            ledger.close()
        request = tiny_request(2, positive_prompt=f"a red circle {SENTINEL}")
        with trio.fail_after(60):
            result = await render(net.addr, request, payer_key=bytes(payer.key), domain=net.domain)
        rid = result.request_id

        # a stranger cannot report the payer's request (nor learn that it exists)
        with pytest.raises(AccountRefused) as info:
            await report(net.addr, bytes(stranger.key), rid, "other", domain=net.domain)
        assert info.value.code == "unknown_job"
        with pytest.raises(AccountRefused) as info:  # nor a request nobody made
            await report(net.addr, bytes(payer.key), bytes(32), "other", domain=net.domain)
        assert info.value.code == "unknown_job"
        # a report signed for another peer id (a copied one) is refused
        async with open_host(key_path=None, listen=()) as client:
            copied = sign_report(
                bytes(payer.key),
                net.domain,
                peer_id="12D3KooWSomeoneElse",
                request_id=rid,
                reason="other",
                expiry=int(time.time()) + 60,
            )
            channel = await client.open_channel(net.addr, CLIENT_PROTOCOL)
            await channel.send(copied)
            refused = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
            assert isinstance(refused, RequestRefused) and refused.code == "unauthorized"

        # the payer reports it with `sogni report`, as a user would (its own process)
        home = tmp_path / "home"
        keystore = home / "payer.json"
        create_keystore(keystore, "payer-password", kdf_n=2**14, private_key=bytes(payer.key))
        code, out, err = await run_sogni(
            home, "report", rid.hex(), "--reason", "violence", "--note", NOTE,
            f"--coordinator={net.addr}", f"--chain-id={net.domain.chain_id}",
            f"--verifying-contract={net.domain.verifying_contract}",
            "--keystore", str(keystore), "--json",
            password="payer-password",
        )  # fmt: skip
        assert code == 0, err
        report_id = json.loads(out)["reportId"]
        with pytest.raises(AccountRefused) as info:
            await report(net.addr, bytes(payer.key), rid, "hate", domain=net.domain)
        assert info.value.code == "duplicate_report"

        reports = Reports(database)
        try:
            kept = reports.get(report_id)
            assert kept is not None
            assert kept.payer == payer.address.lower() and kept.reason == "violence"
            assert kept.note == NOTE and kept.model_id == request.model_id
            assert sorted(i.image_sha256 for i in kept.images) == sorted(
                hashlib.sha256(img.image).hexdigest() for img in result.images
            )
            assert {i.worker.lower() for i in kept.images} == {node.wallet.address.lower()}
            assert kept.node_peers  # the node was connected: its peer id is kept
            # a keyed hash, not the plain sha256 of the prompt (which a guess would reverse)
            assert kept.prompt_hash is not None
            plain = hashlib.sha256(request.positive_prompt.encode()).hexdigest()
            assert kept.prompt_hash != plain
            assert reports.matches_prompt(report_id, (request.positive_prompt, "", ""))
            assert not reports.matches_prompt(report_id, ("a red circle", "", ""))
            assert SENTINEL not in json.dumps(kept.as_json())
            # the operator resolves it: the payer is blocked from now on
            blocks = reports.resolve(report_id, "block-payer", "test")
            assert [(b.kind, b.account) for b in blocks] == [("payer", payer.address.lower())]
        finally:
            reports.close()
        dispatcher = net.coordinator.dispatcher
        await until(lambda: payer.address.lower() in dispatcher.blocked_payers, 10)
        ledger = Ledger(database)
        try:
            before = ledger.balance(payer.address)
            with pytest.raises(RenderRefused) as refusal:
                await render(
                    net.addr, tiny_request(1), payer_key=bytes(payer.key), domain=net.domain
                )
            assert refusal.value.code == "payer_blocked"
            assert PAYER_BLOCKED in refusal.value.reason
            assert ledger.balance(payer.address) == before  # it cost nothing
            assert ledger.reserved_for(payer.address)["spark_paid"] == 0
        finally:
            ledger.close()
    out, err = capfd.readouterr()
    logged = out + err
    assert "report_filed" in logged and "report_resolved" in logged  # the log was captured
    assert SENTINEL not in logged and NOTE not in logged
    # no prompt text anywhere in the database (jobs are sealed, the report keeps a hash)
    assert SENTINEL.encode() not in _all_bytes(database)
    check = Reports(database)
    try:
        rows = check._db.execute("SELECT * FROM reports").fetchall()
    finally:
        check.close()
    assert SENTINEL not in repr(rows)


async def test_a_blocked_node_is_dropped_with_a_goodbye_and_refused(tmp_path: Path) -> None:
    async with start_net(tmp_path) as net:
        dispatcher = net.coordinator.dispatcher
        async with rogue_node(net) as (channel, wallet):
            await until(lambda: _joined(dispatcher, wallet.address), 10)
            reports = Reports(net.config.database)
            try:
                assert reports.block("node", wallet.address, "test")
            finally:
                reports.close()
            goodbye = await receive_skipping(channel, (Goodbye,), timeout=15)
            assert "blocked" in goodbye.reason and "content report" in goodbye.reason
            assert not _joined(dispatcher, wallet.address)
        # the same wallet cannot come back, under a new peer id either
        async with open_host(key_path=None, listen=()) as host:
            channel = await send_node_hello(host, net, wallet, ("sogni-tiny-sd",))
            refused = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
            assert isinstance(refused, HelloRefused) and "blocked" in refused.reason
        # unblocked, it may join again (and is routed: it is among the nodes)
        reports = Reports(net.config.database)
        try:
            assert reports.unblock(wallet.address) == 1
        finally:
            reports.close()
        await until(lambda: wallet.address.lower() not in dispatcher.router.blocked_nodes, 10)
        async with rogue_node(net, wallet=wallet):
            await until(lambda: _joined(dispatcher, wallet.address), 10)


def test_operator_reports_need_no_payer_but_strangers_do(tmp_path: Path) -> None:
    """Filing checks the ledger's payer again, whatever the door: only the operator skips it."""
    reports = Reports(tmp_path / "c.db")
    try:
        with pytest.raises(Exception, match="no job of yours"):
            reports.file(bytes(32), reporter=Account.create().address, via="client", reason="other")
        with pytest.raises(Exception, match="no job of yours"):  # unknown to the operator too
            reports.file(bytes(32), reporter=OPERATOR, via="operator", reason="other")
    finally:
        reports.close()
