"""Verifiers and payout addresses (issue #12; docs/VERIFICATION.md, "Who may verify"): a
node's advertised payout account is where its verifier work is paid, and a node sharing the
worker's wallet or payout account (an operator's other container) never verifies its work,
nor overrules or confirms another verifier paid to its own account.

In-process (`conftest.Harness`, real SQLite store), fake nodes joined with a `payout` in
their capabilities, as a node configured with `payout_address` advertises it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
from eth_account import Account

from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.verification_config import VerificationConfig
from sogni_coordinator.verifiers import choose_verifier
from sogni_protocol import eip712
from sogni_protocol.messages import (
    Capabilities,
    Message,
    Offer,
    Result,
    StepVerified,
    VerifyStep,
)

from .conftest import DOMAIN, MODEL, FakeNode, Harness
from .test_checks import (
    Trajectory,
    _paid_request,
    answer_challenge,
    answer_verify,
    committed,
    log_lines,
    next_of,
    until,
)

POLICY = VerificationConfig(
    rate=1.0, challenge_timeout=5.0, verify_timeout=5.0, image_check=False, probe_rate=0.0
)
OPERATOR = Account.from_key(b"\x71" * 32).address
"""One operator's payout account, shared by its containers."""
OTHER = Account.from_key(b"\x72" * 32).address
"""Another operator's payout account."""


@pytest.fixture
async def h(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "coordinator.db", nursery, billing=True, verification=POLICY)
    yield harness
    harness.close()


def join(h: Harness, n: int, *, payout: str | None = None, ready: bool = False) -> FakeNode:
    """Node `n` (its own wallet) joins advertising `payout`, as `Harness.node` joins one."""
    key = bytes([n + 1]) * 32
    send, inbox = trio.open_memory_channel[Message](1000)
    caps = Capabilities(
        peer_id=f"peer-{n}",
        wallet=Account.from_key(key).address,
        expiry=0,
        models=[MODEL],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=0,
        payout=payout,
    )
    link = h.dispatcher.node_joined(f"peer-{n}", caps, send)
    if ready:
        h.dispatcher.ready(link, 1)
    return FakeNode(link, key, inbox)


def paying(node: FakeNode, offer: Offer, t: Trajectory, payout: str) -> Result:
    """`node`'s committed result, its receipt (EIP-712 v4) signing `payout` as payee."""
    plain = committed(node, offer, t)
    receipt = msgspec.structs.replace(plain.receipt, payout=payout)
    return msgspec.structs.replace(
        plain, receipt=receipt, signature=eip712.sign_receipt(node.key, DOMAIN, receipt)
    )


def _link(n: int, payout: str | None = None) -> NodeLink:
    send, _ = trio.open_memory_channel[Message](1)
    wallet = Account.from_key(bytes([n + 1]) * 32).address
    return NodeLink(f"peer-{n}", wallet, frozenset({MODEL}), 1, send, payout=payout)


def test_no_account_of_the_worker_ever_verifies_its_work() -> None:
    worker = _link(0, payout=OPERATOR)
    as_wallet = NodeLink("peer-9", OPERATOR, frozenset({MODEL}), 1, worker.outbox)
    sibling = _link(1, payout=OPERATOR.lower())  # another container of the operator
    pays_worker = _link(2, payout=worker.wallet)  # pays the worker's own signing key
    clean = _link(3, payout=OTHER)
    nodes = {x.peer_id: x for x in (worker, as_wallet, sibling, pays_worker, clean)}
    rng = random.Random(1)
    for _ in range(50):  # the payee the worker signed into its receipt
        assert choose_verifier(nodes, MODEL, worker.wallet, rng, worker_payout=OPERATOR) == "peer-3"
    # a third node: neither the first verifier's wallet nor its payout account (`exclude`)
    assert (
        choose_verifier(nodes, MODEL, worker.wallet, rng, {OTHER}, worker_payout=OPERATOR) is None
    )
    # a plain worker (no payout): other operators' containers may verify it
    plain = _link(4)
    picks = {
        choose_verifier({**nodes, "peer-4": plain}, MODEL, plain.wallet, rng) for _ in range(60)
    }
    assert picks == {"peer-0", "peer-1", "peer-2", "peer-3", "peer-9"}


def test_an_advertised_payout_alone_bars_nobody() -> None:
    """A cheater advertising an honest operator's payout (free to say) must not keep that
    operator's nodes from checking it: only the payee its receipt signs (which pays that
    operator) is barred."""
    cheater = _link(0, payout=OPERATOR)
    honest = _link(1, payout=OPERATOR)
    nodes = {x.peer_id: x for x in (cheater, honest)}
    assert choose_verifier(nodes, MODEL, cheater.wallet, worker_payout=None) == "peer-1"
    assert choose_verifier(nodes, MODEL, cheater.wallet, worker_payout=OTHER) == "peer-1"


async def test_a_check_whose_only_verifier_shares_the_workers_payout_is_skipped(
    h: Harness,
) -> None:
    sub, _ = await _paid_request(h)
    worker = join(h, 0, payout=OPERATOR, ready=True)
    sibling = join(h, 1, payout=OPERATOR)  # the operator's second container
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, paying(worker, offer, t, OPERATOR))
    await answer_challenge(h, worker, t)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "skipped"  # released, not failed
    (line,) = log_lines(h)
    assert line["verdict"] == "skipped" and "no verifier" in str(line["reason"])
    assert h.reputation.get(worker.wallet).strikes == []
    assert not [m for m in sibling.drain() if isinstance(m, VerifyStep)]
    assert h.store.verifier_work([job_id]) == {}


async def test_verifier_work_is_recorded_at_the_verifiers_payout_account(h: Harness) -> None:
    sub, _ = await _paid_request(h)
    worker = join(h, 0, payout=OTHER, ready=True)
    container = join(h, 1, payout=OPERATOR)  # an ephemeral key, paid to the operator
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, paying(worker, offer, t, OTHER))
    await answer_challenge(h, worker, t)
    asked = await answer_verify(h, container, t, honest=True)
    await until(lambda: sub.state.finished.is_set())  # type: ignore[attr-defined]
    job_id = offer.offer.job_id
    assert h.store.check_state(job_id) == "passed" and asked
    (line,) = log_lines(h)
    assert line["verifier"] == container.wallet  # the log names who computed
    # paid where it said, never at the throwaway key
    assert h.store.verifier_work([job_id]) == {job_id: [(OPERATOR.lower(), len(asked))]}


async def test_a_third_node_is_never_paid_to_the_first_verifiers_account(h: Harness) -> None:
    """The first verifier fails the step; the only other node is its own operator's second
    container: it may not overrule nor confirm its sibling, so no third answer comes (no
    probe in the pool either): the fail stands on the first answer, the sibling never asked."""
    sub, _ = await _paid_request(h)
    worker = join(h, 0, ready=True)
    first = join(h, 1, payout=OPERATOR)
    h.dispatcher.match()
    (offer,) = worker.offers()
    t = Trajectory(offer.offer.steps, seed=1)
    await h.dispatcher.accept_result(worker.link, committed(worker, offer, t))
    await answer_challenge(h, worker, t)
    ask = await next_of(first, VerifyStep)
    sibling = join(h, 2, payout=OPERATOR)  # joins before the first answers
    other = Trajectory(offer.offer.steps, seed=5)
    reply = StepVerified(check_id=ask.check_id, latents=other.tensor(ask.k + 1), start_distance=0.0)
    assert h.dispatcher.verifications.answered(first.link.peer_id, reply)
    job_id = offer.offer.job_id
    await until(lambda: h.store.failed_receipts(job_id))
    assert not [m for m in sibling.drain() if isinstance(m, VerifyStep)]
    (line,) = log_lines(h)
    assert line["verdict"] == "fail" and line["verifier"] == first.wallet
    del sub
