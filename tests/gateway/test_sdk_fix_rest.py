"""The SDKs' `estimateCost` and `getSizePresets` calls are served (they were 404): the
estimate is what the project would reserve, in the shape the SDKs read; the presets are
Sogni's ids at each model's size; bad input is one 4000 naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import httpx

from sogni_coordinator.gateway.models import ModelBook
from sogni_protocol.catalog import Catalog, default_catalog
from sogni_protocol.messages import RenderRequest
from sogni_protocol.pricing import MICRO, quote
from tests.e2e.conftest import start_net

from .conftest import create_key

TINY = "sogni-tiny-sd"
SDXL = "sdxl-base-1.0"
MODELS = [SDXL, TINY]


def _whole(micro: int) -> Decimal:
    return Decimal(micro) / MICRO


@asynccontextmanager
async def _gateway(tmp: Path) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], Catalog]]:
    """A coordinator serving MODELS (no node: these calls need none), an HTTP client on its
    gateway, a new key's auth header, and the catalog its billing prices with."""
    async with start_net(tmp, models=MODELS) as net:
        url = net.coordinator.http_url
        assert url is not None
        key, _ = create_key(net.config.database, "app")
        billing = net.coordinator.dispatcher.billing
        assert billing is not None and billing.mode != "off"  # the estimate is a real price
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield http, {"api-key": key}, billing.catalog or default_catalog()


async def test_estimate_cost_is_what_the_project_would_reserve(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as (http, auth, catalog):

        async def get(path: str, **params: str) -> httpx.Response:
            return await http.get(path, headers=auth, params=params)

        # --- estimateCost (v2: what the SDKs call without a sampler) -----------------
        got = await get(f"/api/v2/job/estimate/spark/fast/{TINY}/2/3/0/0/0/64/64")
        assert got.status_code == 200, got.text
        body = got.json()
        want = quote(
            RenderRequest(
                model_id=TINY,
                positive_prompt="",
                steps=3,
                width=64,
                height=64,
                number_of_images=2,
            ),
            catalog,
        )
        project = body["quote"]["project"]
        assert Decimal(project["costInSpark"]) == _whole(want.spark_micro) > 0
        assert Decimal(project["costInToken"]) == Decimal(project["costInSpark"])
        assert Decimal(project["costInSogni"]) == _whole(want.sogni_micro)
        assert Decimal(project["costInUSD"]) == Decimal(str(want.usd))
        assert Decimal(body["quote"]["job"]["costInSpark"]) * 2 == Decimal(project["costInSpark"])
        assert all(isinstance(v, str) for k, v in project.items() if k.startswith("cost"))
        assert body["request"]["imageCount"] == 2 and body["request"]["model"] == TINY

        # relaxed is the tier's price; sogni prices the token in SOGNI
        relaxed = (await get(f"/api/v2/job/estimate/spark/relaxed/{TINY}/2/3/0/0/0/64/64")).json()
        assert Decimal(relaxed["quote"]["project"]["costInSpark"]) < Decimal(project["costInSpark"])
        sogni = (await get(f"/api/v2/job/estimate/sogni/fast/{TINY}/2/3/0/0/0/64/64")).json()
        assert sogni["quote"]["project"]["costInToken"] == sogni["quote"]["project"]["costInSogni"]

        # width/height 0: the model's size; v3 adds guidance, sampler, context images
        default_size = (await get(f"/api/v2/job/estimate/spark/fast/{SDXL}/1/20/0/0/0/0/0")).json()
        base = quote(
            RenderRequest(model_id=SDXL, positive_prompt="", steps=20, width=1024, height=1024),
            catalog,
        )
        assert Decimal(default_size["quote"]["project"]["costInSpark"]) == _whole(base.spark_micro)
        v3 = await get(
            f"/api/v3/job/estimate/spark/fast/{SDXL}/1/20/0/0/0/0/0/7.5/dpm_pp_2m/0",
            outputFormat="jpg",
        )
        assert (
            v3.status_code == 200
            and v3.json()["quote"]["project"] == default_size["quote"]["project"]
        )
        assert (
            await get(f"/api/v3/job/estimate/spark/fast/{SDXL}/1/20/0/0/0/0/0/0/_/0")
        ).status_code == 200

        v2, v3p = "/api/v2/job/estimate", "/api/v3/job/estimate"
        refusals = {
            "stepCount": f"{v2}/spark/fast/{TINY}/1/undefined/0/0/0/64/64",
            "imageCount": f"{v2}/spark/fast/{TINY}/17/3/0/0/0/64/64",
            "cnEnabled": f"{v2}/spark/fast/{TINY}/1/3/0/1/0/64/64",
            "startingImageStrength": f"{v2}/spark/fast/{TINY}/1/3/0/0/0.5/64/64",
            "width": f"{v2}/spark/fast/{TINY}/1/3/0/0/0/100/64",
            "tokenType": f"{v2}/usd/fast/{TINY}/1/3/0/0/0/64/64",
            "network": f"{v2}/spark/slow/{TINY}/1/3/0/0/0/64/64",
            "sampler": f"{v3p}/spark/fast/{TINY}/1/3/0/0/0/64/64/0/heun/0",
            "contextImages": f"{v3p}/spark/fast/{TINY}/1/3/0/0/0/64/64/0/_/2",
        }
        for field, path in refusals.items():
            r = await get(path)
            assert r.status_code == 400, (field, r.text)
            assert r.json()["errorCode"] == 4000 and field in r.json()["message"], field
        unknown = await get("/api/v2/job/estimate/spark/fast/no-such-model/1/3/0/0/0/64/64")
        assert unknown.status_code == 404 and unknown.json()["errorCode"] == 4004
        anon = await http.get(f"/api/v2/job/estimate/spark/fast/{TINY}/1/3/0/0/0/64/64")
        assert anon.status_code == 401


async def test_size_presets_are_served_at_each_models_size(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as (http, auth, catalog):

        async def get(path: str) -> httpx.Response:
            return await http.get(path, headers=auth)

        book = ModelBook(catalog, frozenset(MODELS))
        for model in MODELS:
            presets = await get(f"/api/v1/size-presets/network/fast/model/{model}")
            assert presets.status_code == 200 and presets.json() == book.size_presets(model)
        tiny = {
            p["id"]: p
            for p in (await get(f"/api/v1/size-presets/network/relaxed/model/{TINY}")).json()
        }
        assert (tiny["square_hd"]["width"], tiny["square_hd"]["height"]) == (64, 64)
        gone = await get("/api/v1/size-presets/network/fast/model/no-such-model")
        assert gone.status_code == 404 and gone.json()["errorCode"] == 4004
        bad = await get(f"/api/v1/size-presets/network/moon/model/{TINY}")
        assert bad.status_code == 400 and bad.json()["errorCode"] == 4000
        assert "network" in bad.json()["message"]
        assert (
            await http.get(f"/api/v1/size-presets/network/fast/model/{TINY}")
        ).status_code == 401
