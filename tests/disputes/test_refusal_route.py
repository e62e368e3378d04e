"""`GET /disputes/refusals/0x<job>`: what `sogni-node dispute open --coordinator` reads; the
node CLI's parsing picks its own wallet's refusal and refuses anyone else's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from sogni_coordinator.disputes import DisputeBook, Reporter, dispute_routes
from sogni_node.dispute_cli import pick_refusal
from sogni_protocol.cli_errors import Refused

from .dispute_env import Env, refused_job

WORKER = "0x" + "11" * 20
DISPUTES = "0x" + "22" * 20


def test_route_serves_the_signed_refusal(tmp_path: Path) -> None:
    book = DisputeBook(tmp_path / "c.db")
    reporter = Reporter(book, b"\x05" * 32, chain_id=31337, disputes=DISPUTES, clock=lambda: 1e9)
    job = b"\x33" * 32
    receipt, params = refused_job(job, WORKER, DISPUTES, "a secret prompt")
    reporter.refused(receipt, params, "float32", "step 0: d = 2 over 5e-05", b"evidence")
    app = Starlette(routes=dispute_routes(SimpleNamespace(refusals=reporter)))
    client = TestClient(app)
    r = client.get("/disputes/refusals/0x" + job.hex())
    assert r.status_code == 200 and "secret" not in r.text
    body = r.json()
    mine = pick_refusal(body, "0x" + job.hex(), WORKER.upper().replace("0X", "0x"))
    assert mine["refusedAt"] == 10**9 - 1 and mine["reason"].startswith("step 0")
    with pytest.raises(Refused, match="no refusal of job"):
        pick_refusal(body, "0x" + job.hex(), "0x" + "44" * 20)
    assert client.get("/disputes/refusals/0x" + "00" * 32).status_code == 404
    assert client.get("/disputes/refusals/nothex").status_code == 400
    case = bytes.fromhex(mine["caseId"][2:])
    assert client.get(f"/disputes/bundles/0x{case.hex()}.json").status_code == 404  # not yet
    (tmp_path / "b.json").write_text('{"rechecks": []}')
    book.set_bundle(case, b"\x01" * 32, str(tmp_path / "b.json"))
    got = client.get(f"/disputes/bundles/0x{case.hex()}.json")
    assert got.status_code == 200 and got.json() == {"rechecks": []}
    book.close()


def test_attach_wires_the_coordinator(env: Env, tmp_path: Path) -> None:
    """With Disputes in the deployment the dispatcher signs refusals, the settler pays
    restorations and the desk polls from the deployment block; without it, nothing."""
    from sogni_coordinator.disputes import Restorations, attach_disputes

    link = SimpleNamespace(deployment=env.d, settler=SimpleNamespace(restorations=None))
    dispatcher = SimpleNamespace(refusals=None, reputation=None)
    desk = attach_disputes(link, dispatcher, bytes(env.reporter.key), tmp_path, tmp_path / "c.db")
    assert desk is not None and isinstance(link.settler.restorations, Restorations)
    assert isinstance(dispatcher.refusals, Reporter)
    assert desk.book.next_block() == env.d.addresses.deployed_at_block
    none = SimpleNamespace(deployment=SimpleNamespace(disputes=None))
    assert attach_disputes(none, dispatcher, b"\x01" * 32, tmp_path, tmp_path / "c.db") is None
    desk.book.close()
