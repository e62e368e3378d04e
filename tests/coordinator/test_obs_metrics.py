"""What `/metrics` and `/healthz` count, through a real metered `Dispatcher` (no libp2p):
result refusals by their own category, render requests by outcome and refusal code, image
checks' series from the start, and nodes that would get work apart from those that would
not (blacklisted, blocked)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.content_policy import policy_lists
from sogni_coordinator.billing import Refusal
from sogni_coordinator.client_session import serve_client
from sogni_coordinator.dispatch import (
    Dispatcher,
    JobGone,
    NotTaken,
    ResultRefused,
    StorageFault,
)
from sogni_coordinator.http_api import CoordinatorView, health
from sogni_coordinator.metrics import (
    IMAGE_CHECKS,
    REFUSAL_LABELS,
    REQUEST_LABELS,
    MeteredDispatcher,
    metered,
    observe,
    refusal_category,
)
from sogni_coordinator.status_page import snapshot
from sogni_net import Channel
from sogni_protocol import eip712
from sogni_protocol.ids import WIRE_VERSION
from sogni_protocol.messages import RequestRefused, Result, encode

from .conftest import DOMAIN, MODEL, SIGNER, Harness, ScriptedChannel, request

ADULT = policy_lists()["adult"]["sexual"][1]
"""An adult term of the shipped policy (never written out here): refused by default."""


class MeteredHarness(Harness):
    """`Harness` with the dispatcher the service builds when `/metrics` is on."""

    dispatcher: MeteredDispatcher

    def _dispatcher_type(self) -> Callable[..., Dispatcher]:
        return metered([MODEL])  # a registry of its own per start

    def value(self, name: str, **labels: str) -> float:
        registry = self.dispatcher.metrics.registry
        return registry.get_sample_value(f"sogni_coordinator_{name}", labels) or 0.0


class FakeHost:
    """A libp2p host whose listener is up (all readiness reads of it)."""

    def __init__(self) -> None:
        self.addrs = ["/ip4/127.0.0.1/tcp/1"]


async def serve(h: Harness, *frames: bytes) -> ScriptedChannel:
    """One client stream over `frames`; the session must end by itself (no exception)."""
    channel = ScriptedChannel(*frames, peer="peer-client")
    with trio.fail_after(10):
        await serve_client(cast(Channel, channel), h.dispatcher, allowed_models={MODEL})
    return channel


def view_of(h: MeteredHarness, nursery: trio.Nursery) -> CoordinatorView:
    view = CoordinatorView("peer-coordinator", SIGNER.address, h.dispatcher)
    return observe(view, h.store, Path(str(h.path)), FakeHost(), nursery)  # type: ignore[arg-type]


@pytest.fixture
async def metered_coord(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[MeteredHarness]:
    h = MeteredHarness(tmp_path / "coordinator.db", nursery)
    yield h
    h.close()


# --- receipts refused, by category -------------------------------------------------------
PARTIAL_CLAIM = (
    "partial receipt claims 7 of 10 steps; the time since the offer allows at most 2 at "
    "this node's measured speed"
)

CASES: list[tuple[ResultRefused, str]] = [
    (ResultRefused("receipt steps or work units differ from the offer"), "work_mismatch"),
    (ResultRefused(PARTIAL_CLAIM), "partial"),
    (NotTaken(PARTIAL_CLAIM.replace("measured speed", "newcomer's rate")), "partial"),
    (ResultRefused("partial receipt's work units are not pro rata"), "partial"),
    (ResultRefused("a partial receipt carries no image"), "partial"),
    (ResultRefused("partial receipt for a job that was not cancelled"), "partial"),
    (ResultRefused("receipt names an offer this coordinator did not make"), "offer_mismatch"),
    (ResultRefused("offer was made to another node"), "offer_mismatch"),
    (ResultRefused("receipt names another coordinator"), "offer_mismatch"),
    (ResultRefused("receipt names another model"), "offer_mismatch"),
    (ResultRefused("receipt's price factor differs from the offer's tier"), "offer_mismatch"),
    (ResultRefused("receipt signature is not from the node's wallet"), "bad_signature"),
    (ResultRefused("receipt worker is not the wallet bound to this peer"), "bad_signature"),
    (ResultRefused("resultHash is not the sha256 of the image bytes"), "bad_image"),
    (ResultRefused("image is not the png the job asked for"), "bad_image"),
    (ResultRefused("image does not decode as the png the job asked for"), "bad_image"),
    (ResultRefused("image refused by the content policy (category: minors)"), "image_policy"),
    (StorageFault("the coordinator could not store the image; retry"), "storage"),
    (StorageFault("the coordinator could not check the image; retry"), "storage"),
    (ResultRefused("receipt is for another job"), "job_gone"),
    (JobGone("job already receipted"), "job_gone"),
    (JobGone("unknown job"), "job_gone"),
    (JobGone("job already ended (failed)"), "job_gone"),
    (JobGone("this result came after the job was taken back from this node"), "job_gone"),
    (ResultRefused("something new"), "other"),
]


@pytest.mark.parametrize(("exc", "label"), CASES, ids=[str(e)[:40] for e, _ in CASES])
def test_each_refusal_is_counted_in_its_own_category(exc: ResultRefused, label: str) -> None:
    """Most specific first: "steps or work units differ from the offer" is a work mismatch
    and "partial receipt claims ... since the offer" a partial claim, not offer mismatches."""
    assert refusal_category(exc) == label


def test_every_category_has_a_case() -> None:
    assert {label for _, label in CASES} == set(REFUSAL_LABELS)


async def test_a_work_mismatch_from_a_node_is_counted_as_one(metered_coord: MeteredHarness) -> None:
    h = metered_coord
    node = h.node(0)
    await h.submit(request(1))
    h.dispatcher.match()
    (offer,) = node.offers()
    good = node.result(offer)
    receipt = msgspec.structs.replace(good.receipt, work_units=good.receipt.work_units + 1)
    bad = Result(
        job_id=good.job_id,
        image=good.image,
        receipt=receipt,
        signature=eip712.sign_receipt(node.key, DOMAIN, receipt),
        meta=good.meta,
    )
    with pytest.raises(ResultRefused, match="steps or work units"):
        await h.dispatcher.accept_result(node.link, bad)
    assert h.value("receipts_refused_total", reason="work_mismatch") == 1
    assert h.value("receipts_refused_total", reason="offer_mismatch") == 0


# --- render requests -----------------------------------------------------------------------
async def test_every_request_and_image_check_series_exists_from_the_start(
    metered_coord: MeteredHarness,
) -> None:
    h = metered_coord
    registry = h.dispatcher.metrics.registry
    for code in REQUEST_LABELS:
        assert (
            registry.get_sample_value("sogni_coordinator_requests_refused_total", {"code": code})
            == 0
        )
    for model in (MODEL, "other"):
        labels = {"model": model}
        assert registry.get_sample_value("sogni_coordinator_requests_accepted_total", labels) == 0
    assert registry.get_sample_value("sogni_coordinator_requests_failed_total") == 0
    for category, action in IMAGE_CHECKS:
        labels = {"category": category, "action": action}
        assert registry.get_sample_value("sogni_coordinator_image_checks_total", labels) == 0


async def test_requests_are_counted_by_outcome_and_refusal_code(
    metered_coord: MeteredHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = metered_coord
    h.node(0)
    await h.submit(request(2))
    refusals = {
        "unknown_model": request(1, model_id="no-such-model"),
        "content_policy": request(1, positive_prompt=f"a portrait, {ADULT}"),
    }
    for code, req in refusals.items():
        with pytest.raises(Refusal) as info:
            await h.submit(req)
        assert info.value.code == code
    await serve(h, b"\xc1 not msgpack")  # refused by the session, before `submit`
    raw = msgspec.to_builtins(request(1))
    await serve(h, msgspec.msgpack.encode({**raw, "v": WIRE_VERSION + 1}))
    assert h.value("requests_accepted_total", model=MODEL) == 1
    for code in ("unknown_model", "content_policy", "invalid_request", "unsupported_version"):
        assert h.value("requests_refused_total", code=code) == 1, code
    assert h.value("requests_failed_total") == 0

    # a bug while accepting: counted, the client told so in one line, the stream not reset
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(h.dispatcher, "model_fault", broken)
    channel = await serve(h, encode(request(1)))
    assert h.value("requests_failed_total") == 1
    (refused,) = channel.sent
    assert isinstance(refused, RequestRefused) and refused.code == "internal"
    assert "\n" not in refused.reason and "a bug" not in refused.reason
    assert channel.closed


async def test_a_refusal_code_outside_the_set_is_counted_as_other(
    metered_coord: MeteredHarness,
) -> None:
    metrics = metered_coord.dispatcher.metrics
    metrics.request_refused("a new code, or anything a bug put there")
    metrics.image_checked("a category", "an action")
    text = generate_latest(metrics.registry).decode()
    assert "a new code" not in text and "a category" not in text
    assert metered_coord.value("requests_refused_total", code="other") == 1
    assert metered_coord.value("image_checks_total", category="other", action="other") == 1


# --- nodes that would get work --------------------------------------------------------------
async def test_blacklisted_and_blocked_nodes_are_not_counted_as_serving(
    metered_coord: MeteredHarness, nursery: trio.Nursery
) -> None:
    h = metered_coord
    view = view_of(h, nursery)
    good, struck, blocked = h.node(0), h.node(1), h.node(2)
    assert health(view)["nodes"] == 3
    while not h.reputation.strike(struck.wallet):  # blacklisted while connected
        pass
    h.dispatcher.router.blocked_nodes = frozenset({blocked.wallet.lower()})  # before its poll
    assert len(h.dispatcher.nodes) == 3  # still connected: counted apart
    facts = health(view)
    assert (facts["status"], facts["nodes"], facts["nodesBarred"]) == ("ok", 1, 2)
    registry = h.dispatcher.metrics.registry
    text = generate_latest(registry).decode()
    assert "sogni_coordinator_nodes_barred 2.0" in text
    assert h.value("nodes_connected", tier="all") == 1
    assert h.value("nodes_connected", tier="fast") == 1
    assert h.value("nodes_with_model", model=MODEL) == 1
    page = await trio.to_thread.run_sync(snapshot, view, None)
    assert page.nodes == 1 and page.nodes_by_model == {MODEL: 1}

    h.dispatcher.node_left(good.link, "gone")
    facts = health(view)
    assert (facts["status"], facts["nodes"], facts["nodesBarred"]) == ("degraded", 0, 2)


async def test_docs_name_every_coordinator_metric_and_no_other(
    metered_coord: MeteredHarness, nursery: trio.Nursery
) -> None:
    """docs/OPERATIONS.md's coordinator table and a scrape agree, both ways."""
    view_of(metered_coord, nursery)  # registers the gauges read at scrape time
    docs = Path(__file__).parents[2] / "docs" / "OPERATIONS.md"
    documented = set(re.findall(r"`(sogni_coordinator_\w+)`", docs.read_text()))
    text = generate_latest(metered_coord.dispatcher.metrics.registry).decode()
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # prometheus_client's timestamps
    }
    assert exposed - documented == set()
    assert documented - exposed == set()
