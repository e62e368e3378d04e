"""A coordinator's burst of verifier checks never piles up on a node: at most
`MAX_CHECKS_WAITING` are held (running or waiting their turn), the rest are refused at once
with a code that blames no worker, and a check whose deadline passes while it waits is
refused instead of run (`PullSession._verifier_work`)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, cast

import trio
from eth_account import Account

from sogni_node.pull import MAX_CHECKS_WAITING, NodeIdentity, PullSession
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Capabilities,
    DecodeVerified,
    ScalarEntry,
    StepOpeningWire,
    TensorEntry,
    VerifyDecode,
    VerifyRefused,
)

DOMAIN = Domain(31337, "0x" + "22" * 20)
ACCOUNT = Account.create()


def _session() -> PullSession:
    identity = NodeIdentity(ACCOUNT.address, bytes(ACCOUNT.key), DOMAIN, frozenset())
    caps = Capabilities(
        peer_id="peer-v",
        wallet=ACCOUNT.address,
        expiry=2_000_000_000,
        models=["m"],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=0,
    )
    return PullSession(None, "addr", identity, None, None, caps)  # type: ignore[arg-type]


def _check(deadline: float) -> VerifyDecode:
    latents = TensorEntry(name="latents", dtype="float32", shape=[1, 4, 8, 8], data=bytes(1024))
    leaf = StepOpeningWire(
        step=8,
        tensors=[latents],
        scalars=[ScalarEntry(name="timestep", value=1)],
        proof=[],
        n_leaves=9,
    )
    return VerifyDecode(
        check_id=os.urandom(32),
        model_id="m",
        dtype="float32",
        width=64,
        height=64,
        opening=leaf,
        deadline=int(deadline),
    )


async def test_a_burst_of_checks_is_held_up_to_the_limit_and_the_rest_refused_at_once() -> None:
    session = _session()
    release = threading.Event()
    ran: list[bytes] = []

    def work(msg: Any) -> DecodeVerified:  # one slow decode, in the worker thread
        release.wait(30)
        ran.append(msg.check_id)
        return DecodeVerified(check_id=msg.check_id, image=b"png")

    burst = MAX_CHECKS_WAITING + 5
    msgs = [_check(time.time() + 60) for _ in range(burst)]
    replies: dict[bytes, DecodeVerified | VerifyRefused] = {}

    async def one(msg: VerifyDecode) -> None:
        reply = await session._verifier_work(msg, work, "decode_failed", "could not decode")
        replies[msg.check_id] = cast(DecodeVerified | VerifyRefused, reply)

    async with trio.open_nursery() as nursery:
        for msg in msgs:
            nursery.start_soon(one, msg)
        with trio.fail_after(10):  # the extra ones are answered while the first still runs
            while len(replies) < burst - MAX_CHECKS_WAITING:
                await trio.sleep(0.01)
        refused = [r for r in replies.values() if isinstance(r, VerifyRefused)]
        assert len(refused) == burst - MAX_CHECKS_WAITING and not ran
        assert all(r.code == "other" and r.reason.startswith("busy:") for r in refused)
        release.set()
    done = [r for r in replies.values() if isinstance(r, DecodeVerified)]
    assert len(done) == MAX_CHECKS_WAITING == len(ran)
    assert session._checks_waiting == 0
    # held again from zero: a later check is not refused for the burst that has gone
    again = await session._verifier_work(
        _check(time.time() + 60), work, "decode_failed", "could not decode"
    )
    assert isinstance(again, DecodeVerified)


async def test_a_check_whose_deadline_passes_while_it_waits_is_refused_not_run() -> None:
    session = _session()
    release = threading.Event()
    ran: list[bytes] = []

    def work(msg: Any) -> DecodeVerified:
        release.wait(30)
        ran.append(msg.check_id)
        return DecodeVerified(check_id=msg.check_id, image=b"png")

    first, soon = _check(time.time() + 60), _check(time.time() + 2)
    replies: dict[bytes, Any] = {}

    async def one(msg: VerifyDecode) -> None:
        replies[msg.check_id] = await session._verifier_work(msg, work, "f", "could not")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, first)
        await trio.sleep(0.1)
        nursery.start_soon(one, soon)  # waits behind `first` past its deadline
        await trio.sleep(max(0.0, soon.deadline - time.time()) + 0.2)
        release.set()
    assert isinstance(replies[first.check_id], DecodeVerified)
    late = replies[soon.check_id]
    assert isinstance(late, VerifyRefused) and late.code == "deadline"
    assert ran == [first.check_id]
