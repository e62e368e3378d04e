"""The image check on the delivery paths, end to end: a coordinator on 127.0.0.1, a real
node rendering the tiny model whose output is replaced by the synthetic trigger (a node
that renders such an image), the libp2p client and the SDK gateway.

An image for a request that did not opt in is blurred (the real detector no longer fires on
what the client gets) and the job is paid (its receipt is stored, the gateway account is
charged); `disableSafety` on a coordinator that allows adult content gets it as rendered.
The prompt (a sentinel) appears in no log line on these paths, and the metrics count the
decision by category and action only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from PIL import Image

from sogni_app.api import render
from sogni_coordinator.content_policy import ContentConfig
from sogni_coordinator.ledger import Ledger
from sogni_node.render.backend import Backend, RenderJob, RenderOutput
from tests.e2e.conftest import MODEL, start_net, tiny_request
from tests.gateway.conftest import create_key, spark_of
from tests.gateway.sdk_wire import connect, job_request

from .conftest import SIZE, TEST_THRESHOLD, TRIGGER_CLASS, policy_for_trigger, trigger

SENTINEL = "quokka-sentinel-5b1e"
TINY = {"steps": 3, "sizePreset": "custom", "width": SIZE, "height": SIZE}


class TriggerBackend:
    """The real backend; the image it returns is the synthetic trigger at the job's size."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.supports_loras = inner.supports_loras

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        out = self.inner.render(job, on_step, should_cancel)
        return dataclasses.replace(out, image=trigger(job.width, job.height))

    def close(self) -> None:
        pass


def _trips(detector: Any, image: bytes) -> bool:
    return detector.scores(image).get(TRIGGER_CLASS, 0.0) >= TEST_THRESHOLD


async def _metric(url: str, line: str) -> float:
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(url + "/metrics")).text
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line)]
    return sum(values)


async def test_libp2p_client_gets_it_blurred_and_paid_unless_it_opts_in(
    tmp_path: Path,
    backend: Any,
    detector: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = trigger()
    assert _trips(detector, raw)  # what the node sends is a real detection
    content = ContentConfig(policy_file=policy_for_trigger(tmp_path), allow_adult=True)
    async with start_net(tmp_path, content=content) as net:
        await net.add_node(TriggerBackend(backend), "node0")
        dispatcher = net.coordinator.dispatcher
        with trio.fail_after(60):
            safe = await render(
                net.addr,
                tiny_request(1, positive_prompt=f"a cat {SENTINEL}", width=SIZE, height=SIZE),
            )
        (image,) = safe.images
        assert image.image != raw and not _trips(detector, image.image)
        with Image.open(io.BytesIO(image.image)) as im:
            assert (im.format, im.size) == ("PNG", (SIZE, SIZE))
        # paid: the receipt (what the node sent, by hash) is stored for the epoch
        stored = dispatcher.store.receipt(image.job_id)
        assert stored is not None
        assert stored.receipt.result_hash == hashlib.sha256(raw).digest()

        with trio.fail_after(60):
            adult = await render(
                net.addr, tiny_request(1, disable_safety=True, width=SIZE, height=SIZE)
            )
        assert adult.images[0].image == raw  # opted in, operator allows: as rendered

        url = net.coordinator.http_url
        assert url is not None
        label = 'sogni_coordinator_image_checks_total{action="%s",category="adult"}'
        assert await _metric(url, label % "blur") == 1
        assert await _metric(url, label % "deliver") == 1
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "image_screened" in text  # the decision was logged ...
    assert SENTINEL not in text  # ... without the prompt


async def test_withhold_and_the_operator_who_does_not_allow_adult(
    tmp_path: Path, backend: Any, detector: Any
) -> None:
    content = ContentConfig(policy_file=policy_for_trigger(tmp_path), adult_action="withhold")
    async with start_net(tmp_path, content=content) as net:
        await net.add_node(TriggerBackend(backend), "node0")
        with trio.fail_after(60):
            # disableSafety alone is not enough: the operator did not allow adult content
            result = await render(
                net.addr, tiny_request(1, disable_safety=True, width=SIZE, height=SIZE)
            )
        with Image.open(io.BytesIO(result.images[0].image)) as im:
            grey = np.asarray(im.convert("L"), dtype=int)
            assert (
                im.size == (SIZE, SIZE) and int(grey.max() - grey.min()) <= 2
            )  # a flat placeholder
        assert net.coordinator.dispatcher.store.receipt(result.images[0].job_id) is not None


async def test_gateway_blurs_for_an_opt_out_project_and_charges_for_it(
    tmp_path: Path, backend: Any, detector: Any
) -> None:
    raw = trigger()
    content = ContentConfig(policy_file=policy_for_trigger(tmp_path), allow_adult=True)
    async with start_net(tmp_path, content=content) as net:
        await net.add_node(TriggerBackend(backend), "node0")
        url = net.coordinator.http_url
        assert url is not None
        key, account = create_key(net.config.database)
        ledger = Ledger(net.config.database)
        try:
            ledger.credit_purchase(account, 1)
        finally:
            ledger.close()
        got: dict[bool, bytes] = {}
        async with connect(url, key) as ws, httpx.AsyncClient(timeout=30) as http:
            await ws.until("swarmModels")
            for opt_in in (False, True):
                before = spark_of(net.config.database, account)
                req = job_request(MODEL, 1, positivePrompt=f"a cat {SENTINEL}", **TINY)
                req["disableSafety"] = opt_in
                await ws.send("jobRequest", req)
                frames = await ws.project(req["jobID"])
                assert frames[-1][1]["type"] == "jobCompleted", frames
                (result,) = [d for k, d in frames if k == "jobResult"]
                got[opt_in] = (await http.get(result["resultUrl"])).content
                assert before - spark_of(net.config.database, account) > 0  # paid
        assert got[True] == raw
        assert got[False] != raw and not _trips(detector, got[False])


async def test_minors_is_withheld_whatever_the_opt_in_and_strikes_only_for_a_clean_prompt(
    tmp_path: Path, backend: Any
) -> None:
    """The shipped thresholds: the trigger (0.47) is over `[image] minors` for its class
    (0.3) and under `[image] adult` (0.5), so only a prompt naming a young subject acts."""
    content = ContentConfig(allow_adult=True)
    async with start_net(tmp_path, content=content) as net:
        node = await net.add_node(TriggerBackend(backend), "node0")
        dispatcher = net.coordinator.dispatcher
        young = {"positive_prompt": "a child at a park", "width": SIZE, "height": SIZE}
        with trio.fail_after(60):
            adult = await render(net.addr, tiny_request(1, width=SIZE, height=SIZE))
        assert adult.images[0].image == trigger()  # no young subject: under the adult bar
        # steered undressed by the negative prompt: withheld, the node did as asked (paid)
        with trio.fail_after(60):
            steered = await render(
                net.addr, tiny_request(1, negative_prompt="clothes", disable_safety=True, **young)
            )
        (image,) = steered.images
        with Image.open(io.BytesIO(image.image)) as im:
            grey = np.asarray(im.convert("L"), dtype=int)
            assert int(grey.max() - grey.min()) <= 2
        assert dispatcher.store.receipt(image.job_id) is not None
        assert dispatcher.reputation.get(node.wallet.address).failures == 0
        # a clean prompt: refused, struck, unpaid, and after the attempts the job fails
        with trio.fail_after(90):
            clean = await render(net.addr, tiny_request(1, disable_safety=True, **young))
        assert clean.images == [] and len(clean.failed) == 1
        assert "category: minors" in clean.failed[0][1]
        assert dispatcher.reputation.get(node.wallet.address).failures >= 1
