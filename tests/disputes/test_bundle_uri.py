"""The bundle URI on chain is the coordinator's HTTP route (`GET /disputes/bundles/0x<case>`
under its public URL), and a juror's client fetches the bundle there and checks it against
the hash on chain: an edited bundle is refused. Real HTTP on 127.0.0.1, embedded chain."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from starlette.applications import Starlette

from sogni_app.dispute_cli import JurorClient, SaltBox
from sogni_chain.disputes import Refusal, open_dispute
from sogni_coordinator.disputes import DisputeBook, DisputeDesk, Reporter, dispute_routes
from sogni_net import serve_http
from sogni_protocol.cli_errors import Refused

from .dispute_env import Env, refused_job


async def test_bundle_is_published_over_http_and_verified(env: Env, tmp_path: Path) -> None:
    chain, disputes = env.chain, env.disputes
    book = DisputeBook(tmp_path / "coordinator.db")
    reporter = Reporter(
        book,
        bytes(env.reporter.key),
        chain_id=chain.chain_id,
        disputes=disputes.address,
        clock=lambda: float(chain.timestamp()),
    )
    receipt, params = refused_job(
        b"\x5a" * 32, env.worker.address, env.reporter.address, "a secret"
    )
    record = reporter.refused(receipt, params, "float32", "step 1 over", b"evidence")
    open_dispute(
        disputes,
        env.d.token.address,
        worker=env.worker,
        refusal=Refusal.from_json(record.as_json()),
    )
    app = Starlette(routes=dispute_routes(SimpleNamespace(refusals=reporter)))
    juror = JurorClient(chain, disputes, SaltBox(tmp_path / "juror"), None)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, app, "127.0.0.1:0")
        desk = DisputeDesk(
            book, disputes, reporter=env.reporter, publish_dir=tmp_path / "pub", public_url=url
        )
        assert await desk.poll() == 1
        case = disputes.case(record.case_id)
        uri = disputes.bundle_uri(record.case_id)
        assert uri == f"{url}/disputes/bundles/0x{record.case_id.hex()}"
        got = await trio.to_thread.run_sync(juror.bundle, case)
        assert got is not None and got[0] == uri
        assert got[1]["caseId"] == "0x" + record.case_id.hex() and got[1]["reason"] == "step 1 over"
        assert "secret" not in json.dumps(got[1])
        stored = book.by_case(record.case_id)
        assert stored is not None and stored.bundle_path is not None
        Path(stored.bundle_path).write_text('{"rechecks": [], "reason": "doctored"}')
        with pytest.raises(Refused, match="not the 0x"):
            await trio.to_thread.run_sync(juror.bundle, case)
        nursery.cancel_scope.cancel()
    book.close()


def test_without_an_http_server_the_file_uri_is_published(tmp_path: Path) -> None:
    desk = DisputeDesk(
        DisputeBook(tmp_path / "c.db"),
        SimpleNamespace(),  # type: ignore[arg-type]
        reporter=None,
        publish_dir=tmp_path,
    )
    path = tmp_path / "disputes" / "ab.json"
    assert desk.bundle_uri(b"\xab", path) == path.as_uri()
    desk.public_url = "https://coord.example/"
    assert desk.bundle_uri(b"\xab", path) == "https://coord.example/disputes/bundles/0xab"
    desk.book.close()
