"""Pricing rules with the whitepaper's numbers (43.2 render s = 1 Spark = 0.005 USD)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sogni_app.cli import app
from sogni_app.quote import quote
from sogni_protocol.catalog import load_catalog, parse_catalog
from sogni_protocol.messages import JobParams
from sogni_protocol.pricing import load_factors, render_seconds, work_units


def test_baseline_is_one_spark_and_half_a_cent() -> None:
    q = quote("sdxl-base-1.0", steps=20, width=1024, height=1024)
    assert q.render_seconds == 43.2
    assert q.spark_micro == 1_000_000 and q.spark == 1.0
    assert q.usd == pytest.approx(0.005, abs=1e-12)


def test_relaxed_costs_half() -> None:
    fast = quote("sdxl-base-1.0", images=10)
    relaxed = quote("sdxl-base-1.0", images=10, network="relaxed")
    assert relaxed.render_seconds == fast.render_seconds  # same work
    assert relaxed.spark_micro * 2 == fast.spark_micro == 10_000_000
    assert relaxed.usd == pytest.approx(0.025)  # dual-tier table: 10 images $0.05 / $0.025


def test_sogni_is_usd_over_market_price() -> None:
    q = quote("sdxl-base-1.0", token_type="sogni", sogni_usd=0.0025)
    assert q.sogni_micro == 2_000_000  # 0.005 USD / 0.0025 USD per SOGNI
    assert quote("sdxl-base-1.0", sogni_usd=0.005).sogni == 1.0


def test_unknown_model_priced_as_sdxl_class() -> None:
    """A coordinator prices a model it does not list as the reference class; the app's quote
    refuses it unless told the class (tests/economics/test_quote_truth.py)."""
    from sogni_protocol.messages import RenderRequest
    from sogni_protocol.pricing import quote as price

    req = RenderRequest(model_id="no-such-model", positive_prompt="x", width=1024, height=1024)
    assert price(req).spark == 1.0
    assert quote("no-such-model", model_class="sdxl").spark == 1.0


def test_scaling_is_measured_and_monotonic() -> None:
    f = load_factors()
    assert f.overhead_steps > 0 and 0.5 < f.pixel_exponent < 2.0  # from the benchmark
    base = quote("sdxl-base-1.0")
    more_steps = quote("sdxl-base-1.0", steps=40)
    bigger = quote("sdxl-base-1.0", width=2048, height=2048)
    assert base.spark < more_steps.spark < 2 * base.spark  # fixed cost is not doubled
    assert bigger.render_seconds == pytest.approx(43.2 * 4**f.pixel_exponent)


def test_totals_are_images_times_per_image() -> None:
    q = quote("flux1-schnell-fp8", steps=7, width=768, height=1344, images=37)
    assert q.spark_micro == 37 * q.per_image.spark_micro
    assert q.sogni_micro == 37 * q.per_image.sogni_micro


def test_work_units_keep_their_meaning() -> None:
    params = JobParams(
        model_id="sdxl-base-1.0",
        positive_prompt="",
        steps=20,
        guidance=7.0,
        width=1024,
        height=1024,
        seed=0,
    )
    assert render_seconds(params) == 43.2 and work_units(params) == 43_200
    tiny = JobParams(
        model_id="sogni-tiny-sd",
        positive_prompt="",
        steps=4,
        guidance=5.0,
        width=64,
        height=64,
        seed=0,
    )
    assert work_units(tiny) == 43  # 1/1000 Spark at the tiny class defaults


def test_catalog_loads_and_rejects_unknown_class() -> None:
    cat = load_catalog()
    assert cat.model("sdxl-base-1.0").baseline_render_seconds == 43.2
    assert cat.relaxed_price_factor == 0.5
    with pytest.raises(ValueError, match="unknown class"):
        parse_catalog({"models": {"m": {"class": "nope"}}})


def test_quote_cli_json() -> None:
    args = ["quote", "--model", "sdxl-base-1.0", "-n", "4", "--network", "relaxed", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["spark"] == 2.0 and data["perImage"]["spark"] == 0.5
    assert data["usd"] == pytest.approx(0.01)
