"""`sogni quote` tells the truth: for every catalog model, at its defaults, the quote is what a
coordinator charges (billing's reservation per image and the work units dispatch signs into
the offer); an unlisted model is refused unless priced by an explicit class."""

from __future__ import annotations

import json

import msgspec
import pytest
from typer.testing import CliRunner

from sogni_app.cli import app
from sogni_protocol.catalog import load_catalog
from sogni_protocol.messages import JobParams, RenderRequest
from sogni_protocol.pricing import quote, spark_micro, work_units

runner = CliRunner()
CATALOG = load_catalog()


@pytest.mark.parametrize("model", sorted(CATALOG.models))
@pytest.mark.parametrize("network", ["fast", "relaxed"])
def test_quote_equals_the_charge_for_every_catalog_model(model: str, network: str) -> None:
    out = runner.invoke(app, ["quote", "--model", model, "-n", "3", "--network", network, "--json"])
    assert out.exit_code == 0, out.output
    q = json.loads(out.stdout)
    entry = CATALOG.model(model)
    request = msgspec.convert(  # what an app sends at the model's defaults
        {
            "type": "renderRequest",
            "modelId": model,
            "positivePrompt": "a red circle",
            "steps": entry.default_steps,
            "width": entry.default_width,
            "height": entry.default_height,
            "numberOfImages": 3,
            "network": network,
        },
        RenderRequest,
    )
    charged = quote(request, CATALOG)  # what billing reserves (Billing._authorized_quote)
    params = JobParams(
        model_id=model,
        positive_prompt="a red circle",
        steps=entry.default_steps,
        width=entry.default_width,
        height=entry.default_height,
        guidance=5.0,
        seed=1,
    )
    units = work_units(params)  # what dispatch signs into each offer
    assert q["perImage"]["workUnits"] == charged.per_image.work_units == units
    assert q["perImage"]["spark"] == charged.per_image.spark == spark_micro(units, network) / 1e6
    assert q["spark"] == pytest.approx(3 * q["perImage"]["spark"])


def test_the_embedded_model_is_quoted_at_its_own_size() -> None:
    out = runner.invoke(app, ["quote", "--model", "sogni-shapes-64", "-n", "4", "--json"])
    q = json.loads(out.stdout)
    assert q["perImage"]["spark"] == pytest.approx(0.004838)  # not the 1024x1024 fallback


def test_an_unlisted_model_is_refused_unless_a_class_prices_it() -> None:
    out = runner.invoke(app, ["quote", "--model", "nope"])
    assert out.exit_code == 2 and "unknown model 'nope'" in out.output
    assert "--class" in out.output and "Traceback" not in out.output
    bad = runner.invoke(app, ["quote", "--model", "nope", "--class", "nope-class"])
    assert bad.exit_code == 2 and "unknown class 'nope-class'" in bad.output
    ok = runner.invoke(app, ["quote", "--model", "nope", "--class", "sd15", "--json"])
    assert ok.exit_code == 0, ok.output
    sd15 = CATALOG.classes["sd15"]
    assert json.loads(ok.stdout)["perImage"]["renderSeconds"] == sd15.baseline_render_seconds
