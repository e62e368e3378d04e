"""Test data shared by the result-store tests (tests/coordinator, tests/postgres) and the
verifier-choice tests."""

from __future__ import annotations

import os

import trio

from sogni_coordinator.jobs import NodeLink
from sogni_protocol.messages import JobImage, Message, Receipt, RenderMeta


def job_image(i: int, size: int = 1000) -> JobImage:
    """A signed-looking image frame for job `i` (`bytes([i]) * 32`): `size + i` random bytes
    (incompressible, as PNGs are; each image a different length)."""
    receipt = Receipt(
        job_id=bytes([i]) * 32,
        offer_hash=b"\x02" * 32,
        worker="0x" + "11" * 20,
        coordinator="0x" + "22" * 20,
        model_id="sd15",
        result_hash=b"\x03" * 32,
        steps_done=20,
        work_units=1000,
        completed_at=1_700_000_000,
    )
    return JobImage(
        job_id=bytes([i]) * 32,
        index=i,
        seed=i,
        image=os.urandom(size + i),
        receipt=receipt,
        signature=b"\x04" * 65,
        meta=RenderMeta(backend="cpu", device="test", dtype="fp32", threads=2),
    )


def mode_link(peer: str, wallet: str, mode: str) -> NodeLink:
    """A connected node serving model "m" with one slot that advertises numeric `mode`."""
    send, _ = trio.open_memory_channel[Message](1)
    return NodeLink(
        peer_id=peer, wallet=wallet, models=frozenset({"m"}), slots=1, outbox=send, mode=mode
    )
