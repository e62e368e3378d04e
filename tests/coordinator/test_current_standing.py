"""Fast-tier offers follow the worker's standing now, not at connection time: an unstake or
a licence handed to another wallet after connecting ends the node's fast jobs."""

from __future__ import annotations

import trio

from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.routing import Router
from sogni_coordinator.standing import Standing
from sogni_protocol.messages import RenderRequest

WALLET = "0x" + "ab" * 20


def test_fast_tier_follows_the_current_standing() -> None:
    current = {WALLET: Standing(licensed=True, stake=10_000)}
    router = Router(
        Reputation(":memory:"),
        tiers="enforced",
        fast_min_stake=10_000,
        standing=lambda wallet: current.get(wallet.lower(), Standing()),
    )
    send, _ = trio.open_memory_channel[object](1)
    link = NodeLink(
        peer_id="p", wallet=WALLET, models=frozenset({"m"}), slots=1, outbox=send, device="cuda"
    )  # type: ignore[arg-type]
    want = RenderRequest(model_id="m", positive_prompt="x", width=64, height=64)
    assert router.capable(link, "fast", want)
    current[WALLET] = Standing(licensed=True, stake=0)  # unstaked after connecting
    assert not router.capable(link, "fast", want) and router.capable(link, "relaxed", want)
    current[WALLET] = Standing(licensed=False, stake=10_000)  # licence handed over
    assert not router.capable(link, "fast", want)
