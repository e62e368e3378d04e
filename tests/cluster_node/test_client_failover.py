"""A client given several coordinators of one network (`render([a, b])`, tickets with
alternates): the request goes to the first that can be reached, and a resume moves on to the
next when its coordinator is gone. Real coordinators and a real node on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from sogni_app.api import ResumeTicket, collect, render

from .test_node_failover import _coordinator

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_ticket_keeps_its_alternates_and_refuses_too_many() -> None:
    ticket = ResumeTicket("/ip4/1/tcp/1/p2p/a", b"\x01" * 32, b"\x02" * 32, ("/b", "/c"))
    again = ResumeTicket.from_json(ticket.to_json())
    assert again == ticket and again.coordinators == ["/ip4/1/tcp/1/p2p/a", "/b", "/c"]
    old = ResumeTicket("/a", b"\x01" * 32, b"\x02" * 32)
    assert "alternates" not in old.to_json()  # a one-coordinator ticket reads as before
    assert ResumeTicket.from_json(old.to_json()).alternates == ()
    for bad in (7, ["/x"] * 17):  # not a list; more than MAX_COORDINATORS
        text = json.dumps({**json.loads(old.to_json()), "alternates": bad})
        with pytest.raises(ValueError, match="alternates"):
            ResumeTicket.from_json(text)


async def test_the_request_and_its_resume_go_to_the_next_coordinator(
    tmp_path: Path, backend: Any
) -> None:
    async with trio.open_nursery() as nursery:
        dead, kill_dead = await _coordinator(nursery, tmp_path / "dead")
        alive, kill_alive = await _coordinator(nursery, tmp_path / "alive")
        await alive.add_node(backend, "node0")
        kill_dead.cancel()  # its address now dials nothing
        tickets: list[ResumeTicket] = []
        with trio.fail_after(60):
            result = await render([dead.addr, alive.addr], _request(2), on_accepted=tickets.append)
        assert len(result.images) == 2
        assert tickets[0].coordinator == alive.addr and tickets[0].alternates == (dead.addr,)
        stored = alive.coordinator.dispatcher.store.receipt(result.images[0].job_id)
        assert stored is not None  # rendered and receipted where it was accepted
        # a ticket naming the dead coordinator first resumes at the next one
        ticket = ResumeTicket(dead.addr, tickets[0].request_id, tickets[0].token, (alive.addr,))
        with capture_logs() as logs, trio.fail_after(30):
            collected = await collect(ticket, reconnect_for=20.0)
        assert collected.request_id == ticket.request_id
        assert collected.images == []  # every image was acknowledged by `render`
        moved = [e for e in logs if e["event"] == "request_resumed_elsewhere"]
        assert [e["at"] for e in moved] == [alive.addr]
        kill_alive.cancel()


def _request(n: int) -> Any:
    from tests.e2e.conftest import tiny_request

    return tiny_request(n)


async def test_sogni_render_takes_several_coordinators_and_its_ticket_keeps_them(
    tmp_path: Path, backend: Any
) -> None:
    from tests.e2e.conftest import run_sogni

    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    async with trio.open_nursery() as nursery:
        dead, kill_dead = await _coordinator(nursery, tmp_path / "dead")
        alive, kill_alive = await _coordinator(nursery, tmp_path / "alive")
        await alive.add_node(backend, "node0")
        kill_dead.cancel()
        args = ["render", "a red circle", "--model", "sogni-tiny-sd", "--steps", "3"]
        args += ["--width", "64", "--height", "64", "-n", "2", "--out", str(out)]
        code, _, err = await run_sogni(
            home, *args, "--coordinator", dead.addr, "--coordinator", alive.addr
        )
        assert code == 0, err
        ticket = ResumeTicket.from_json((out / "request.json").read_text())
        assert ticket.coordinator == alive.addr and ticket.alternates == (dead.addr,)
        assert len((out / "receipts.jsonl").read_text().splitlines()) == 2
        # `collect` given the dead coordinator first goes on to the next
        code, _, err = await run_sogni(
            home, "collect", ticket.request_id.hex(), "--out", str(out),
            "--coordinator", dead.addr, "--coordinator", alive.addr,
        )  # fmt: skip
        assert code == 0, err
        kill_alive.cancel()
